"""Round-to-nearest: the format's own scales and plain rounding. The baseline.

With ``scales=output`` and calibration statistics, a block-scaled format's block scales
(``Format.scale_block``: nvfp4, mxfp8) are chosen instead to minimize each block's error
weighted by ``diag(H)``, its share of the output error ``tr(E H Eᵀ)`` without the
cross terms (:func:`~cq_core.builtin.rounding_objective.output_weighted_scales`); the result
is kept only where its output error on the calibration inputs beats the weight-error scales'.
"""

from __future__ import annotations

import torch

from cq_core.builtin.rounding_objective import (
    hessian_from_stats,
    never_worse,
    output_objective,
    output_weighted_scales,
)
from cq_core.plugin.hookspecs import hookimpl
from cq_core.plugin.types import Format, OptimizeContext, Optimizer, OptimizeResult, Option

WEIGHT, OUTPUT = "weight", "output"


class RoundToNearest(Optimizer):
    name = "rtn"
    description = "Round each weight to the nearest representable value (fast; the baseline)."
    elementwise = False  # a format's own encode rounds in whatever basis its grid lives in
    options = (
        Option(
            "scales", str, WEIGHT,
            "Block scales of least weight error (weight), or with --calibration of least diag(H)-weighted "
            "error, the output error without cross terms (output; block-scaled formats; kept where it wins).",
            choices=(WEIGHT, OUTPUT),
        ),
    )

    @property
    def uses_calibration(self) -> bool:
        return self.opts["scales"] == OUTPUT

    def optimize(self, weight: torch.Tensor, fmt: Format, context: OptimizeContext) -> OptimizeResult:
        note = None
        if self.opts["scales"] == OUTPUT:
            result = self._output_scales(weight, fmt, context)
            if result is not None:
                return result
            reason = "no scale blocks along K" if fmt.scale_block is None or weight.dim() != 2 \
                else "no calibration statistics"
            note = f"rtn (output scales): weight-error scales ({reason})"
        if context.measure:  # the format may measure while it encodes: one pass less
            tensors, signal, noise = fmt.encode_measured(weight)
            return OptimizeResult(tensors, note, energies=(signal, noise))
        return OptimizeResult(fmt.encode(weight), note)

    def _output_scales(self, weight, fmt: Format, context: OptimizeContext) -> OptimizeResult | None:
        w = weight.to(device=context.device, dtype=torch.float32)
        h = hessian_from_stats(context.stats, w.shape[1], context.layer) if w.dim() == 2 else None
        if h is None or fmt.scale_block is None:
            return None
        scales = output_weighted_scales(fmt, w, torch.diagonal(h))
        candidate = fmt.encode(w.cpu(), {k: v.cpu() for k, v in scales.items()})
        return never_worse("rtn (output scales)", fmt, w, output_objective(h.to(w.device)), candidate, context)


@hookimpl
def cq_register_optimizers(register):
    register(RoundToNearest)
