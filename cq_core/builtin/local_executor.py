"""The built-in executor: the per-tensor work on threads of this process, or on its CUDA device.

On the CPU, parallelism is across tensors: one single-threaded worker per
thread (``--threads``, default: the available cores). Intra-op threads stall
at every barrier on a busy machine (measured 4x slower, docs/performance.md),
and whole tensors need no synchronisation at all. On CUDA one worker feeds
the device; reading and writing overlap it on their own threads.
"""

from __future__ import annotations

import os

import torch

from cq_core.plugin.executors import Conversion, Executor
from cq_core.plugin.hookspecs import hookimpl


def available_cores() -> int:
    """The CPU cores this process may run on (its affinity on Linux)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


class LocalExecutor(Executor):
    name = "local"
    description = "threads of this process (--threads), or its CUDA device (--device)"
    in_process = True

    def run(self, conversion: Conversion) -> None:
        device = conversion.device
        settings = conversion.settings
        workers = settings.threads or available_cores() if device.type == "cpu" and settings.pipelined else 1
        previous_threads = torch.get_num_threads()
        if workers > 1:
            torch.set_num_threads(1)
        elif settings.threads is not None:
            torch.set_num_threads(settings.threads)
        try:
            conversion.stream(lambda job, tensor: job.run(tensor, device, job.statistics()), workers=workers)
        finally:
            torch.set_num_threads(previous_threads)


@hookimpl
def cq_register_executors(register):
    register(LocalExecutor)
