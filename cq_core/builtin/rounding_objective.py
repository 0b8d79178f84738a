"""What rounding optimizers minimize, and the never-worse rule that judges them.

An objective is a quadratic form on the weight error ``E = Ŵ - W``:
``energy(E) = sum(d * E²) + ||E P||²`` with a per-input-channel weight ``d``
(K,) and a projection ``P`` (K, r). With calibration statistics
``H = E[x xᵀ]`` this is the output error ``tr(E H Eᵀ)`` (exact when H is
kept whole, low-rank plus diagonal when it is large); without, it is the
data-free heuristic of QUALITY.md: the plain error plus the error along the
top singular directions of W.

The verdict is always taken on the *encoded* result (packed, then decoded):
a loss logged before the final rounding proves nothing.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from cq_core.errors import CqError
from cq_core.io.calibration_file import not_positive_semidefinite
from cq_core.numerics.metrics import sqnr_db
from cq_core.numerics.second_moment import DIAG_KEY, EXACT_KEY, LOWRANK_KEY, dense_second_moment, features_of
from cq_core.plugin.types import Format, OptimizeContext, OptimizeResult, Tensors

#: Row chunk when evaluating an objective on a large weight (bounds temporaries).
ROWS_PER_CHUNK = 1024


@dataclass
class Objective:
    """``energy(E) = sum(diag * E²) + ||E proj||² + ||left E||²`` (each term optional)."""

    description: str
    diag: torch.Tensor | None = None  # (K,) per-input-channel weight
    proj: torch.Tensor | None = None  # (K, r) right projection
    left: torch.Tensor | None = None  # (r, N) left projection (data-free only)
    hessian: torch.Tensor | None = None  # (K, K): adds tr(E H Eᵀ) exactly

    def energy(self, error: torch.Tensor) -> torch.Tensor:
        """The objective for an error matrix (differentiable; float32 scalar)."""
        total = error.new_zeros(())
        if self.diag is not None:
            total = total + (error.square() * self.diag).sum()
        else:
            total = total + error.square().sum()
        if self.proj is not None:
            total = total + (error @ self.proj).square().sum()
        if self.left is not None:
            total = total + (self.left @ error).square().sum()
        if self.hessian is not None:
            total = total + ((error @ self.hessian) * error).sum()
        return total

    def energy_and_gradient(self, error: torch.Tensor) -> tuple[float, torch.Tensor]:
        """The objective and its gradient ``d energy / d error``, by hand: the form is
        quadratic, so this skips autograd's graph (time and memory on large layers)."""
        grad = error * self.diag if self.diag is not None else error.clone()
        energy = float((grad * error).sum())
        for factor, on_left in ((self.proj, False), (self.left, True)):
            if factor is None:
                continue
            projected = factor @ error if on_left else error @ factor
            energy += float(projected.square().sum())
            grad += factor.T @ projected if on_left else projected @ factor.T
        if self.hessian is not None:
            weighted = error @ self.hessian
            energy += float((weighted * error).sum())
            grad += weighted
        return energy, grad.mul_(2.0)

    def curvature(self, rows: int, cols: int) -> torch.Tensor:
        """Second derivative of :meth:`energy` along each single element, halved: (N, 1) + (1, K)."""
        ref = next(t for t in (self.diag, self.proj, self.left, self.hessian) if t is not None) \
            if any(t is not None for t in (self.diag, self.proj, self.left, self.hessian)) else None
        device = ref.device if ref is not None else None
        per_col = self.diag.clone() if self.diag is not None else torch.ones(cols, device=device)
        if self.proj is not None:
            per_col = per_col + self.proj.square().sum(1)
        if self.hessian is not None:
            per_col = per_col + torch.diagonal(self.hessian)
        per_row = self.left.square().sum(0) if self.left is not None else torch.zeros(rows, device=device)
        return per_row[:, None] + per_col[None, :]

    def measure(self, error: torch.Tensor) -> float:
        """The objective as a Python float, row chunk by row chunk where it allows, for verdicts."""
        with torch.no_grad():
            if self.left is not None:  # couples rows: evaluate whole
                return float(self.energy(error))
            return sum(
                float(self.energy(error[start : start + ROWS_PER_CHUNK]))
                for start in range(0, error.shape[0], ROWS_PER_CHUNK)
            )


def hessian_from_stats(stats: Mapping[str, torch.Tensor] | None, in_features: int, layer: str) -> torch.Tensor | None:
    """The (K, K) float32 second-moment matrix H of a layer's inputs, checked, or None.

    ``stats`` holds H itself or its bounded form (``H_lowrank`` and ``H_diag``,
    :mod:`cq_core.numerics.second_moment`), rebuilt here for this one layer.
    Raises :class:`CqError` when K differs from the weight's or H is not finite.
    """
    features = None if stats is None else features_of(stats)
    if features is None:
        if stats is not None and (LOWRANK_KEY in stats) != (DIAG_KEY in stats):
            raise CqError(f"Calibration statistics for layer {layer!r} hold only half of H_lowrank and H_diag.")
        return None
    if EXACT_KEY not in stats and features != in_features:
        raise CqError(
            f"Calibration statistics for layer {layer!r} describe {features} input features, "
            f"but the weight has {in_features}."
        )
    h = dense_second_moment(stats)
    if tuple(h.shape) != (in_features, in_features):
        raise CqError(
            f"Calibration statistics for layer {layer!r} have H of shape {tuple(h.shape)}, "
            f"but the weight has {in_features} input features."
        )
    if not bool(torch.isfinite(h).all()):
        raise CqError(f"Calibration statistics for layer {layer!r} contain NaN or Inf.")
    return (h + h.T) / 2


def output_objective(h: torch.Tensor) -> Objective:
    """``tr(E H Eᵀ)`` exactly: the output error energy on the calibration inputs."""
    return Objective("output error", diag=torch.zeros(h.shape[0], dtype=h.dtype, device=h.device), hessian=h)


def low_rank_output_objective(h: torch.Tensor, rank: int, seed: int) -> Objective:
    """``tr(E H Eᵀ)`` through H's top ``rank`` eigen-directions plus its remaining
    diagonal: O(N K rank) per evaluation instead of O(N K²), for gradient steps."""
    k = h.shape[0]
    if k <= rank:
        return output_objective(h)
    u, s, _ = top_singular(h, rank, seed)
    proj = u * s.sqrt()
    residual_diag = (torch.diagonal(h) - proj.square().sum(1)).clamp(min=0)
    return Objective("output error (low rank + diagonal)", diag=residual_diag, proj=proj)


def top_singular(a: torch.Tensor, q: int, seed: int, niter: int = 2) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(U, S, V)``: an approximate top-``q`` SVD of ``a`` by randomized subspace iteration
    (Halko et al. 2009, algorithms 4.4 and 5.1: what ``torch.svd_lowrank`` computes).

    The random sketch is drawn on the CPU from ``seed`` and moved to ``a``'s device, so
    the CPU and a GPU start from the same numbers (``torch.svd_lowrank`` draws it
    from each device's own generator); on the CPU the result is bit for bit
    ``torch.svd_lowrank`` after ``torch.manual_seed(seed)``. The global generator is untouched.
    """
    transposed = a.shape[-2] < a.shape[-1]
    tall = a.mH if transposed else a  # the algorithm assumes a tall matrix
    sketch = torch.randn(
        tall.shape[-1], q, dtype=tall.dtype, device="cpu", generator=torch.Generator("cpu").manual_seed(seed)
    )
    basis = torch.linalg.qr(tall @ sketch.to(tall.device)).Q
    for _ in range(niter):
        basis = torch.linalg.qr(tall.mH @ basis).Q
        basis = torch.linalg.qr(tall @ basis).Q
    u, s, vh = torch.linalg.svd(basis.mH @ tall, full_matrices=False)
    u, v = basis @ u, vh.mH
    return (v, s, u) if transposed else (u, s, v)


def data_free_objective(
    weight: torch.Tensor, rank_fraction: float, weight_of_top: float, seed: int, max_rank: int = 32
) -> Objective:
    """Plain error plus ``weight_of_top`` times the error along W's top-k singular directions
    (k: ``rank_fraction`` of the rank, at most ``max_rank``, which bounds the cost per step)."""
    n, k = weight.shape
    rank = max(1, min(n, k, max_rank, round(rank_fraction * min(n, k))))
    u, _, v = top_singular(weight, min(rank + 8, min(n, k)), seed)
    scale = math.sqrt(weight_of_top)
    return Objective(
        f"data-free (top {rank} singular directions x{weight_of_top:g})",
        proj=v[:, :rank] * scale,
        left=u[:, :rank].T * scale,
    )


def decoded(fmt: Format, tensors: Tensors, device: torch.device) -> torch.Tensor:
    return fmt.decode(tensors).to(device=device, dtype=torch.float32)


def never_worse(
    name: str,
    fmt: Format,
    weight: torch.Tensor,
    objective: Objective,
    candidate: Tensors | None,
    context: OptimizeContext,
    detail: str = "",
) -> OptimizeResult:
    """Keep ``candidate`` only if its decoded objective beats round-to-nearest's.

    ``weight`` is the float32 weight on the optimizer's device. Both results
    are judged after encoding; a candidate with NaN/Inf never wins.
    """
    rtn = fmt.encode(weight.cpu())
    rtn_energy = objective.measure(decoded(fmt, rtn, weight.device) - weight)
    if rtn_energy < 0:  # a sum of squares, but for an indefinite H
        raise not_positive_semidefinite(context.layer)
    if candidate is None:
        return OptimizeResult(rtn, f"{name}: kept round-to-nearest ({detail or 'nothing to optimize'})")
    candidate_weight = decoded(fmt, candidate, weight.device)
    if not bool(torch.isfinite(candidate_weight).all()):
        return OptimizeResult(rtn, f"{name}: kept round-to-nearest (result was not finite)")
    energy = objective.measure(candidate_weight - weight)
    if energy < 0:
        raise not_positive_semidefinite(context.layer)
    gain = sqnr_db(rtn_energy, energy) if math.isfinite(rtn_energy) else -math.inf
    extra = f", {detail}" if detail else ""
    if energy < rtn_energy:
        return OptimizeResult(candidate, f"{name} won: {objective.description} {gain:+.2f} dB vs rtn{extra}")
    return OptimizeResult(rtn, f"{name} lost ({gain:+.2f} dB): kept round-to-nearest{extra}")


def output_weighted_scales(fmt: Format, weight: torch.Tensor, importance: torch.Tensor) -> Tensors:
    """``fmt``'s round-to-nearest scales for a float32 weight (N, K), with every scale block
    (``Format.scale_block`` columns) chosen again by :meth:`Format.refit_scales` with each
    column's squared error weighted by ``importance`` (K,), e.g. ``diag(H)``: the block's share
    of the output error ``tr(E H Eᵀ)`` when the cross terms are left out. A format without
    scale blocks keeps its scales."""
    scales = fmt.compute_scales(weight)
    block = fmt.scale_block
    if block is None:
        return scales
    importance = importance.to(weight.device, torch.float32)
    for start in range(0, weight.shape[1], block):
        cols = slice(start, min(start + block, weight.shape[1]))
        scales = fmt.refit_scales(weight[:, cols], scales, cols, importance[cols])
    return scales


def pack_on_cpu(fmt: Format, on_grid: torch.Tensor, scales: Tensors) -> Tensors:
    """Pack on the CPU: the writer and every format's packing expect CPU tensors."""
    return fmt.pack(on_grid.cpu(), {k: v.cpu() for k, v in scales.items()})
