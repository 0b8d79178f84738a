"""cq: convert .safetensors weights to quantized checkpoints that ComfyUI loads natively.

The Python API mirrors the CLI::

    import cq_core
    report = cq_core.convert("model.safetensors", format="float8_e4m3fn")
    report = cq_core.convert("model.safetensors", recipe=cq_core.Recipe(format="nvfp4", optimizer="gptq"),
                             calibration="stats.safetensors")
"""

import importlib
import warnings

# Before anything imports torch: huge pages for large CPU tensors (cq_core/io/memory.py).
from cq_core.io.memory import ask_torch_for_huge_pages

ask_torch_for_huge_pages()

# torch warns at import when numpy is absent; cq never hands tensors to numpy.
warnings.filterwarnings("ignore", message="Failed to initialize NumPy")

#: Public name -> the module that defines it. Imported on first use (PEP 562), so
#: ``import cq_core`` (and the ``cq`` entry point) loads no torch until a name is used.
_EXPORTS = {
    "convert": "cq_core.commands.convert",
    "Recipe": "cq_core.engine.recipe",
    "RunSettings": "cq_core.engine.run",
    # a size budget's choices, for front ends that offer them (the ComfyUI node's GPU list)
    "GPU_CHOICES": "cq_core.engine.budget",
    "HIGH_PRECISION": "cq_core.engine.budget",
    "StatisticsCapture": "cq_core.engine.capture",
    "CqError": "cq_core.errors",
    "PluginError": "cq_core.errors",
    "UsageError": "cq_core.errors",
    "TensorInfo": "cq_core.io.safetensors_io",
    "TensorSpec": "cq_core.io.safetensors_io",
    **dict.fromkeys(
        ("Conversion", "ExecutionSettings", "Executor", "PortableTensor", "TensorJob", "TensorLocation"),
        "cq_core.plugin.executors",
    ),
    **dict.fromkeys(("comfyui_loads", "first_comfyui_version"), "cq_core.plugin.comfyui_versions"),
    "CheckpointDraft": "cq_core.plugin.draft",
    "Migration": "cq_core.plugin.draft",
    "ForeignImport": "cq_core.plugin.draft",
    "ForeignLayer": "cq_core.plugin.draft",
    "Note": "cq_core.plugin.draft",
    "hookimpl": "cq_core.plugin.hookspecs",
    "LayoutConverter": "cq_core.plugin.layouts",
    "TensorAssembly": "cq_core.plugin.layouts",
    "Registry": "cq_core.plugin.manager",
    "get_registry": "cq_core.plugin.manager",
    **dict.fromkeys(
        ("FLOAT_SCALE_DTYPES", "Contract", "Detection", "Format", "GridBasis", "LayerInfo", "LegacyLayer", "MetadataWriter", "ModelFilter",
         "OptimizeContext", "OptimizeResult", "Optimizer", "Option", "ShapeRead", "TensorRule", "Tensors",
         "one_element", "same_as_weight"),
        "cq_core.plugin.types",
    ),
}

__version__ = "0.1.0"

#: The plugin contract (what a plugin imports) and the Python API. Helpers for
#: formats and optimizers live in :mod:`cq_core.numerics`.
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'cq_core' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
