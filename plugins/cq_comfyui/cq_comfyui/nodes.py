"""The node classes, in ComfyUI's custom-node convention (``INPUT_TYPES``,
``RETURN_TYPES``, ``FUNCTION``, ``CATEGORY``; ComfyUI ``nodes.py``).

ComfyUI's own modules (``folder_paths``, ``comfy.utils``) are imported when a
node runs or lists its inputs, so this package also imports outside ComfyUI.
Statistics files live in ComfyUI's model folder ``cq_calibration``
(``models/cq_calibration``, registered here when ComfyUI has no such folder yet).
"""

from __future__ import annotations

import os
from pathlib import Path

from cq_core import CqError, UsageError, convert, get_registry
from cq_core.numerics.second_moment import BOUNDED_RANK

from .capture import capture_while_sampling

CATEGORY = "cq"
CALIBRATION_FOLDER = "cq_calibration"
#: ComfyUI model folders whose files the Quantize node offers (folder_paths names).
MODEL_FOLDERS = ("diffusion_models", "checkpoints", "text_encoders")
NO_CALIBRATION = "none"
AUTO_PRESET = "auto"


def calibration_folder() -> Path:
    """``models/cq_calibration`` (or the first path registered under that name), created."""
    import folder_paths

    if CALIBRATION_FOLDER not in folder_paths.folder_names_and_paths:
        folder_paths.folder_names_and_paths[CALIBRATION_FOLDER] = (
            [os.path.join(folder_paths.models_dir, CALIBRATION_FOLDER)], {".safetensors"}
        )
    folder = Path(folder_paths.get_folder_paths(CALIBRATION_FOLDER)[0])
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def calibration_path(name: str) -> Path:
    """The statistics file ``name`` (relative, ``.safetensors`` added) in the calibration folder.

    Raises :class:`UsageError` for a name that leaves the folder.
    """
    folder = calibration_folder().resolve()
    file = name if name.endswith(".safetensors") else f"{name}.safetensors"
    path = (folder / file).resolve()
    if folder not in path.parents:
        raise UsageError(f"Calibration file name {name!r} must stay inside {folder}.")
    return path


class CaptureCalibration:
    """Record the diffusion model's per-Linear input statistics while sampling runs.

    Place it between the model loader and the sampler. Every sampling run that
    uses the returned MODEL (all steps, every prompt, both CFG branches) adds its
    statistics to the file, so queued runs accumulate; the file is rewritten
    atomically after each run. ``rank``: rows of each layer's sketch (bounded
    memory, 1.84 GB for FLUX.1-dev at 512); 0 keeps the exact H (small models only).
    """

    CATEGORY = CATEGORY
    FUNCTION = "capture"
    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("model",)
    DESCRIPTION = (
        "Records per-layer input statistics of the diffusion model while your sampler runs; "
        "adds them to a file in models/cq_calibration after every run, for 'Quantize model (cq)' "
        "and 'cq convert --calibration'."
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL",),
                "calibration_name": ("STRING", {"default": "calibration", "tooltip": "File in models/cq_calibration."}),
                "rank": ("INT", {"default": BOUNDED_RANK, "min": 0, "max": 4096, "step": 32,
                                 "tooltip": "Sketch rows per layer (memory bound); 0: exact H."}),
                "accumulate_on": (["model device", "cpu"], {"tooltip": "Where statistics accumulate."}),
            }
        }

    def capture(self, model, calibration_name: str, rank: int, accumulate_on: str):
        path = calibration_path(calibration_name)
        device = "cpu" if accumulate_on == "cpu" else None
        return (capture_while_sampling(model, path, rank=rank, device=device),)


def model_files() -> list[str]:
    """``folder/name`` for every model file in :data:`MODEL_FOLDERS` (ComfyUI's lists)."""
    import folder_paths

    return [f"{folder}/{name}" for folder in MODEL_FOLDERS for name in folder_paths.get_filename_list(folder)]


def output_name(source: Path, fmt: str, optimizer: str) -> str:
    suffix = fmt if optimizer == "rtn" else f"{fmt}_{optimizer}"
    return f"{source.stem}_{suffix}.safetensors"


def report_text(report) -> str:
    """The conversion report as lines for the UI: totals, then one line per quantized layer."""
    lines = [
        f"{report.input} -> {report.output}",
        f"format {report.format}, optimizer {report.optimizer}, preset {report.preset or 'none'}",
        f"{len(report.quantized)} layers quantized, {report.input_bytes / 1e9:.2f} GB -> "
        f"{report.output_bytes / 1e9:.2f} GB in {report.seconds:.1f} s",
    ]
    if report.mean_sqnr_db is not None:
        lines.append(f"mean weight SQNR {report.mean_sqnr_db:.2f} dB")
    for t in report.quantized:
        sqnr = "" if t.sqnr_db is None else f" {t.sqnr_db:.2f} dB"
        note = f" ({t.note})" if t.note else ""
        lines.append(f"  {t.name}: {t.format}{sqnr}{note}")
    return "\n".join(lines)


class QuantizeModel:
    """Quantize a model file from ComfyUI's model folders into the same folder.

    The output name is the input's stem plus the format (and the optimizer when
    it is not round-to-nearest); an existing file of that name is replaced only
    with ``overwrite``. Progress shows on the node (``comfy.utils.ProgressBar``);
    the report comes back as text.
    """

    CATEGORY = CATEGORY
    FUNCTION = "quantize"
    OUTPUT_NODE = True
    RETURN_TYPES = ("STRING", "STRING")
    RETURN_NAMES = ("report", "filename")
    DESCRIPTION = "Quantizes a model file with cq (FP8, INT8, NVFP4, MXFP8), optionally with calibration statistics."

    @classmethod
    def INPUT_TYPES(cls):
        registry = get_registry()
        calibrations = [NO_CALIBRATION]
        try:
            import folder_paths

            calibration_folder()
            calibrations += folder_paths.get_filename_list(CALIBRATION_FOLDER)
        except ImportError:  # outside ComfyUI: only the registry's lists
            pass
        return {
            "required": {
                "model_file": (model_files() if _in_comfyui() else [],),
                "format": (sorted(registry.formats), {"default": "float8_e4m3fn"}),
                "preset": ([AUTO_PRESET, "none", *sorted(registry.model_filters)],),
                "optimizer": (sorted(registry.optimizers), {"default": "rtn"}),
                "calibration": (calibrations,),
                "overwrite": ("BOOLEAN", {"default": False}),
            }
        }

    def quantize(self, model_file: str, format: str, preset: str, optimizer: str, calibration: str, overwrite: bool):
        import comfy.utils
        import folder_paths

        folder, _, name = model_file.partition("/")
        source = folder_paths.get_full_path(folder, name)
        if folder not in MODEL_FOLDERS or source is None:
            raise UsageError(f"Model file {model_file!r} is not in ComfyUI's {', '.join(MODEL_FOLDERS)} folders.")
        source = Path(source)
        target = source.parent / output_name(source, format, optimizer)
        stats = None if calibration == NO_CALIBRATION else folder_paths.get_full_path(CALIBRATION_FOLDER, calibration)
        if calibration != NO_CALIBRATION and stats is None:
            raise UsageError(f"Calibration file {calibration!r} is not in models/{CALIBRATION_FOLDER}.")
        bar = comfy.utils.ProgressBar(1)

        def progress(done: int, total: int) -> None:
            bar.update_absolute(done, total)

        try:
            report = convert(
                source, target, format=format, optimizer=optimizer, calibration=stats,
                model=None if preset == AUTO_PRESET else preset, overwrite=overwrite, progress=progress,
            )
        except CqError as exc:  # one sentence for the UI, like the CLI's
            raise RuntimeError(f"cq: {exc}") from exc
        text = report_text(report)
        return {"ui": {"text": [text]}, "result": (text, f"{folder}/{target.name}")}


def _in_comfyui() -> bool:
    try:
        import folder_paths  # noqa: F401
    except ImportError:
        return False
    return True


NODE_CLASS_MAPPINGS = {
    "CqCaptureCalibration": CaptureCalibration,
    "CqQuantizeModel": QuantizeModel,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "CqCaptureCalibration": "Capture calibration (cq)",
    "CqQuantizeModel": "Quantize model (cq)",
}
