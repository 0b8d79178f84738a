"""cq plugin entry point of cq-fp8."""

from cq_core import hookimpl
from cq_fp8.float8 import Float8E4M3Format, Float8E5M2Format
from cq_fp8.imports import FireworksMxfp8, HfFp8TensorScale
from cq_fp8.mxfp8 import Mxfp8Format


@hookimpl
def cq_register_formats(register):
    register(Float8E4M3Format)
    register(Float8E5M2Format)
    register(Mxfp8Format)


@hookimpl
def cq_register_migrations(register):
    # Other producers' FP8 into ComfyUI's (cq_fp8/imports.py).
    register(FireworksMxfp8)
    register(HfFp8TensorScale)
