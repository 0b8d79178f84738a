"""One cell of the family matrix: a tiny family, in one naming, through ``cq_core.commands.convert`` and ComfyUI.

Shared by ``tests/test_family_matrix.py`` (a CI-sized subset, known failures
marked) and ``bench/comfyui_matrix.py`` (the full product, written to
``docs/comfyui_matrix.md``). A cell never raises: what went wrong is its
``reason``, the first failed check in this order:

1. ``convert``: ``cq_core.convert(src, dst, format=fmt)`` with no preset or flags;
2. ``load``: ComfyUI's loader (``Family.loader``) on the output; for a format the judging
   release does not load (``Format.comfyui_since`` later than it, e.g. asym_w4a8_int8 on
   0.30.0) the loader must refuse the file naming the format, and that refusal is the cell
   (``refused``);
3. ``config``: the detected model (``unet_config``, compared as a dict) equals the
   bf16 source's;
4. ``keys``: nothing reported missing, unexpected or left over (``LoadLog.problems()``);
5. ``forward``: finite, and within ``BOUNDS[fmt]`` (relative L2 error) of the bf16
   source's forward through the same loader. (It also runs after a ``keys`` failure,
   so the cell's ``rel_err`` shows whether the leftovers mattered.)

The preset cq's auto-detection picks is checked on its own (``preset_check``):
it depends on the key names only, not on the format. ``lora_cells`` runs the LoRA cells
(``tests/lora.py``): ComfyUI's own LoRA loader on cq's output against the bf16 file.

The judge is the ComfyUI of this process (``tests.comfyui.active_version()``).
"""

from __future__ import annotations

import math
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tests.families import Family, StateDict

STOCK_FORMATS = ("float8_e4m3fn", "float8_e5m2", "int8_tensorwise", "nvfp4", "mxfp8", "convrot_w4a4")


def _loadable_formats() -> tuple[str, ...]:
    """The stock formats, then every other registered format some ComfyUI release loads (``comfyui_since``)."""
    from tests.conftest import build_registry

    formats = build_registry().formats
    later = sorted((n for n, c in formats.items() if c.comfyui_since and n not in STOCK_FORMATS),
                   key=lambda n: (formats[n].comfyui_since, n))
    return (*STOCK_FORMATS, *later)


#: The matrix's columns: every format a ComfyUI release loads (asym_w4a8_int8: 0.31.0 and later).
MATRIX_FORMATS = _loadable_formats()


def judge_loads(fmt: str) -> bool:
    """Whether the ComfyUI judging this process loads ``fmt`` (its declared first release, held to
    ComfyUI's sources by tests/test_comfyui_versions.py)."""
    from cq_core.plugin.comfyui_versions import comfyui_loads
    from tests.comfyui import active_version
    from tests.conftest import build_registry

    return comfyui_loads(build_registry().formats[fmt], active_version())

#: Relative L2 error of a quantized model's forward against the bf16 model's, per format:
#: about twice the worst error measured on a passing cell of the "before" run
#: (docs/comfyui_matrix.md; the worst is Cosmos-Predict2, ten blocks: e4m3fn 0.099, e5m2 0.192,
#: int8 0.035, nvfp4 0.280, mxfp8 0.070, convrot_w4a4 0.569; one-block families stay near half
#: of that; asym_w4a8_int8, first measured through ComfyUI 0.33.0: Cosmos-Predict2 0.225, the others
#: 0.001-0.126, "two judges" section). The tiny models have random weights, so errors compound with depth rather than
#: average out. A layout bug or a wrongly quantized layer lands near 1 or above.
BOUNDS = {
    "float8_e4m3fn": 0.2,
    "float8_e5m2": 0.4,
    "int8_tensorwise": 0.1,
    "nvfp4": 0.5,
    "mxfp8": 0.2,
    "convrot_w4a4": 0.8,
    "asym_w4a8_int8": 0.5,
}

FORWARD_SEED = 1


@dataclass
class Reference:
    """The bf16 source in one naming, as ComfyUI loads it."""

    path: Path
    signature: Any  # the detected unet_config (diffusion/checkpoint) or the encoder's class (clip)
    output: torch.Tensor | None
    problems: list[str]
    error: str | None = None


@dataclass
class Cell:
    family: str
    naming: str
    format: str
    ok: bool
    reason: str = ""
    rel_err: float | None = None
    seconds: float = 0.0
    quantized: int | None = None  # layers cq quantized (the rest it kept in high precision)
    refused: bool = False  # the judge does not load the format and its loader refused the file, as it must


def _short(exc: BaseException) -> str:
    """The exception in one line: its type and first message line, plus the first detail line
    (``load_state_dict`` puts the useful part, e.g. the size mismatch, on the next line)."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    text = f"{type(exc).__name__}: " + " ".join(lines[:2]) if lines else type(exc).__name__
    return text[:300]


def load(family: Family, path: Path):
    """(model object the family's forward takes, signature, LoadLog) through ComfyUI's loader."""
    from tests import comfyui

    options = dict(getattr(family, "loader_options", None) or {})
    if family.loader == "diffusion":
        patcher, log = comfyui.load_diffusion_model(path)
        return patcher.model.diffusion_model, dict(patcher.model.model_config.unet_config), log
    if family.loader == "checkpoint":
        out, log = comfyui.load_checkpoint(path, **options)
        patcher = out[0]
        return patcher.model.diffusion_model, dict(patcher.model.model_config.unet_config), log
    if family.loader == "clip":
        clip, log = comfyui.load_clip([path], family.clip_type or "stable_diffusion", **options)
        return clip, type(clip.cond_stage_model).__name__, log
    raise ValueError(f"{family.name}: unknown loader {family.loader!r}")


def forward(family: Family, model) -> torch.Tensor | None:
    if family.forward is None:
        return None
    return family.forward(model, FORWARD_SEED).detach().float()


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).norm() / want.norm().clamp_min(1e-12)).item()


class Matrix:
    """Builds each family once, writes and loads each naming's bf16 source once, runs cells."""

    def __init__(self, workdir: Path):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._states: dict[str, StateDict] = {}
        self._references: dict[tuple[str, str], Reference] = {}
        self._loras: dict[str, StateDict] = {}
        self._lora_references: dict[tuple[str, str, str], Any] = {}

    def state(self, family: Family) -> StateDict:
        if family.name not in self._states:
            from tests.comfyui import import_comfyui

            self._states[family.name] = family.build(import_comfyui())
        return self._states[family.name]

    def source(self, family: Family, naming: str) -> Path:
        from safetensors.torch import save_file

        path = self.workdir / f"{family.name}-{naming}.safetensors"
        if not path.exists():
            tensors = family.namings[naming](self.state(family))
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(path),
                      metadata=getattr(family, "metadata", None))
        return path

    def reference(self, family: Family, naming: str) -> Reference:
        key = (family.name, naming)
        if key not in self._references:
            path = self.source(family, naming)
            try:
                model, signature, log = load(family, path)
                output = forward(family, model)
                self._references[key] = Reference(path, signature, output, log.problems())
            except Exception as exc:  # the bf16 source itself does not load: every cell fails with this
                self._references[key] = Reference(path, None, None, [], error=_short(exc))
        return self._references[key]

    def detected_preset(self, family: Family, naming: str) -> tuple[str | None, str | None]:
        """The preset cq's auto-detection picks for this naming's file (a dry run), and its reason."""
        import cq_core

        report = cq_core.convert(self.source(family, naming), format=STOCK_FORMATS[0], dry_run=True)
        return report.preset, report.preset_reason

    def preset_check(self, family: Family, naming: str) -> Cell:
        started = time.perf_counter()
        try:
            preset, reason = self.detected_preset(family, naming)
        except Exception as exc:
            return Cell(family.name, naming, "preset", False, f"dry run: {_short(exc)}",
                        seconds=time.perf_counter() - started)
        ok = preset == family.preset
        why = "" if ok else f"cq detects preset {preset!r}, want {family.preset!r}" + (f" ({reason})" if reason else "")
        return Cell(family.name, naming, "preset", ok, why, seconds=time.perf_counter() - started)

    def run(self, family: Family, naming: str, fmt: str) -> Cell:
        started = time.perf_counter()
        self._quantized = None
        cell = self._run(family, naming, fmt)
        cell.quantized = self._quantized
        cell.seconds = time.perf_counter() - started
        return cell

    def _run(self, family: Family, naming: str, fmt: str) -> Cell:
        import cq_core

        def fail(reason: str, rel: float | None = None) -> Cell:
            return Cell(family.name, naming, fmt, False, reason, rel)

        ref = self.reference(family, naming)
        if ref.error is not None:
            return fail(f"bf16 source: {ref.error}")
        if ref.problems:
            return fail(f"bf16 source: {ref.problems[0][:200]}")
        out = self.workdir / f"{family.name}-{naming}-{fmt}.safetensors"
        out.unlink(missing_ok=True)
        try:
            report = cq_core.convert(ref.path, out, format=fmt)
        except Exception as exc:
            return fail(f"convert: {_short(exc)}")
        self._quantized = len(report.quantized)
        try:
            if not judge_loads(fmt):
                return self._refusal(family, naming, fmt, out)
            try:
                model, signature, log = load(family, out)
            except Exception as exc:
                return fail(f"load: {_short(exc)}")
            if signature != ref.signature:
                return fail(f"config: {_config_diff(ref.signature, signature)}")
            problems = log.problems()
            # Key problems fail the cell, but the forward still runs: its error tells a harmless
            # leftover (error as in the other namings) from weights that lost their scales.
            keys = f"keys: {problems[0][:200]}" if problems else None
            if ref.output is None:
                return fail(keys) if keys else Cell(family.name, naming, fmt, True, "no forward")
            try:
                got = forward(family, model)
            except Exception as exc:
                return fail(keys or f"forward: {_short(exc)} [{_where(exc)}]")
            if not torch.isfinite(got).all():
                return fail(keys or "forward: non-finite output")
            if got.shape != ref.output.shape:
                return fail(keys or f"forward: shape {tuple(got.shape)}, bf16 {tuple(ref.output.shape)}")
            rel = relative_error(got, ref.output)
            if keys:
                return fail(keys, rel)
            if not math.isfinite(rel) or rel > BOUNDS[fmt]:
                return fail(f"forward: relative error {rel:.3f} > {BOUNDS[fmt]}", rel)
            return Cell(family.name, naming, fmt, True, "", rel)
        finally:
            out.unlink(missing_ok=True)


    def _refusal(self, family: Family, naming: str, fmt: str, out: Path) -> Cell:
        """The judge does not load ``fmt``: its loader must raise, naming the format (``comfy/ops.py``
        looks the layer's format up in ``QUANT_ALGOS``: ``KeyError``)."""
        from tests.comfyui import active_version

        try:
            load(family, out)
        except Exception as exc:
            if fmt in str(exc):
                return Cell(family.name, naming, fmt, True, f"refused by ComfyUI {active_version()}: {_short(exc)}",
                            refused=True)
            return Cell(family.name, naming, fmt, False, f"load: {_short(exc)} (not the refusal of {fmt!r})")
        return Cell(family.name, naming, fmt, False,
                    f"ComfyUI {active_version()} loaded {fmt!r}, which its QUANT_ALGOS does not hold")

    # -- LoRA cells -------------------------------------------------------------------------------

    def lora_reference(self, family: Family, naming: str, mode: str):
        """The bf16 file through ComfyUI with and without the family's LoRA, in ``mode`` (tests/lora.py)."""
        from tests import lora as loras

        key = (family.name, naming, mode)
        if key not in self._lora_references:
            patcher, _ = load_patcher(family, self.source(family, naming))
            self._lora_references[key] = loras.apply_lora(family, patcher, self.lora(family), mode, FORWARD_SEED)
        return self._lora_references[key]

    def lora(self, family: Family) -> StateDict:
        """The family's LoRA (tests/lora.py ``make_lora``), in ComfyUI's names: the same for every naming."""
        from tests import lora as loras

        if family.name not in self._loras:
            self._loras[family.name] = loras.make_lora(self.state(family))
        return self._loras[family.name]

    def lora_cells(self, family: Family, naming: str, fmt: str, modes=None) -> list:
        """One LoRA cell per mode (tests/lora.py ``MODES``) for cq's ``fmt`` output of this naming.

        The format's bound is :data:`BOUNDS`' (the LoRA's change of the output against the bf16
        model's, relative). Only a family loaded as a diffusion model (``Family.loader``) has them."""
        import cq_core

        from tests import lora as loras

        modes = tuple(modes or loras.MODES)
        started = time.perf_counter()
        if family.loader != "diffusion" or family.forward is None:
            raise ValueError(f"{family.name}: LoRA cells need a diffusion-model family with a forward")
        references = {mode: self.lora_reference(family, naming, mode) for mode in modes}
        out = self.workdir / f"{family.name}-{naming}-{fmt}-lora.safetensors"
        out.unlink(missing_ok=True)
        cells = []
        try:
            cq_core.convert(self.source(family, naming), out, format=fmt)
            for mode in modes:
                patcher, _ = load_patcher(family, out)
                got = loras.apply_lora(family, patcher, self.lora(family), mode, FORWARD_SEED)
                cells.append(loras.compare(family.name, naming, fmt, mode, references[mode], got, BOUNDS[fmt]))
        except Exception as exc:
            cells.append(loras.LoraCell(family.name, naming, fmt, ",".join(modes), False, f"{_short(exc)} [{_where(exc)}]"))
        finally:
            out.unlink(missing_ok=True)
        for cell in cells:
            cell.seconds = (time.perf_counter() - started) / len(cells)
        return cells


def load_patcher(family: Family, path: Path):
    """(ComfyUI's ModelPatcher, LoadLog) for a diffusion-model family's file."""
    from tests import comfyui

    return comfyui.load_diffusion_model(path)


def _config_diff(want: Any, got: Any) -> str:
    if isinstance(want, dict) and isinstance(got, dict):
        keys = sorted(k for k in set(want) | set(got) if want.get(k) != got.get(k))
        return ", ".join(f"{k} {got.get(k)!r} (bf16: {want.get(k)!r})" for k in keys)[:300]
    return f"{got!r} (bf16: {want!r})"


def _where(exc: BaseException) -> str:
    frames = traceback.extract_tb(exc.__traceback__)
    return f"{Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else "?"
