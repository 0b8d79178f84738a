"""``asym_w4a8_int8``: ConvRot-rotated 4-bit weights with two-level scales, run as an INT8 GEMM.

The layout comfy-kitchen's ``AsymW4A8Int8Layout`` reads (``tensor/w4a8_int8.py``,
decoded by ``backends/eager/w4a8_int8.py``; loaded by ComfyUI after 0.30.0,
``comfy/ops.py`` ``_load_quantized_module``), for a weight (N, K):

- ``L.weight``: I8 (N, K/2), two unsigned 4-bit codes per byte, the even column
  in the LOW nibble;
- ``L.weight_s_rel``: F8_E4M3 (N, K/g), one relative scale per group of g
  columns (U8 bytes are viewed as e4m3 on load);
- ``L.weight_s_channel``: F32 (N,), one scale per output row;
- ``L.weight_codebook``: optional F32 (16,), the value of each code; without it
  code c means ``c - 8`` (uniform INT4, -8..7). cq writes comfy-kitchen's
  Lloyd-Max table by default: it beat uniform codes by +0.8 dB embedding SQNR
  on all-MiniLM-L6-v2 with rtn and with gptq (docs/int8.md), and only it takes
  comfy-kitchen's CUDA GEMV fast path; ``-O codebook=false`` for uniform codes;
- JSON ``{"format": "asym_w4a8_int8", "group_size": g, "convrot_groupsize": G}``
  (ComfyUI's defaults 16 and 256).

Decode, all in the rotated basis: ``q8 = clamp(round(level(c) * s_rel), ±127)``,
an INT8 value (the GEMM's weight), times ``s_channel``, then the group-wise
Hadamard of size G along K. So the grid of one row is a subset of that row's
INT8 grid: per group, the 16 INT8 values its codes round to. cq chooses
``s_channel = absmax(row) / 127`` and, per group, the e4m3 ``s_rel`` whose grid leaves
the least squared error of every e4m3 value, found exactly (:func:`exact_group_scales`),
then the nearest grid value for each element. The asymmetric variant with a
``weight_correction`` tensor exists in comfy-kitchen, but ComfyUI's loader never
reads that tensor, so cq writes only the symmetric one.

At run time the activations are rotated the same way and quantized to INT8 per
row (:meth:`AsymW4A8Int8Format.activation_fake_quant`).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from typing import Any

import torch

from cq_core import (
    FLOAT_SCALE_DTYPES,
    Contract,
    CqError,
    Format,
    GridBasis,
    LayerInfo,
    Option,
    TensorRule,
    Tensors,
    TensorSpec,
)
from cq_core.numerics.exact import div, sum_last
from cq_core.numerics.metrics import rows_per_chunk
from cq_int8.hadamard import GROUP_SIZES, fitting_group_size, rotate_groups, unrotate_groups
from cq_int8.scales import scale_from_amax
from cq_int8.w4a4 import pack_nibbles

#: Group sizes ComfyUI's layout validates (``>= 4`` and dividing 16 or a multiple of it);
#: its CUDA GEMV kernel is built for 16 only.
W4A8_GROUP_SIZES = (4, 8, 16, 32, 64, 128)
#: K must be a multiple of 16 (comfy-kitchen ``validate_w4a8_weight_shape``).
K_MULTIPLE = 16
INT8_MAX = 127
UNIFORM_LEVELS = tuple(float(c - 8) for c in range(16))
#: The 16 Lloyd-Max levels for a group-normalized Gaussian that comfy-kitchen's CUDA kernel
#: has built in (``tensor/w4a8_packed.py`` ``_FIXED_LUT``); only a codebook equal to it
#: takes the kernel's packed fast path.
LLOYD_MAX_LEVELS = (
    -0.980602, -0.794529, -0.638165, -0.500986, -0.377321, -0.263187, -0.155210, -0.050720,
    0.052541, 0.156985, 0.265284, 0.379533, 0.502636, 0.638953, 0.794876, 0.980671,
)
E4M3_LARGEST_FINITE_BITS = 0x7E  # 0x7F is NaN in e4m3fn


def _packed_weight(weight_shape: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
    ok = len(weight_shape) == 2 and not (2 * weight_shape[1]) % K_MULTIPLE
    return (tuple(weight_shape),) if ok else ()


def _group_scales(weight_shape: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
    n, k = weight_shape[0], 2 * weight_shape[1]
    ordered = (16, *(g for g in W4A8_GROUP_SIZES if g != 16))  # the default first: the canonical form
    return tuple((n, k // g) for g in ordered if not k % g)


def _row_scale(weight_shape: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
    return ((weight_shape[0],),)


def _codebook(weight_shape: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
    return ((16,),)


#: What ComfyUI after 0.30.0 loads for asym_w4a8_int8 (``comfy/quant_ops.py`` QUANT_ALGOS;
#: ``comfy/ops.py`` ``_load_quantized_module`` raises without ``weight_s_rel``, views U8 bytes of it
#: as e4m3, passes ``weight_s_channel`` and ``weight_codebook`` as they are, and reads
#: ``group_size`` and ``convrot_groupsize``, also nested under ``params``). comfy-kitchen's
#: ``AsymW4A8Int8Layout.Params`` requires ``s_channel`` of shape exactly (N,) and a codebook of (16,).
ASYM_W4A8_INT8_CONTRACT = Contract(
    tensors={
        "weight": TensorRule((torch.int8,), _packed_weight, describe="I8 unsigned 4-bit pairs"),
        "weight_s_rel": TensorRule(
            (torch.float8_e4m3fn, torch.uint8), _group_scales, view=True, describe="e4m3 scale per group"
        ),
        "weight_s_channel": TensorRule(FLOAT_SCALE_DTYPES, _row_scale, describe="one float scale per row"),
        "weight_codebook": TensorRule((torch.float32,), _codebook, required=False, describe="16 code values"),
    },
    json={"full_precision_matrix_mult": bool, "group_size": int, "convrot_groupsize": int, "params": dict},
)


def unpack_codes(packed: torch.Tensor) -> torch.Tensor:
    """I8 (rows, K/2) -> int64 codes 0..15 (rows, K), the even column from the low nibble."""
    raw = packed.view(torch.uint8).to(torch.int64)
    return torch.stack((raw & 0x0F, raw >> 4), dim=-1).reshape(raw.shape[0], -1)


def int8_levels(levels: torch.Tensor, s_rel: torch.Tensor) -> torch.Tensor:
    """The INT8 value of every code under each scale: ``clamp(round(level * s_rel), ±127)``,
    float32 of shape ``s_rel.shape + (16,)``, as comfy-kitchen's ``_dequant_int4_grouped_to_int8``
    computes it. Non-decreasing along the last axis for sorted levels and ``s_rel >= 0``."""
    return (levels * s_rel.float().unsqueeze(-1)).round_().clamp_(-INT8_MAX, INT8_MAX)


def nearest_codes(target: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Index of the nearest value of ``grid`` (..., 16, sorted) for each of ``target`` (..., m);
    ties go to the lower index."""
    flat_grid = grid.reshape(-1, grid.shape[-1]).contiguous()
    flat = target.reshape(flat_grid.shape[0], -1).contiguous()
    last = grid.shape[-1] - 1
    above = torch.searchsorted(flat_grid, flat).clamp_(max=last)
    below = (above - 1).clamp_(min=0)
    d_below = (flat - flat_grid.gather(1, below)).abs_()
    d_above = (flat - flat_grid.gather(1, above)).abs_()
    return torch.where(d_above < d_below, above, below).reshape(target.shape)


def grid_errors(target: torch.Tensor, grid: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """float32 (groups,): each group's squared error ``sum_i w_i min_c (t_i - grid_c)²`` for
    targets (groups, g) and grids (groups, 16), the terms added in
    :func:`~cq_core.numerics.exact.sum_last`'s order: what :func:`exact_group_scales` minimizes.
    ``weights``: None (all 1) or non-negative, broadcastable to ``target``."""
    distance = (target.unsqueeze(-1) - grid.unsqueeze(-2)).square_().amin(dim=-1)
    if weights is not None:
        distance.mul_(weights)
    return sum_last(distance)


def _e4m3_codes(values: torch.Tensor) -> torch.Tensor:
    return values.clamp(max=448.0).to(torch.float8_e4m3fn).view(torch.uint8).to(torch.int32)


def _e4m3_values(codes: torch.Tensor) -> torch.Tensor:
    return codes.clamp(0, E4M3_LARGEST_FINITE_BITS).to(torch.uint8).view(torch.float8_e4m3fn).float()


def exact_group_scales(
    target: torch.Tensor, levels: torch.Tensor, batch: int = 4096, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """The e4m3 ``s_rel`` of least squared error for each group of ``target`` (rows, groups, g)
    float32 (the rotated weight over ``s_channel``) under the 16 sorted code ``levels``: float32
    (rows, groups), e4m3 values. ``weights`` (g,), optional, non-negative: each column's
    squared error counts that much (an output-error cost from calibration statistics).

    **What "optimal" means.** Per group, of every positive finite e4m3 value ``s`` (codes
    1..0x7E), the one whose :func:`grid_errors` under the INT8 grid ``int8_levels(levels, s)``
    (what comfy-kitchen decodes) is least; of equal errors the smallest. An all-zero group
    gets the smallest e4m3 value (every code decodes to 0 there, or its nearest). The tests
    in ``plugins/cq_int8/tests/test_asym_scales.py`` check it against evaluating all 126.

    **Why few are evaluated.** The search starts at the e4m3 rounding of the ideal scale
    (the group's largest target over the codebook's smaller extreme) and walks both ways,
    stopping on each side at a lower bound that only grows further out:

    - *down*: the grid's extreme ``clamp(round(level * s), ±127)`` only shrinks, so the
      group's largest target on each side errs at least its distance beyond it;
    - *up*: once no level rounds to 0 (and without a zero level), every grid value is at
      least ``m(s) = min |round(level * s)|`` from 0, which only grows, so each target errs
      at least ``m(s) - |t|`` where that is positive; with a zero level (the uniform codes)
      at least ``min(|t|, m(s) - |t|)`` with ``m`` over the nonzero levels.

    With ``weights`` the down bound is the largest weighted such term of any element, the up
    bound the weighted sum. Bounds are compared in float64 against the float32 sums with a
    margin far above their rounding. Evaluating a candidate costs 16 distances per element, in batches of ``batch``
    groups to bound memory.
    """
    rows, count, width = target.shape
    flat = target.reshape(-1, width)
    levels = levels.to(flat.device, torch.float32)
    if weights is not None:
        weights = weights.to(flat.device, torch.float32).reshape(1, width)
    smaller_extreme = float(torch.minimum(-levels[0], levels[-1]))
    has_zero = bool((levels == 0).any())
    nonzero_levels = levels[levels != 0]
    ideal = flat.abs().amax(dim=1) / smaller_extreme
    start = _e4m3_codes(ideal).clamp_(1, E4M3_LARGEST_FINITE_BITS)
    best_code = start.clone()
    best = torch.empty(flat.shape[0], dtype=torch.float32, device=flat.device)
    for part in torch.arange(flat.shape[0], device=flat.device).split(batch):
        best[part] = grid_errors(flat[part], int8_levels(levels, _e4m3_values(start[part])), weights)
    top, bottom = flat.amax(dim=1).clamp_(min=0.0), (-flat.amin(dim=1)).clamp_(min=0.0)
    magnitudes = flat.abs()
    margin = 1.0 - 2.0**-16

    def below_bound(code, index):  # the extremes clip
        grid_top = int8_levels(levels[[0, -1]], _e4m3_values(code))
        if weights is not None:  # every element beyond an extreme errs at least its distance to it
            part = flat[index]
            over = (part - grid_top[:, 1:]).clamp_(min=0.0).square_().mul_(weights).amax(dim=1)
            under = (-part + grid_top[:, :1]).clamp_(min=0.0).square_().mul_(weights).amax(dim=1)
            return torch.maximum(over, under).double() * margin
        over = (top[index] - grid_top[:, 1]).clamp_(min=0.0).square_()
        under = (bottom[index] + grid_top[:, 0]).clamp_(min=0.0).square_()
        return torch.maximum(over, under).double() * margin

    def above_bound(code, index):  # every grid value at least m(s) from zero
        s = _e4m3_values(code)
        rounded = int8_levels(nonzero_levels, s).abs_()
        nearest = rounded.amin(dim=1, keepdim=True)
        gap = (nearest - magnitudes[index]).clamp_(min=0.0)
        if has_zero:
            gap = torch.minimum(gap, magnitudes[index])
        gap = gap.square_() if weights is None else gap.square_().mul_(weights)
        bound = sum_last(gap).double() * margin
        # where a level still rounds to 0 the gap is not monotone yet: no bound
        return torch.where(nearest[:, 0] > 0, bound, 0.0)

    best_code[ideal == 0] = 1  # an all-zero group: every scale gives it no error
    walking = (ideal > 0).nonzero().squeeze(1)
    for direction in (-1, 1):
        index, code = walking, start[walking]
        while index.numel():
            code = code + direction
            valid = (code >= 1) & (code <= E4M3_LARGEST_FINITE_BITS)
            index, code = index[valid], code[valid]
            if index.numel() == 0:
                break
            bound = below_bound(code, index) if direction < 0 else above_bound(code, index)
            current = best[index].double()
            keep = bound <= current if direction < 0 else bound < current
            index, code = index[keep], code[keep]
            if index.numel() == 0:
                break
            for part in torch.arange(index.numel(), device=flat.device).split(batch):
                chosen = index[part]
                error = grid_errors(flat[chosen], int8_levels(levels, _e4m3_values(code[part])), weights)
                better = error <= best[chosen] if direction < 0 else error < best[chosen]
                best[chosen] = torch.where(better, error, best[chosen])
                best_code[chosen] = torch.where(better, code[part], best_code[chosen])
    return _e4m3_values(best_code).reshape(rows, count)


class AsymW4A8Int8Format(Format):
    name = "asym_w4a8_int8"
    description = (
        "ConvRot-rotated INT4 weights, fp8 scale per group of 16 and fp32 per row; INT8 GEMM with INT8 "
        "activations (ComfyUI newer than 0.30.0; 0.30.0 refuses the name)."
    )
    # ComfyUI v0.31.0 (PR #15308) added it to QUANT_ALGOS: absent in 0.30.0's (KeyError on load), present in 0.33.0's.
    comfyui_since = "0.31.0"
    comfyui_lora = "merged: re-quantized keeping group size and codebook, without comfy-kitchen's scale search"
    contract = ASYM_W4A8_INT8_CONTRACT
    options = (
        Option("group_size", int, 16, "Columns per fp8 group scale (ComfyUI's CUDA kernel: 16).", W4A8_GROUP_SIZES),
        Option(
            "convrot_groupsize", int, 256,
            "Hadamard group size; layers whose K it does not divide use the largest that does.", GROUP_SIZES,
        ),
        Option(
            "codebook", bool, True,
            "Store comfy-kitchen's 16-level Lloyd-Max codebook (weight_codebook; its CUDA GEMV fast path needs "
            "it; +0.8 dB on MiniLM); false: uniform INT4 codes -8..7.",
        ),
    )

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        #: True for the view that optimizers use: weights already in the rotated basis.
        self.in_basis = False

    # -- the layout -----------------------------------------------------------------

    @property
    def group(self) -> int:
        return self.opts["group_size"]

    def levels(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """The value of each of the 16 codes (before ``s_rel``), float32, sorted."""
        return torch.tensor(LLOYD_MAX_LEVELS if self.opts["codebook"] else UNIFORM_LEVELS, device=device)

    def rotation_group(self, shape: tuple[int, ...]) -> int | None:
        return fitting_group_size(shape[-1], self.opts["convrot_groupsize"])

    def accepts(self, layer: LayerInfo) -> str | None:
        refusal = super().accepts(layer)
        k = layer.shape[-1] if refusal is None else 0
        if refusal is None and (k % K_MULTIPLE or k % self.group):
            multiple = max(K_MULTIPLE, self.group)
            return f"{self.name} needs K (in_features) to be a multiple of {multiple}, this one is {k}"
        return refusal

    def stored_specs(self, shape: tuple[int, ...]) -> dict[str, TensorSpec]:
        n, k = shape
        specs = {
            "weight": TensorSpec(torch.int8, (n, k // 2)),
            "weight_s_rel": TensorSpec(torch.float8_e4m3fn, (n, k // self.group)),
            "weight_s_channel": TensorSpec(torch.float32, (n,)),
        }
        if self.opts["codebook"]:
            specs["weight_codebook"] = TensorSpec(torch.float32, (16,))
        return specs

    def logical_shape(self, stored: Mapping[str, TensorSpec]) -> tuple[int, ...]:
        n, packed = stored["weight"].shape
        return (n, 2 * packed)

    @classmethod
    def from_layer_config(cls, config: Mapping[str, Any], stored: Mapping[str, TensorSpec]) -> Format:
        params = config.get("params") if isinstance(config.get("params"), Mapping) else {}
        return cls(
            group_size=int(config.get("group_size", params.get("group_size", 16))),
            convrot_groupsize=int(config.get("convrot_groupsize", params.get("convrot_groupsize", 256))),
            codebook="weight_codebook" in stored,
        )

    @classmethod
    def config_from_tensors(cls, stored: Mapping[str, TensorSpec]) -> dict[str, Any]:
        k = 2 * stored["weight"].shape[1]
        return {"format": cls.name, "group_size": k // stored["weight_s_rel"].shape[1], "convrot_groupsize": 256}

    def layer_config(self, shape: tuple[int, ...]) -> dict[str, Any]:
        return {"format": self.name, "group_size": self.group, "convrot_groupsize": self.rotation_group(shape)}

    def layer_note(self, shape: tuple[int, ...]) -> str | None:
        wanted, group = self.opts["convrot_groupsize"], self.rotation_group(shape)
        return None if group == wanted else f"ConvRot group {group}: K={shape[-1]} is not a multiple of {wanted}"

    # -- optimizers work in the rotated basis ---------------------------------------------

    def grid_basis(self, shape: tuple[int, ...]) -> GridBasis | None:
        if self.in_basis:
            return None
        group = self.rotation_group(shape)
        view = copy.copy(self)
        view.in_basis = True
        return GridBasis(lambda w: rotate_groups(w, group), view)

    def _into_basis(self, weight: torch.Tensor) -> torch.Tensor:
        if self.in_basis:
            return weight.to(torch.float32, copy=True)
        return rotate_groups(weight, self.rotation_group(tuple(weight.shape)))

    # -- scales and the grid (in the rotated basis) -------------------------------------------

    def _choose_scales(self, rotated: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(s_channel (rows,), s_rel (rows, K/g) float32 holding e4m3 values)`` for rotated rows:
        ``s_channel = absmax(row) / 127`` and each group's exact ``s_rel`` (:func:`exact_group_scales`).

        Raises :class:`CqError` when ComfyUI's float32 decode could overflow: its rotation back
        sums G terms, up to ``sqrt(G)`` times the largest rotated value."""
        group = self.rotation_group((rotated.shape[0], rotated.shape[1]))
        amax = rotated.abs().amax(dim=1)
        if not bool(torch.isfinite(amax * (2.0 * math.sqrt(group))).all()):
            raise CqError(
                f"{self.name}: magnitudes up to {float(amax.max()):.4g} in the ConvRot basis overflow float32 in "
                f"the rotation (group {group}), so ComfyUI could not decode this weight."
            )
        s_channel = scale_from_amax(amax, INT8_MAX)
        target = div(rotated.reshape(rotated.shape[0], -1, self.group), s_channel.reshape(-1, 1, 1))
        return s_channel, exact_group_scales(target, self.levels(rotated.device))

    def compute_scales(self, weight: torch.Tensor) -> Tensors:
        n, k = weight.shape
        s_channel = torch.empty(n, dtype=torch.float32, device=weight.device)
        s_rel = torch.empty(n, k // self.group, dtype=torch.float32, device=weight.device)
        step = rows_per_chunk(tuple(weight.shape))
        for start in range(0, n, step):
            rows = self._into_basis(weight[start : start + step])
            s_channel[start : start + step], s_rel[start : start + step] = self._choose_scales(rows)
        return {"weight_s_channel": s_channel, "weight_s_rel": s_rel}

    @property
    def scale_block(self) -> int | None:  # type: ignore[override]
        """In the rotated basis (the view optimizers see), ``group_size`` columns share an
        ``s_rel``; in the weight's own basis no column block does."""
        return self.group if self.in_basis else None

    def refit_scales(
        self, weight: torch.Tensor, scales: Tensors, cols: slice, importance: torch.Tensor | None = None
    ) -> Tensors:
        # One group of rotated columns: its exact s_rel for these values (weighted by importance);
        # s_channel stays (it spans the whole row).
        start = cols.start or 0
        if not self.in_basis or start % self.group or weight.shape[1] != self.group:
            raise ValueError(f"{self.name} refits one aligned group of {self.group} rotated columns at a time")
        s_channel = scales["weight_s_channel"].to(weight.device, torch.float32).reshape(-1, 1)
        target = div(weight.float(), s_channel).unsqueeze(1)
        chosen = exact_group_scales(target, self.levels(weight.device), weights=importance)
        scales["weight_s_rel"][:, start // self.group] = chosen[:, 0].to(scales["weight_s_rel"].device)
        return scales

    def _grid(self, scales: Tensors, cols: slice, k: int, device) -> torch.Tensor:
        """The INT8 grid (N, columns, 16) of the columns ``cols`` of a K-wide weight."""
        groups = torch.arange(k, device=device)[cols] // self.group
        return int8_levels(self.levels(device), scales["weight_s_rel"].to(device)[:, groups])

    def _rounded(self, weight: torch.Tensor, scales: Tensors, cols: slice) -> tuple[torch.Tensor, torch.Tensor]:
        """``(codes, on_grid)`` of rotated ``weight`` (the columns ``cols``)."""
        if not self.in_basis:
            raise CqError(
                f"{self.name} rounds in the ConvRot basis: optimizers reach its grid through grid_basis()."
            )
        s_channel = scales["weight_s_channel"].to(weight.device, torch.float32).reshape(-1, 1)
        k = scales["weight_s_rel"].shape[1] * self.group
        grid = self._grid(scales, cols, k, weight.device)
        codes = nearest_codes(div(weight.float(), s_channel).unsqueeze(-1), grid).squeeze(-1)
        return codes, grid.gather(2, codes.unsqueeze(-1)).squeeze(-1).mul_(s_channel)

    def to_grid(self, weight: torch.Tensor, scales: Tensors, cols: slice = slice(None)) -> torch.Tensor:
        return self._rounded(weight, scales, cols)[1]

    def grid_neighbours(
        self, weight: torch.Tensor, scales: Tensors, cols: slice = slice(None)
    ) -> tuple[torch.Tensor, torch.Tensor]:
        codes, nearest = self._rounded(weight, scales, cols)
        s_channel = scales["weight_s_channel"].to(weight.device, torch.float32).reshape(-1, 1)
        grid = self._grid(scales, cols, scales["weight_s_rel"].shape[1] * self.group, weight.device)
        up = grid.gather(2, (codes + 1).clamp_(max=15).unsqueeze(-1)).squeeze(-1).mul_(s_channel)
        down = grid.gather(2, (codes - 1).clamp_(min=0).unsqueeze(-1)).squeeze(-1).mul_(s_channel)
        other = torch.where(weight.float() >= nearest, up, down)
        return torch.minimum(nearest, other), torch.maximum(nearest, other)

    def pack(self, weight_on_grid: torch.Tensor, scales: Tensors) -> Tensors:
        codes, _ = self._rounded(weight_on_grid, scales, slice(None))
        return self._stored(codes, scales["weight_s_rel"], scales["weight_s_channel"])

    def _stored(self, codes: torch.Tensor, s_rel: torch.Tensor, s_channel: torch.Tensor) -> Tensors:
        stored = {
            "weight": pack_nibbles(codes),
            "weight_s_rel": s_rel.to(torch.float8_e4m3fn).contiguous(),
            "weight_s_channel": s_channel.float().reshape(-1).contiguous(),
        }
        if self.opts["codebook"]:
            stored["weight_codebook"] = self.levels(codes.device)
        return stored

    def encode(self, weight: torch.Tensor, scales: Tensors | None = None) -> Tensors:
        n, k = weight.shape
        if scales is None:
            scales = self.compute_scales(weight)
        view = self if self.in_basis else self.grid_basis(tuple(weight.shape)).format
        codes = torch.empty(n, k, dtype=torch.int64, device=weight.device)
        step = rows_per_chunk(tuple(weight.shape))
        for start in range(0, n, step):
            rows = slice(start, start + step)
            chunk = {name: scales[name][rows] for name in ("weight_s_channel", "weight_s_rel")}
            codes[rows] = view._rounded(self._into_basis(weight[rows]), chunk, slice(None))[0]
        return self._stored(codes, scales["weight_s_rel"], scales["weight_s_channel"])

    # -- decode: comfy-kitchen's eager dequantization ------------------------------------------

    def int8_weight(self, tensors: Mapping[str, torch.Tensor], start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` of the INT8 weight the GEMM multiplies (as float32), in the rotated basis."""
        codes = unpack_codes(tensors["weight"][start:stop])
        s_rel = tensors["weight_s_rel"][start:stop]
        s_rel = s_rel.view(torch.float8_e4m3fn) if s_rel.dtype == torch.uint8 else s_rel
        codebook = tensors.get("weight_codebook")
        values = codebook.float()[codes] if codebook is not None else codes.float() - 8.0
        group = values.shape[1] // s_rel.shape[1]
        values = values.reshape(codes.shape[0], -1, group) * s_rel.float().unsqueeze(-1)
        return values.reshape(codes.shape).round_().clamp_(-INT8_MAX, INT8_MAX)

    def decode(self, tensors: Mapping[str, torch.Tensor], shape: tuple[int, int] | None = None) -> torch.Tensor:
        return self.decode_rows(tensors, 0, tensors["weight"].shape[0])

    def decode_rows(
        self, tensors: Mapping[str, torch.Tensor], start: int, stop: int, shape: tuple[int, int] | None = None
    ) -> torch.Tensor:
        s_channel = tensors["weight_s_channel"][start:stop].float().reshape(-1, 1)
        rotated = self.int8_weight(tensors, start, stop).mul_(s_channel)
        if self.in_basis:
            return rotated
        return unrotate_groups(rotated, self.rotation_group((stop - start, rotated.shape[1])))

    # -- the compute path -----------------------------------------------------------------

    def rotated_int8_activation(self, x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(q, scale)``: ``x`` (M, K) float32 rotated group-wise and quantized to INT8 per row
        (``q`` float32 integers in [-128, 127], ``scale`` (M, 1) = absmax / 127), as comfy-kitchen's
        eager ``int8_linear`` does with ``convrot=True`` (``_rotate_activation``, then
        ``quantize_int8_rowwise``)."""
        rotated = unrotate_groups(x, self.rotation_group((1, k)))  # x @ H: H is symmetric
        scale = (rotated.abs().amax(dim=-1, keepdim=True) / 127.0).clamp_(min=1e-30)
        return div(rotated, scale).round_().clamp_(-128.0, 127.0), scale

    def activation_fake_quant(self, x: torch.Tensor, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
        """``x`` (..., K) float32 -> the activation as the INT8 GEMM sees it, float32 (..., K), in the
        layer's own basis: rotated, quantized to INT8 per row (per token), dequantized and rotated
        back, so that ``activation_fake_quant(x) @ decode(tensors).T`` is the layer's output on the
        compute path up to float rounding (comfy-kitchen ``backends/eager/w4a8_int8.py``
        ``w4a8_int8_linear`` -> ``int8_linear``; the weight side stays exactly INT8)."""
        k = x.shape[-1]
        flat = x.reshape(-1, k).float()
        q, scale = self.rotated_int8_activation(flat, k)
        return unrotate_groups(q.mul_(scale), self.rotation_group((1, k))).reshape(x.shape)
