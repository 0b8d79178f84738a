"""cq: convert .safetensors weights to quantized checkpoints that ComfyUI loads natively.

The Python API mirrors the CLI::

    import cq_core
    report = cq_core.convert("model.safetensors", format="float8_e4m3fn")
"""

from cq_core.convert import convert
from cq_core.errors import CqError, PluginError, UsageError
from cq_core.hookspecs import hookimpl
from cq_core.plugins import get_registry
from cq_core.types import (
    Detection,
    Format,
    LayerInfo,
    MetadataWriter,
    ModelFilter,
    OptimizeContext,
    OptimizeResult,
    Optimizer,
    Option,
    TensorSpec,
)

__version__ = "0.1.0"

__all__ = [
    "CqError",
    "Detection",
    "Format",
    "LayerInfo",
    "MetadataWriter",
    "ModelFilter",
    "OptimizeContext",
    "OptimizeResult",
    "Optimizer",
    "Option",
    "PluginError",
    "TensorSpec",
    "UsageError",
    "convert",
    "get_registry",
    "hookimpl",
]
