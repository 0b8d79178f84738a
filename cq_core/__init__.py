"""cq: convert .safetensors weights to quantized checkpoints that ComfyUI loads natively.

The Python API mirrors the CLI::

    import cq_core
    report = cq_core.convert("model.safetensors", format="float8_e4m3fn")
    report = cq_core.convert("model.safetensors", recipe=cq_core.Recipe(format="nvfp4", optimizer="gptq"),
                             calibration="stats.safetensors")
"""

import warnings

# Before anything imports torch: huge pages for large CPU tensors (cq_core/io/memory.py).
from cq_core.io.memory import ask_torch_for_huge_pages

ask_torch_for_huge_pages()

# torch warns at import when numpy is absent; cq never hands tensors to numpy.
warnings.filterwarnings("ignore", message="Failed to initialize NumPy")

from cq_core.commands.convert import convert  # noqa: E402 (after the filter and the huge-page switch)
from cq_core.engine.recipe import Recipe  # noqa: E402
from cq_core.errors import CqError, PluginError, UsageError  # noqa: E402
from cq_core.io.safetensors_io import TensorInfo, TensorSpec  # noqa: E402
from cq_core.plugin.draft import CheckpointDraft, Migration  # noqa: E402
from cq_core.plugin.hookspecs import hookimpl  # noqa: E402
from cq_core.plugin.layouts import LayoutConverter, TensorAssembly  # noqa: E402
from cq_core.plugin.manager import Registry, get_registry  # noqa: E402
from cq_core.plugin.types import (  # noqa: E402
    FLOAT_SCALE_DTYPES,
    Contract,
    Detection,
    Format,
    GridBasis,
    LayerInfo,
    MetadataWriter,
    ModelFilter,
    OptimizeContext,
    OptimizeResult,
    Optimizer,
    Option,
    ShapeRead,
    TensorRule,
    Tensors,
    one_element,
    same_as_weight,
)

__version__ = "0.1.0"

#: The plugin contract (what a plugin imports) and the Python API. Helpers for
#: formats and optimizers live in :mod:`cq_core.numerics`.
__all__ = [
    "FLOAT_SCALE_DTYPES",
    "CheckpointDraft",
    "Contract",
    "CqError",
    "Detection",
    "Format",
    "GridBasis",
    "LayerInfo",
    "LayoutConverter",
    "MetadataWriter",
    "Migration",
    "ModelFilter",
    "OptimizeContext",
    "OptimizeResult",
    "Optimizer",
    "Option",
    "PluginError",
    "Recipe",
    "Registry",
    "ShapeRead",
    "TensorAssembly",
    "TensorInfo",
    "TensorRule",
    "TensorSpec",
    "Tensors",
    "UsageError",
    "convert",
    "get_registry",
    "hookimpl",
    "one_element",
    "same_as_weight",
]
