"""cq: convert .safetensors weights to quantized checkpoints that ComfyUI loads natively.

The Python API mirrors the CLI::

    import cq_core
    report = cq_core.convert("model.safetensors", format="float8_e4m3fn")
"""

import warnings

# Before anything imports torch: huge pages for large CPU tensors (cq_core/memory.py).
from cq_core.memory import ask_torch_for_huge_pages

ask_torch_for_huge_pages()

# torch warns at import when numpy is absent; cq never hands tensors to numpy.
warnings.filterwarnings("ignore", message="Failed to initialize NumPy")

from cq_core.convert import convert  # noqa: E402 (after the filter and the huge-page switch)
from cq_core.errors import CqError, PluginError, UsageError  # noqa: E402
from cq_core.hookspecs import hookimpl  # noqa: E402
from cq_core.layouts import LayoutConverter, TensorAssembly  # noqa: E402
from cq_core.plugins import get_registry  # noqa: E402
from cq_core.types import (  # noqa: E402
    Contract,
    Detection,
    Format,
    LayerInfo,
    MetadataWriter,
    ModelFilter,
    OptimizeContext,
    OptimizeResult,
    Optimizer,
    Option,
    ShapeRead,
    TensorRule,
    TensorSpec,
)

__version__ = "0.1.0"

__all__ = [
    "Contract",
    "CqError",
    "Detection",
    "Format",
    "LayerInfo",
    "LayoutConverter",
    "MetadataWriter",
    "ModelFilter",
    "OptimizeContext",
    "OptimizeResult",
    "Optimizer",
    "Option",
    "PluginError",
    "ShapeRead",
    "TensorAssembly",
    "TensorRule",
    "TensorSpec",
    "UsageError",
    "convert",
    "get_registry",
    "hookimpl",
]
