"""What the node pack asks of the ComfyUI it runs in.

Each answer comes from that ComfyUI's own modules, imported when asked (never at
import time, so the package also imports outside ComfyUI):

- the quantized formats it loads: ``comfy.quant_ops.QUANT_ALGOS`` (ComfyUI 0.30:
  ``float8_e4m3fn``, ``float8_e5m2``, ``nvfp4``, ``mxfp8`` when comfy-kitchen has
  it, ``int8_tensorwise``, ``convrot_w4a4``; ``comfy/ops.py`` raises ``KeyError``
  on a layer of any other format);
- where to quantize: the CPU under ``--cpu`` (``comfy.cli_args.args.cpu``),
  else ComfyUI's own device (``comfy.model_management.get_torch_device``) when it
  is a CUDA device;
- room on that device: ``comfy.model_management.unload_all_models`` and
  ``soft_empty_cache`` before a conversion, so ComfyUI's loaded models (left on
  the GPU after the capture runs) do not share it with cq.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable


def in_comfyui() -> bool:
    """True inside a ComfyUI process (its ``folder_paths`` module imports)."""
    try:
        importlib.import_module("folder_paths")
    except ImportError:
        return False
    return True


def comfyui_version() -> str:
    """The running ComfyUI's version (``comfyui_version.py``), or ``"unknown"``."""
    try:
        return importlib.import_module("comfyui_version").__version__
    except (ImportError, AttributeError):
        return "unknown"


def loaded_formats() -> frozenset[str]:
    """The layer formats the running ComfyUI loads: the keys of its ``QUANT_ALGOS``.

    Empty when it has no ``comfy.quant_ops`` (a ComfyUI older than its quantized-layer
    loader loads none of cq's formats) or when no ComfyUI is running.
    """
    try:
        quant_ops = importlib.import_module("comfy.quant_ops")
    except ImportError:
        return frozenset()
    return frozenset(getattr(quant_ops, "QUANT_ALGOS", {}))


def loadable(formats: Iterable[str]) -> list[str]:
    """``formats`` (cq's names) that the running ComfyUI loads, sorted."""
    loaded = loaded_formats()
    return sorted(name for name in formats if name in loaded)


def quantize_device() -> str:
    """``"cpu"`` under ComfyUI's ``--cpu`` or without a CUDA device; else ComfyUI's CUDA device (``"cuda:0"``)."""
    cli_args = importlib.import_module("comfy.cli_args")
    if cli_args.args.cpu:
        return "cpu"
    model_management = importlib.import_module("comfy.model_management")
    device = model_management.get_torch_device()
    return str(device) if getattr(device, "type", None) == "cuda" else "cpu"


def free_device_memory(device: str) -> None:
    """On a CUDA device: unload every model ComfyUI holds there and return its cached memory."""
    if not device.startswith("cuda"):
        return
    model_management = importlib.import_module("comfy.model_management")
    model_management.unload_all_models()
    model_management.soft_empty_cache()


def raise_if_interrupted() -> None:
    """ComfyUI's Cancel button: raises its ``InterruptProcessingException`` once the user asked."""
    importlib.import_module("comfy.model_management").throw_exception_if_processing_interrupted()
