"""Round-to-nearest: the format's own scales and plain rounding. The baseline."""

from __future__ import annotations

import torch

from cq_core.plugin.hookspecs import hookimpl
from cq_core.plugin.types import Format, OptimizeContext, Optimizer, OptimizeResult


class RoundToNearest(Optimizer):
    name = "rtn"
    description = "Round each weight to the nearest representable value (fast; the baseline)."
    elementwise = False  # a format's own encode rounds in whatever basis its grid lives in

    def optimize(self, weight: torch.Tensor, fmt: Format, context: OptimizeContext) -> OptimizeResult:
        if context.measure:  # the format may measure while it encodes: one pass less
            tensors, signal, noise = fmt.encode_measured(weight)
            return OptimizeResult(tensors, energies=(signal, noise))
        return OptimizeResult(fmt.encode(weight))


@hookimpl
def cq_register_optimizers(register):
    register(RoundToNearest)
