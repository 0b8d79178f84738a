"""Round-to-nearest: the format's own scales and plain rounding. The baseline."""

from __future__ import annotations

import torch

from cq_core.hookspecs import hookimpl
from cq_core.types import Format, OptimizeContext, OptimizeResult, Optimizer


class RoundToNearest(Optimizer):
    name = "rtn"
    description = "Round each weight to the nearest representable value (fast; the baseline)."

    def optimize(self, weight: torch.Tensor, fmt: Format, context: OptimizeContext) -> OptimizeResult:
        return OptimizeResult(fmt.encode(weight))


@hookimpl
def cq_register_optimizers(register):
    register(RoundToNearest)
