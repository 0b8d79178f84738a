"""The node classes, in ComfyUI's custom-node convention (``INPUT_TYPES``,
``RETURN_TYPES``, ``FUNCTION``, ``CATEGORY``, ``IS_CHANGED``; ComfyUI ``nodes.py``).

ComfyUI's own modules (``folder_paths``, ``comfy.*``) are imported when a node
runs or lists its inputs, so this package also imports outside ComfyUI.
Statistics files live in ComfyUI's model folder ``cq_calibration``
(``models/cq_calibration``, registered here when ComfyUI has no such folder yet).

Errors a user can act on name the node's widgets (``overwrite``,
``calibration``), never cq's command-line flags: the common preconditions are
checked here before cq is called.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from cq_core import GPU_CHOICES, HIGH_PRECISION, CqError, Recipe, UsageError, convert, get_registry
from cq_core.numerics.second_moment import BOUNDED_RANK

from . import running_comfyui
from .capture import capture_while_sampling
from .freshness import RunRecords, input_stamp
from .model_files import MODEL_FOLDERS, resolve_source, source_files
from .report_text import report_text, size_text
from .statistics_files import CALIBRATION_FOLDER, calibration_files, calibration_path, misfit

CATEGORY = "cq"
NO_CALIBRATION = "none"
AUTO_PRESET = "auto"
ANY_GPU = "any"
DEFAULT_FORMAT = "float8_e4m3fn"
#: The stock node that loads a file of each folder (ComfyUI's display names).
LOADERS = {"diffusion_models": "Load Diffusion Model", "checkpoints": "Load Checkpoint",
           "text_encoders": "Load CLIP"}
#: Preset categories (``ModelFilter.category``) of models in the folders the node reads;
#: ``vae`` and ``vision`` presets are for files these folders do not hold.
PRESET_CATEGORIES = ("diffusion", "image", "video", "text", "audio")


class CaptureCalibration:
    """Record the diffusion model's per-Linear input statistics while sampling runs.

    Place it between the model loader and the sampler. Every sampling run that
    uses the returned MODEL (all steps, every prompt, both CFG branches) adds its
    statistics to the file, so queued runs accumulate; the file is rewritten
    atomically after each run. ``rank``: rows of each layer's sketch (bounded
    memory, 1.84 GB for FLUX.1-dev at 512); 0 keeps the exact H (small models only).
    A file that holds another model's statistics is refused here, before sampling.
    """

    CATEGORY = CATEGORY
    FUNCTION = "capture"
    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The same model; every sampling run through it adds to the statistics file.",)
    DESCRIPTION = (
        "Records per-layer input statistics of the diffusion model while your sampler runs; "
        "adds them to a file in models/cq_calibration after every run, for 'Quantize model (cq)' "
        "and 'cq convert --calibration'."
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The diffusion model from its loader."}),
                "calibration_name": ("STRING", {
                    "default": "calibration",
                    "tooltip": "File in models/cq_calibration (.safetensors added); one per model: "
                               "statistics of another model under this name are refused."}),
                "rank": ("INT", {"default": BOUNDED_RANK, "min": 0, "max": 4096, "step": 32,
                                 "tooltip": "Sketch rows per layer (bounds memory: 1.84 GB for FLUX.1-dev at 512); "
                                            "0 keeps the exact statistics (small models only)."}),
                "accumulate_on": (["model device", "cpu"], {
                    "tooltip": "Where the statistics accumulate while sampling: the model's device (fast) "
                               "or the CPU (no GPU memory)."}),
            }
        }

    def capture(self, model, calibration_name: str, rank: int, accumulate_on: str):
        path = calibration_path(calibration_name)
        if path.is_file():
            linears = {name: m.in_features for name, m in model.model.diffusion_model.named_modules()
                       if isinstance(m, torch.nn.Linear)}
            why = misfit(path, linears)
            if why is not None:
                raise UsageError(
                    f"calibration_name {calibration_name!r}: {path.name} holds statistics of another model ({why}); "
                    "choose another calibration_name, or delete that file to start again."
                )
        device = "cpu" if accumulate_on == "cpu" else None
        return (capture_while_sampling(model, path, rank=rank, device=device),)


def output_name(source: Path, fmt: str, optimizer: str, budget: str | None = None) -> str:
    """``<stem>_<format>[_<optimizer>].safetensors``; with a size budget its label replaces the format."""
    parts = [source.stem, budget or fmt]
    if optimizer != "rtn":
        parts.append(optimizer)
    return "_".join(parts) + ".safetensors"


def _budget_label(target_size: str, bits_per_weight: float, gpu: str | None) -> str:
    label = re.sub(r"\s+", "", target_size) if target_size else f"{bits_per_weight:g}bpw"
    return label + (f"-{gpu}" if gpu else "")


class QuantizeModel:
    """Quantize a model file from ComfyUI's model folders into the same folder.

    The output name is the input's stem plus the format (or the size budget)
    and the optimizer when it is not round-to-nearest; an existing file of that
    name is replaced only with ``overwrite``. Progress shows on the node
    (``comfy.utils.ProgressBar``); the report shows on the node and comes out
    as a STRING. The node runs again whenever the model file, the statistics
    file, the output file or a widget changed since its last run
    (:mod:`cq_comfyui.freshness`), and otherwise reuses that run's result.
    """

    CATEGORY = CATEGORY
    FUNCTION = "quantize"
    OUTPUT_NODE = True
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("report",)
    OUTPUT_TOOLTIPS = ("The report shown on the node: warnings, sizes, what a size budget chose, each layer.",)
    DESCRIPTION = (
        "Quantizes a .safetensors model with cq into a file beside it (formats this ComfyUI loads), "
        "optionally with calibration statistics and a size budget; load the result with "
        "'Load Diffusion Model' (refresh the lists with R)."
    )

    records = RunRecords()

    @classmethod
    def INPUT_TYPES(cls):
        registry = get_registry()
        in_comfyui = running_comfyui.in_comfyui()
        formats = running_comfyui.loadable(registry.formats) if in_comfyui else sorted(registry.formats)
        presets = sorted(name for name, f in registry.model_filters.items() if f.category in PRESET_CATEGORIES)
        optimizers = sorted(registry.optimizers)
        calibration = [NO_CALIBRATION, *(calibration_files() if in_comfyui else [])]
        version = running_comfyui.comfyui_version() if in_comfyui else "unknown"
        return {
            "required": {
                "model_file": (source_files() if in_comfyui else [], {
                    "tooltip": f"A .safetensors model in ComfyUI's {', '.join(MODEL_FOLDERS)} folders "
                               "(quantized files are left out)."}),
                "format": (formats or [DEFAULT_FORMAT], {
                    "default": DEFAULT_FORMAT if DEFAULT_FORMAT in formats else (formats or [DEFAULT_FORMAT])[0],
                    "tooltip": f"The layer format: those this ComfyUI ({version}) loads (its "
                               "comfy.quant_ops.QUANT_ALGOS); with a size budget, the format it chooses "
                               "against keeping a layer in bf16 (unless gpu is set)."}),
                "preset": ([AUTO_PRESET, "none", *presets], {
                    "tooltip": "Which layers stay in high precision: 'auto' detects the model family; "
                               "'none' quantizes every Linear layer ComfyUI would load quantized."}),
                "optimizer": (optimizers, {
                    "default": "rtn",
                    "tooltip": "How the stored values are chosen: rtn (round to nearest), or gptq/learned, "
                               "which need calibration statistics."}),
                "calibration": (calibration, {
                    "tooltip": "Statistics from 'Capture calibration (cq)' (models/cq_calibration), for "
                               "gptq/learned and a size budget's error measure."}),
                "overwrite": ("BOOLEAN", {
                    "default": False,
                    "tooltip": "Replace an existing output file of the same name."}),
            },
            "optional": {
                "target_size": ("STRING", {
                    "default": "",
                    "tooltip": "Size budget for the output file (e.g. 12GB): each layer's format is chosen by "
                               "measured error to fit it. Empty: no budget."}),
                "bits_per_weight": ("FLOAT", {
                    "default": 0.0, "min": 0.0, "max": 32.0, "step": 0.1,
                    "tooltip": "Size budget as output bits per parameter (e.g. 5.5) instead of target_size; "
                               "0: no budget."}),
                "gpu": ([ANY_GPU, *GPU_CHOICES], {
                    "tooltip": "With a size budget: choose among the formats ComfyUI runs natively on this GPU "
                               "family (and bf16); 'any': between format and bf16."}),
                "after_sampling": ("*", {
                    "tooltip": "Link any output of the sampler here (e.g. its LATENT) so this node runs after "
                               "that sampling run in the same queued prompt, with its statistics."}),
            },
            "hidden": {"unique_id": "UNIQUE_ID", "prompt": "PROMPT"},
        }

    @classmethod
    def IS_CHANGED(cls, model_file, format, preset, optimizer, calibration, overwrite, target_size="",
                   bits_per_weight=0.0, gpu=ANY_GPU, **_links):
        try:
            job = QuantizeJob(model_file, format, preset, optimizer, calibration, overwrite, target_size,
                              bits_per_weight, gpu)
        except CqError:
            return float("nan")  # runs, and says what is wrong
        return cls.records.token(job.target, job.inputs())

    def quantize(self, model_file: str, format: str, preset: str, optimizer: str, calibration: str,
                 overwrite: bool, target_size: str = "", bits_per_weight: float = 0.0, gpu: str = ANY_GPU,
                 after_sampling=None, unique_id=None, prompt=None):
        import comfy.utils

        job = QuantizeJob(model_file, format, preset, optimizer, calibration, overwrite, target_size,
                          bits_per_weight, gpu)
        inputs = job.inputs()
        run = self.records.current(job.target, inputs)
        if run is not None:  # ComfyUI dropped its cache, nothing changed: the file there is this run's
            text = f"{job.target.name} is up to date (written by this node from the same files and widgets).\n" + run.result
            return {"ui": {"text": [text]}, "result": (text,)}
        job.check()
        warnings = job.dry_run_warnings()
        device = running_comfyui.quantize_device()
        running_comfyui.free_device_memory(device)
        bar = comfy.utils.ProgressBar(1, node_id=unique_id)

        def progress(done: int, total: int) -> None:
            running_comfyui.raise_if_interrupted()
            bar.update_absolute(done, total)

        report = convert(job.source, job.target, recipe=job.recipe(),
                         calibration=job.statistics if job.reads_statistics else None,
                         overwrite=overwrite, progress=progress, device=device)
        text = report_text(report, warnings, gpu=job.gpu, preset_chosen=preset != AUTO_PRESET,
                           note=f"quantized on {device}; load it with '{LOADERS[job.folder]}' (refresh the lists "
                                "with R).")
        self.records.record(job.target, inputs, text)
        return {"ui": {"text": [text]}, "result": (text,)}


class QuantizeJob:
    """One Quantize request, checked in the node's words before cq runs.

    Raises :class:`UsageError` (naming the widget) for a model file, format,
    optimizer, statistics file or size budget the run cannot use.
    """

    def __init__(self, model_file, fmt, preset, optimizer, calibration, overwrite, target_size, bits_per_weight,
                 gpu):
        self.registry = get_registry()
        self.folder, self.source = resolve_source(model_file)
        self.model_file, self.format, self.preset, self.optimizer = model_file, fmt, preset, optimizer
        self.calibration, self.overwrite = calibration, overwrite
        self.target_size, self.bits_per_weight = (target_size or "").strip(), float(bits_per_weight or 0.0)
        self.gpu = None if gpu in (None, "", ANY_GPU) else gpu
        self.statistics = self._statistics_path()
        budget = self._budget_fields()
        self.budget = budget
        label = _budget_label(self.target_size, self.bits_per_weight, self.gpu) if budget else None
        self.target = self.source.parent / output_name(self.source, fmt, optimizer, label)

    def _statistics_path(self) -> Path | None:
        if self.calibration in (None, "", NO_CALIBRATION):
            return None
        import folder_paths

        path = folder_paths.get_full_path(CALIBRATION_FOLDER, self.calibration)
        if path is None:
            raise UsageError(f"calibration {self.calibration!r} is not in models/{CALIBRATION_FOLDER} "
                             "(refresh the lists with R).")
        return Path(path)

    def _budget_fields(self) -> dict:
        if self.target_size and self.bits_per_weight:
            raise UsageError("target_size and bits_per_weight both set the size budget; leave one of them empty (0).")
        fields: dict = {}
        if self.target_size:
            try:
                fields["target_size"] = Recipe(target_size=self.target_size).target_size
            except UsageError:
                raise UsageError(f"target_size {self.target_size!r} is not a size like 12GB, 500MB or 2GiB.") from None
        elif self.bits_per_weight:
            fields["bits_per_weight"] = self.bits_per_weight
        if self.gpu is not None:
            if not fields:
                raise UsageError(f"gpu {self.gpu!r} chooses formats for a size budget: set target_size or "
                                 "bits_per_weight too (or gpu to 'any').")
            native = [name for name, cls in self.registry.formats.items() if self.gpu in cls.native_gpus]
            loads = set(running_comfyui.loadable(native)) if running_comfyui.in_comfyui() else set(native)
            fields["formats"] = [f for f in native if f in loads and f in self.registry.formats] + [HIGH_PRECISION]
        return fields

    def inputs(self):
        """What a run reads (:func:`cq_comfyui.freshness.input_stamp`)."""
        widgets = dict(model_file=self.model_file, format=self.format, preset=self.preset, optimizer=self.optimizer,
                       calibration=self.calibration, target_size=self.target_size,
                       bits_per_weight=self.bits_per_weight, gpu=self.gpu)
        return input_stamp(widgets, {"source": self.source, "statistics": self.statistics})

    @property
    def reads_statistics(self) -> bool:
        """Whether this job's budget or optimizer reads the calibration statistics (the node
        says so in its own words when not, and does not hand them to cq)."""
        optimizer = self.registry.optimizers.get(self.optimizer)
        return bool(self.budget) or (optimizer is not None and optimizer().uses_calibration)

    def recipe(self, **override) -> Recipe:
        fields = dict(format=self.format, optimizer=self.optimizer,
                      preset=None if self.preset == AUTO_PRESET else self.preset, **self.budget)
        fields.update(override)
        return Recipe(**fields)

    def check(self) -> None:
        """The preconditions cq would refuse in its command-line words, in the node's."""
        if running_comfyui.in_comfyui() and self.format not in running_comfyui.loaded_formats():
            raise UsageError(f"format {self.format!r}: this ComfyUI ({running_comfyui.comfyui_version()}) cannot "
                             "load it; choose one the list offers.")
        optimizer = self.registry.optimizers.get(self.optimizer)
        if optimizer is not None and optimizer.needs_calibration and self.statistics is None:
            raise UsageError(f"optimizer {self.optimizer!r} needs calibration statistics: choose a file in "
                             "'calibration' (from 'Capture calibration (cq)' after a few sampling runs), "
                             "or optimizer 'rtn'.")
        size = self.source.stat().st_size
        target = self.budget.get("target_size")
        if target is not None and target >= size:
            raise UsageError(f"target_size {self.target_size} is not below {self.model_file}'s "
                             f"{size_text(size)}: there is nothing to quantize for it.")
        if self.target.exists() and not self.overwrite:
            raise UsageError(f"{self.target.name} already exists in {self.folder}; turn on 'overwrite' to replace it.")

    def dry_run_warnings(self) -> list[str]:
        """Plan the conversion (header only) and say, before anything is written, what would be useless.

        Raises :class:`UsageError` when nothing would be quantized or the statistics
        belong to another model; returns the node's warnings (a preset the file does
        not look like, statistics rtn ignores, bits per weight above the source's).
        """
        plan = convert(self.source, self.target, recipe=self.recipe(optimizer="rtn", target_size=None,
                                                                     bits_per_weight=None, formats=()),
                       dry_run=True)
        warnings = []
        quantized = {t.name.removesuffix(".weight"): t.shape[-1] for t in plan.quantized}
        if not quantized and not self.budget:
            kept = next((t for t in plan.tensors if t.action == "keep" and len(t.shape) == 2), None)
            why = f" (e.g. {kept.name}: {kept.reason})" if kept else " (it holds no 2-D weight)"
            raise UsageError(f"nothing in {self.model_file} would be quantized to {self.format}{why}; "
                             "no file written.")
        if self.statistics is not None and quantized:
            why = misfit(self.statistics, quantized)
            if why is not None:
                raise UsageError(f"calibration {self.calibration!r} holds statistics of another model ({why}); "
                                 "capture them on this model, or choose another file.")
        if self.statistics is not None and not self.reads_statistics:
            warnings.append(f"optimizer {self.optimizer} does not use the calibration statistics; "
                            "gptq or learned do.")
        if self.bits_per_weight and plan.total_params and self.bits_per_weight * plan.total_params / 8 >= plan.input_bytes:
            raise UsageError(f"bits_per_weight {self.bits_per_weight:g} is not below {self.model_file}'s "
                             f"{8 * plan.input_bytes / plan.total_params:.2f} (its file size per parameter): "
                             "there is nothing to quantize for it.")
        if self.preset not in (AUTO_PRESET,):
            detected = self._detected_preset()
            if detected is not None and detected[0] != self.preset:
                warnings.append(f"preset {self.preset} was chosen, but {self.model_file} looks like "
                                f"{detected[0]} ({detected[1]}); 'auto' would use {detected[0]}.")
        return warnings

    def _detected_preset(self) -> tuple[str, str] | None:
        from safetensors import safe_open

        with safe_open(str(self.source), framework="pt") as f:
            keys, metadata = list(f.keys()), dict(f.metadata() or {})
        found = self.registry.detect_model(keys, metadata)
        return None if found is None else (found.preset, found.reason)


NODE_CLASS_MAPPINGS = {
    "CqCaptureCalibration": CaptureCalibration,
    "CqQuantizeModel": QuantizeModel,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "CqCaptureCalibration": "Capture calibration (cq)",
    "CqQuantizeModel": "Quantize model (cq)",
}
