"""cq plugin entry point of cq-nvfp4."""

from cq_core import hookimpl
from cq_nvfp4.imports import CompressedTensorsNvfp4, FireworksNvfp4, ModelOptNvfp4
from cq_nvfp4.nvfp4 import Nvfp4Format


@hookimpl
def cq_register_formats(register):
    register(Nvfp4Format)


@hookimpl
def cq_register_migrations(register):
    # Other producers' NVFP4 into ComfyUI's (cq_nvfp4/imports.py).
    register(ModelOptNvfp4)
    register(CompressedTensorsNvfp4)
    register(FireworksNvfp4)
