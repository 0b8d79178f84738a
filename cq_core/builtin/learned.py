"""Learned rounding: choose, per element, the grid value below or above it.

Round-to-nearest is the start. Each element may instead take its other grid
neighbour (``Format.grid_neighbours``); the choice is relaxed to a continuous
offset ``delta`` (in units of the gap to that neighbour) trained with AdamW
and a cosine schedule. The loss is always evaluated on the *hard* rounded
weights, its gradient passed straight through to ``delta``, so the best loss
seen is a real result, and that best assignment is what gets packed.

The objective (see :mod:`cq_core.builtin.rounding_objective`):
- with calibration statistics H: the output error tr(E H Eᵀ);
- without: a data-free heuristic, the plain error plus extra weight on the
  error along W's top singular directions (``rounding_objective.top_singular``).
Weight decay pulls ``delta`` back toward the original weight, so only flips
that pay for themselves survive. Scales are the format's own.
"""

from __future__ import annotations

import math

import torch

from cq_core.builtin.gptq import ErrorCompensation
from cq_core.builtin.rounding_objective import (
    data_free_objective,
    hessian_from_stats,
    low_rank_output_objective,
    never_worse,
    output_objective,
    pack_on_cpu,
)
from cq_core.plugin.hookspecs import hookimpl
from cq_core.plugin.types import (
    Format,
    OptimizeContext,
    Optimizer,
    OptimizeResult,
    Option,
    Tensors,
)


class LearnedRounding(Optimizer):
    name = "learned"
    description = (
        "Learned rounding (AdamW on flips between grid neighbours): weight-only by default, "
        "output-error driven with --calibration (texts, or random tokens: no data). "
        "Keeps round-to-nearest where it does not win."
    )
    #: with statistics it drives the output error instead of the weight error
    uses_calibration = True
    options = (
        Option("steps", int, 40, "Most optimization steps per tensor.", minimum=0),
        Option("lr", float, 0.05, "Peak learning rate, in units of the local grid gap.", positive=True),
        Option("weight_decay", float, 0.01, "AdamW decay of the offset toward the original weight.", minimum=0),
        Option("patience", int, 10, "Stop after this many steps without a better rounded loss.", minimum=0),
        Option("rank_fraction", float, 0.02, "Without calibration: top singular directions kept, as a fraction of the rank.",
               positive=True),
        Option("max_rank", int, 32, "Without calibration: at most this many directions (bounds the cost per step).",
               positive=True),
        Option(
            "top_weight", float, 1.0,
            "Without calibration: extra weight of the error along those directions (more than ~2 lost to rtn "
            "on MiniLM).", minimum=0,
        ),
        Option("h_rank", int, 256, "With calibration and more inputs than this: H's low-rank size for the steps.",
               positive=True),
        Option(
            "start", str, "auto", "Where learning starts: rtn, or gptq (error-compensated; needs calibration); "
            "auto: gptq with calibration, else rtn.", choices=("auto", "rtn", "gptq"),
        ),
    )

    def optimize(self, weight: torch.Tensor, fmt: Format, context: OptimizeContext) -> OptimizeResult:
        w = weight.to(device=context.device, dtype=torch.float32)
        h = hessian_from_stats(context.stats, w.shape[1], context.layer)
        if h is not None:
            h = h.to(context.device)
            verdict = output_objective(h)
            steps_objective = low_rank_output_objective(h, self.opts["h_rank"], context.seed)
        else:
            verdict = steps_objective = data_free_objective(
                w, self.opts["rank_fraction"], self.opts["top_weight"], context.seed, self.opts["max_rank"]
            )
        target, start_name, scales = self._start(w, h, fmt, fmt.compute_scales(w))
        below, above = fmt.grid_neighbours(target, scales)
        nearest = fmt.to_grid(target, scales)
        other = torch.where(nearest == below, above, below)
        move = other - nearest  # signed gap toward the other neighbour (0: no choice)
        if not bool((move != 0).any()):
            return never_worse(self.name, fmt, w, verdict, None, context, "every element is on the grid")
        flips, steps_run = self._train(w, target, nearest, move, steps_objective, context.seed)
        on_grid = torch.where(flips, other, nearest)
        candidate = pack_on_cpu(fmt, on_grid, scales)
        detail = f"from {start_name}, {int(flips.sum())} flips, {steps_run} steps"
        return never_worse(self.name, fmt, w, verdict, candidate, context, detail)

    def _start(self, w, h, fmt: Format, scales) -> tuple[torch.Tensor, str, Tensors]:
        """The values to round from and their scales: the weight itself, or with
        calibration the error-compensated targets of :mod:`cq_core.builtin.gptq`."""
        start = self.opts["start"]
        if h is not None and start in ("auto", "gptq"):
            compensated = ErrorCompensation().compensated_rounding(w, h, fmt, scales)
            if compensated is not None:
                return compensated[1], "gptq", compensated[2]
        return w, "rtn", scales

    def _train(self, w, target, nearest, move, objective, seed: int) -> tuple[torch.Tensor, int]:
        """Learn which elements of ``target`` take their other grid neighbour; the loss
        is on the error against the original weight ``w``."""
        torch.manual_seed(seed)
        free = move != 0
        safe_move = torch.where(free, move, torch.ones_like(move))
        # How far along the gap each element already is: 0 at the nearest value, < 0.5.
        start = torch.where(free, (target - nearest) / safe_move, torch.zeros_like(w))
        delta = torch.zeros_like(w, requires_grad=True)
        optimizer = torch.optim.AdamW(
            [delta], lr=self.opts["lr"], weight_decay=self.opts["weight_decay"],
            fused=delta.device.type in ("cpu", "cuda"),  # one kernel instead of ~8 passes per step
        )
        steps = max(0, self.opts["steps"])
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda i: 0.5 * (1 + math.cos(math.pi * min(i, steps) / max(steps, 1)))
        )
        # Toggling one element changes the loss by its gradient plus its own curvature
        # term, which a plain straight-through gradient misses: flips look free.
        # This correction adds that cost (to flipping) or gain (to flipping back).
        own_cost = objective.curvature(*w.shape).mul_(move.square())
        best_loss = float(objective.energy(nearest - w))
        best_flips = torch.zeros_like(free)
        since_best, steps_run = 0, 0
        for _ in range(steps):
            with torch.no_grad():
                flips = free & (start + delta > 0.5)
                # Straight-through: the loss and its gradient are taken at the hard-rounded
                # weights; d weight / d delta = move.
                value, grad_error = objective.energy_and_gradient(torch.where(flips, nearest + move, nearest) - w)
            steps_run += 1
            if value < best_loss:
                best_loss, best_flips, since_best = value, flips, 0
            else:
                since_best += 1
                if since_best >= self.opts["patience"]:
                    break
            with torch.no_grad():
                grad_error.mul_(move).add_(torch.where(flips, -own_cost, own_cost))
                delta.grad = grad_error
            optimizer.step()
            schedule.step()
            with torch.no_grad():  # stay between the two neighbours
                delta.copy_(torch.minimum(torch.maximum(delta, -start), 1 - start))
        return best_flips, steps_run


@hookimpl
def cq_register_optimizers(register):
    register(LearnedRounding)
