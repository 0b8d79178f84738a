"""cq plugin entry point of cq-int8."""

from cq_core import hookimpl
from cq_int8.asym_w4a8 import AsymW4A8Int8Format
from cq_int8.blockwise import Int8BlockwiseFormat
from cq_int8.imports import HfFp8Blocks
from cq_int8.tensorwise import Int8TensorwiseFormat
from cq_int8.w4a4 import ConvrotW4A4Format


@hookimpl
def cq_register_formats(register):
    register(Int8TensorwiseFormat)
    register(Int8BlockwiseFormat)
    register(ConvrotW4A4Format)
    register(AsymW4A8Int8Format)


@hookimpl
def cq_register_migrations(register):
    # Hugging Face FP8 block scales, re-quantized into per-row INT8 (cq_int8/imports.py).
    register(HfFp8Blocks)
