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
