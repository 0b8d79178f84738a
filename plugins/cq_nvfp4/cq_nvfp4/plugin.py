"""cq plugin entry point of cq-nvfp4."""

from cq_core import hookimpl
from cq_nvfp4.nvfp4 import Nvfp4Format


@hookimpl
def cq_register_formats(register):
    register(Nvfp4Format)
