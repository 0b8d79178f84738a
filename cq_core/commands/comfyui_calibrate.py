"""``cq calibrate CHECKPOINT --comfyui PATH``: statistics of a diffusion model built
and sampled by a ComfyUI install, without a running UI.

The diffusion counterpart of ``--random-tokens``: the model is loaded with that
ComfyUI's own loader (``comfy.sd.load_diffusion_model``: its detection, its
classes, its key names), and ComfyUI's own sampler (``comfy.sample.sample``,
the call the KSampler node makes) runs it from random noise over the whole
timestep range of the chosen sampler and scheduler (denoise 1.0), each run with
its own random conditioning (or the one given), its own seed, and, with ``cfg``
above 1, both CFG branches. A :class:`~cq_core.commands.calibrate.StatisticsCapture`
on the diffusion model's Linear layers records every step, with memory bounded
by the sketch ``rank`` (held in bfloat16); the names are the model's module names, which are the
keys of a diffusion-model file.

Random conditioning has the text encoder's width, read from the model's config
(``unet_config``: ``context_in_dim`` for FLUX, ``context_dim`` for UNets, ...)
or else from the Linear layer that reads it (``text_embedding.0`` for WAN),
and unit variance; a ``--conditioning`` file
(safetensors) gives real encoder outputs instead: ``context`` (B, T, D) and,
for models that read a pooled vector, ``pooled_output`` (B, D').
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable
from typing import Any

import torch

from cq_core.engine.capture import StatisticsCapture, run_batches
from cq_core.errors import CqError, UsageError
from cq_core.numerics.second_moment import BOUNDED_RANK, BOUNDED_SKETCH_DTYPE

#: ``unet_config`` keys that give the width of the text conditioning, by model family.
CONTEXT_WIDTH_KEYS = ("context_in_dim", "text_dim", "context_dim", "joint_attention_dim", "cap_feat_dim")
#: Linear layers that take the text conditioning, when the config leaves its width at the
#: class default (WAN's ``text_dim``): their input width is the conditioning's.
CONTEXT_INPUT_LAYERS = ("txt_in", "text_embedding.0", "context_embedder", "cap_embedder.1")
#: ``unet_config`` keys that give the width of a pooled conditioning vector.
POOLED_WIDTH_KEYS = ("vec_in_dim", "adm_in_channels", "pooled_projection_dim")


def resolve_comfyui_device(device: str | None) -> str:
    """``--device``: ``auto`` (None) is CUDA when this torch has a CUDA device, else ``cpu``;
    ``cpu``, ``cuda`` and ``cuda:N`` are taken as given (``cuda`` on a torch without one is refused).

    Raises :class:`UsageError` for any other name.
    """
    name = "auto" if device is None else str(device).strip().lower()
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return name
    if re.fullmatch(r"cuda(:\d+)?", name):
        if not torch.cuda.is_available():
            raise UsageError(f"--device {device}: this torch ({torch.__version__}) has no CUDA device; "
                             "use --device cpu (or auto).")
        return name
    raise UsageError(f"--device {device!r} must be auto, cpu, cuda or cuda:N.")


def import_comfyui(root: str | os.PathLike, device: str = "cpu") -> Any:
    """The ``comfy`` package of the ComfyUI install at ``root`` (imported on first use), set to
    run on ``device`` (from :func:`resolve_comfyui_device`).

    ComfyUI picks its device once, when ``comfy.model_management`` is imported: the
    CPU only when its ``--cpu`` flag (``comfy.cli_args.args.cpu``) is set, otherwise
    CUDA (on a CPU-only torch that fails with "Torch not compiled with CUDA
    enabled"). So the flag is set first for ``cpu``, and ``cuda:N`` becomes torch's
    current device, as ComfyUI's ``--cuda-device`` does.

    Raises :class:`UsageError` when ``root`` holds no ComfyUI or another ComfyUI
    is already imported in this process.
    """
    root = Path(root).resolve()
    if not (root / "comfy" / "sd.py").is_file():
        raise UsageError(f"--comfyui {root}: not a ComfyUI folder (no comfy/sd.py).")
    loaded = sys.modules.get("comfy")
    if loaded is not None:
        where = Path(getattr(loaded, "__file__", None) or next(iter(getattr(loaded, "__path__", [])), ""))
        if root not in where.resolve().parents:
            raise UsageError(f"--comfyui {root}: another ComfyUI is already imported (from {where.parent}).")
    elif str(root) not in sys.path:
        sys.path.insert(0, str(root))
    saved_argv, sys.argv = sys.argv, sys.argv[:1]  # ComfyUI parses the command line on import
    try:
        import comfy.cli_args

        if device == "cpu":
            comfy.cli_args.args.cpu = True
        elif device.startswith("cuda:"):
            torch.cuda.set_device(int(device.split(":")[1]))
        import comfy.model_management  # noqa: F401
        import comfy.sample  # noqa: F401
        import comfy.samplers  # noqa: F401
        import comfy.sd
    except ImportError as exc:
        raise UsageError(f"--comfyui {root}: ComfyUI cannot be imported here ({exc}).") from None
    finally:
        sys.argv = saved_argv
    return sys.modules["comfy"]


@dataclass
class SamplingPlan:
    """What each calibration run samples: ``runs`` runs of ``steps`` steps at ``cfg``
    with ``sampler``/``scheduler`` (ComfyUI's names), latents of ``latent_size``
    (height, width) and ``frames`` latent frames for video models, ``tokens``
    random conditioning tokens."""

    runs: int = 8
    steps: int = 8
    cfg: float = 3.5
    sampler: str = "euler"
    scheduler: str = "simple"
    latent_size: tuple[int, int] = (32, 32)
    frames: int = 3
    tokens: int = 64
    seed: int = 0

    def check(self) -> None:
        if self.runs < 1 or self.steps < 1:
            raise UsageError("--runs and --steps must be at least 1.")
        if min(self.latent_size) < 1 or self.frames < 1 or self.tokens < 1:
            raise UsageError("--latent-size, --frames and --tokens must be positive.")


def parse_latent_size(spec: str) -> tuple[int, int]:
    """``--latent-size`` ``HEIGHTxWIDTH`` (or one number for a square) as ``(height, width)``."""
    parts = spec.lower().split("x")
    try:
        size = tuple(int(p) for p in parts)
    except ValueError:
        size = ()
    if len(size) == 1:
        size = size * 2
    if len(size) != 2 or min(size) < 1:
        raise UsageError(f"--latent-size {spec!r} must be HEIGHTxWIDTH in latent pixels, e.g. 64x64.")
    return size


def _config_width(unet_config: dict, keys: tuple[str, ...]) -> int | None:
    return next((int(unet_config[k]) for k in keys if isinstance(unet_config.get(k), int)), None)


def _input_width(patcher: Any, names: tuple[str, ...]) -> int | None:
    modules = dict(patcher.model.diffusion_model.named_modules())
    return next((modules[n].in_features for n in names if isinstance(modules.get(n), torch.nn.Linear)), None)


def conditioning_for(patcher: Any, plan: SamplingPlan, generator: torch.Generator,
                     given: dict[str, torch.Tensor] | None) -> list:
    """ComfyUI conditioning (``[[context, {"pooled_output": ...}]]``) for one run."""
    if given is not None:
        context = given["context"]
        pooled = given.get("pooled_output")
    else:
        config = patcher.model.model_config.unet_config
        width = _config_width(config, CONTEXT_WIDTH_KEYS) or _input_width(patcher, CONTEXT_INPUT_LAYERS)
        if width is None:
            raise UsageError(
                "The model's config names no text-conditioning width; pass --conditioning FILE "
                "(a safetensors file with 'context' and, if the model reads one, 'pooled_output')."
            )
        context = torch.randn(1, plan.tokens, width, generator=generator)
        pooled_width = _config_width(config, POOLED_WIDTH_KEYS)
        pooled = None if pooled_width is None else torch.randn(1, pooled_width, generator=generator)
    extra = {} if pooled is None else {"pooled_output": pooled}
    return [[context, extra]]


def latent_for(patcher: Any, plan: SamplingPlan) -> torch.Tensor:
    """An empty latent of the model's channels and dimensions (images: 2, video: 3)."""
    latent_format = patcher.model.latent_format
    channels = latent_format.latent_channels
    dims = getattr(latent_format, "latent_dimensions", 2)
    if dims == 3:
        return torch.zeros(1, channels, plan.frames, *plan.latent_size)
    if dims == 2:
        return torch.zeros(1, channels, *plan.latent_size)
    raise UsageError(f"Models with {dims}-dimensional latents are not supported by --comfyui calibration.")


def load_conditioning(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """``context`` (B, T, D) and optional ``pooled_output`` (B, D') from a safetensors file."""
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
    except FileNotFoundError:
        raise UsageError(f"--conditioning {path}: no such file.") from None
    except Exception as exc:  # safetensors raises several types for a bad file
        raise UsageError(f"--conditioning {path}: not a readable safetensors file ({exc}).") from None
    if "context" not in tensors or tensors["context"].dim() != 3:
        raise UsageError(f"--conditioning {path}: needs a 'context' tensor of shape (batch, tokens, width).")
    return {k: v.float() for k, v in tensors.items() if k in ("context", "pooled_output")}


def sample_into(capture: StatisticsCapture, comfy: Any, patcher: Any, plan: SamplingPlan,
                conditioning: dict[str, torch.Tensor] | None = None,
                progress: Callable[[int, int | None], None] | None = None) -> None:
    """Run ``plan`` through ComfyUI's sampler with ``capture`` on the diffusion model;
    ``progress(number, total)`` after each sampling run."""
    plan.check()
    generator = torch.Generator().manual_seed(plan.seed)
    latent = latent_for(patcher, plan)

    def one_run(_model, number: int):
        seed = plan.seed * 1_000_003 + number
        positive = conditioning_for(patcher, plan, generator, conditioning)
        negative = conditioning_for(patcher, plan, generator, None if conditioning is None else
                                    {k: torch.zeros_like(v) for k, v in conditioning.items()})
        noise = comfy.sample.prepare_noise(latent, seed)
        comfy.sample.sample(patcher, noise, plan.steps, plan.cfg, plan.sampler, plan.scheduler, positive,
                            negative, latent, denoise=1.0, disable_pbar=True, seed=seed)

    run_batches(capture, patcher.model.diffusion_model, range(plan.runs), run=one_run, progress=progress)


def calibrate_with_comfyui(
    checkpoint: str | os.PathLike,
    comfyui: str | os.PathLike,
    output: str | os.PathLike,
    *,
    plan: SamplingPlan | None = None,
    rank: int | None = BOUNDED_RANK,
    conditioning: str | os.PathLike | None = None,
    layers: str | None = None,
    prefix: str = "",
    device: str | None = None,
    progress: Callable[[int, int | None], None] | None = None,
) -> dict[str, dict[str, torch.Tensor]]:
    """What ``cq calibrate CHECKPOINT --comfyui PATH`` does (``progress(run, runs)`` after each
    sampling run); returns the statistics. ``device``: where ComfyUI runs the model
    (``--device``: None or ``auto``, ``cpu``, ``cuda``, ``cuda:N``; :func:`resolve_comfyui_device`).

    Raises :class:`UsageError` for a missing checkpoint or ComfyUI, :class:`CqError`
    when ComfyUI cannot load the checkpoint or a run fails.
    """
    plan = plan or SamplingPlan()
    plan.check()
    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise UsageError(f"{checkpoint}: no such file.")
    comfy = import_comfyui(comfyui, resolve_comfyui_device(device))
    given = load_conditioning(conditioning) if conditioning is not None else None
    try:
        patcher = comfy.sd.load_diffusion_model(str(checkpoint))
    except Exception as exc:  # ComfyUI's own errors: say which file
        raise CqError(f"{checkpoint}: ComfyUI could not load it as a diffusion model ({type(exc).__name__}: {exc}).") from exc
    capture = StatisticsCapture(layers=layers, prefix=prefix, rank=rank, sketch_dtype=BOUNDED_SKETCH_DTYPE)
    sample_into(capture, comfy, patcher, plan, given, progress)
    capture.save(output)
    return capture.statistics()
