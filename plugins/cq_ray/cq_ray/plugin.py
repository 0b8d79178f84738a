"""cq plugin entry point of cq-ray."""

from cq_core import hookimpl
from cq_ray.executor import RayExecutor


@hookimpl
def cq_register_executors(register):
    register(RayExecutor)
