"""Shared machinery of the symmetric integer formats with one scale per row (or per tensor),
optionally ConvRot-rotated: ``int8_tensorwise`` and ``convrot_w4a4``.

With rotation the integer grid is element-wise only in the rotated basis, so
codes and scales live there: ``stored = codes * scale = W @ H`` per group of G
columns, and ``decode = (codes * scale) @ H``. Seen from the original basis the
grid is a rotated lattice; rounding in the rotated basis and rotating back is
still the nearest lattice point, because H is orthogonal. That is why
``to_grid`` takes only column slices made of whole rotation groups.

The rotation group of a layer depends on its K (a smaller group, or none,
when K is not a multiple of the requested one), and ``to_grid`` sees only a
slice, so the scales dict carries the group as ``ROTATION_KEY``. It is never
stored as a tensor; the layer JSON carries it for ComfyUI.
"""

from __future__ import annotations

import copy
import math
from abc import abstractmethod
from collections.abc import Mapping
from typing import ClassVar

import torch

from cq_core import CqError, Format, GridBasis, Tensors
from cq_core.numerics.exact import div
from cq_core.numerics.metrics import ErrorEnergy, rows_per_chunk
from cq_int8.hadamard import rotate_groups, unrotate_groups
from cq_int8.scales import group_scales, round_to_codes, tensor_scale

#: Key in a scales dict holding the layer's rotation group (an int64 scalar tensor).
ROTATION_KEY = "convrot_groupsize"


class IntegerRowsFormat(Format):
    """Codes in [-qmax, qmax] times a per-row (or per-tensor) float32 scale, maybe rotated."""

    #: Largest code magnitude; the grid is symmetric.
    qmax: ClassVar[int]
    #: True for the view optimizers use (:meth:`grid_basis`): weights already rotated.
    in_basis: bool = False

    # -- what subclasses decide -------------------------------------------------

    @abstractmethod
    def rotation_group(self, shape: tuple[int, ...]) -> int | None:
        """The ConvRot group for a weight of ``shape``, or None for no rotation."""

    @property
    def per_tensor(self) -> bool:
        return False

    def _rotation(self, shape: tuple[int, ...]) -> int | None:
        """The rotation this instance applies itself: none in the basis view."""
        return None if self.in_basis else self.rotation_group(shape)

    def grid_basis(self, shape: tuple[int, ...]) -> GridBasis | None:
        # In the rotated basis the grid is element-wise again: optimizers round there.
        group = self._rotation(shape)
        if not group:
            return None
        view = copy.copy(self)
        view.in_basis = True
        return GridBasis(lambda w: rotate_groups(w, group), view)

    @abstractmethod
    def store_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Stored ``weight`` for float32 integer codes (rows, K)."""

    @abstractmethod
    def load_codes(self, stored: torch.Tensor) -> torch.Tensor:
        """Float32 codes (rows, K) from stored ``weight`` rows."""

    def store_scale(self, scale: torch.Tensor) -> torch.Tensor:
        """Stored ``weight_scale`` from (N, 1) or () float32 scales."""
        return scale.float().contiguous()

    def clip_search(self) -> bool:
        """The option, or by default: on for per-row scales, off for one per tensor."""
        chosen = self.opts.get("clip_search")
        return not self.per_tensor if chosen is None else bool(chosen)

    # -- the grid ------------------------------------------------------------------

    def _chunks(self, weight: torch.Tensor, group: int | None):
        """(start, stop, rows in the grid's basis as float32) over row chunks of ``weight``."""
        step = rows_per_chunk(tuple(weight.shape))
        for start in range(0, weight.shape[0], step):
            rows = weight[start : start + step]
            rows = rotate_groups(rows, group) if group else rows.to(torch.float32, copy=True)
            yield start, start + rows.shape[0], rows

    def _with_group(self, scales: Tensors, group: int | None) -> Tensors:
        if group:
            scales[ROTATION_KEY] = torch.tensor(group, dtype=torch.int64, device="cpu")  # read back with int()
        return scales

    def compute_scales(self, weight: torch.Tensor) -> Tensors:
        group = self._rotation(tuple(weight.shape))
        if self.per_tensor:
            scale = tensor_scale(lambda: (r for _, _, r in self._chunks(weight, group)), self.qmax, self.clip_search())
            return self._with_group({"weight_scale": scale.reshape(())}, group)
        scale = torch.empty(weight.shape[0], 1, dtype=torch.float32, device=weight.device)
        for start, stop, rows in self._chunks(weight, group):
            scale[start:stop] = group_scales(rows, self.qmax, self.clip_search())
        return self._with_group({"weight_scale": scale}, group)

    @staticmethod
    def _group_of(scales: Mapping[str, torch.Tensor]) -> int | None:
        group = scales.get(ROTATION_KEY)
        return int(group) if group is not None else None

    def to_grid(self, weight: torch.Tensor, scales: Tensors, cols: slice = slice(None)) -> torch.Tensor:
        scale = scales["weight_scale"].float()
        scale = scale.reshape(-1, 1) if scale.dim() else scale
        group = self._group_of(scales)
        if group is None:
            return round_to_codes(weight.float(), scale, self.qmax).mul_(scale)
        start = cols.start or 0
        if cols.step not in (None, 1) or start % group or weight.shape[1] % group:
            raise self._not_elementwise(group, f"columns {cols.start}:{cols.stop} do not align with them")
        rotated = rotate_groups(weight, group)
        return unrotate_groups(round_to_codes(rotated, scale, self.qmax).mul_(scale), group)

    def _not_elementwise(self, group: int, what: str) -> CqError:
        return CqError(
            f"{self.name} with ConvRot rounds whole groups of {group} columns ({what}); "
            "optimizers that round column by column or element by element reach it through grid_basis()."
        )

    def grid_neighbours(
        self, weight: torch.Tensor, scales: Tensors, cols: slice = slice(None)
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # Closed form on an element-wise grid; a rotated grid has no per-element neighbours.
        group = self._group_of(scales)
        if group is not None:
            raise self._not_elementwise(group, "its grid points are not per element")
        scale = scales["weight_scale"].float()
        scale = scale.reshape(-1, 1) if scale.dim() else scale
        scaled = div(weight.float(), scale)
        below = torch.floor(scaled).clamp_(-self.qmax, self.qmax).mul_(scale)
        above = torch.ceil(scaled).clamp_(-self.qmax, self.qmax).mul_(scale)
        return below, above

    def pack(self, weight_on_grid: torch.Tensor, scales: Tensors) -> Tensors:
        return self.encode(weight_on_grid, scales)

    # -- encode / decode -----------------------------------------------------------

    def encode(self, weight: torch.Tensor, scales: Tensors | None = None) -> Tensors:
        return self._encode(weight, scales)

    def encode_measured(self, weight: torch.Tensor, scales: Tensors | None = None) -> tuple[Tensors, float, float]:
        if weight.device.type != "cpu":  # the measurement's arithmetic is the CPU's: measure apart
            return super().encode_measured(weight, scales)
        energy = ErrorEnergy()
        return (self._encode(weight, scales, energy), *energy.totals())

    def _encode(self, weight: torch.Tensor, scales: Tensors | None, energy: ErrorEnergy | None = None) -> Tensors:
        """One pass over row chunks: rotate, choose the rows' scales, round, store. With
        ``energy`` each chunk is also decoded as :meth:`decode_rows` does (codes times
        scale, rotated back) and added to it."""
        shape = tuple(weight.shape)
        group = self._rotation(shape)
        if scales is not None:
            if self._group_of(scales) != group:
                raise CqError(f"{self.name}: scales were computed for another rotation group than this layer's.")
            scale = scales["weight_scale"].to(weight.device, torch.float32)
            scale = scale.reshape(-1, 1) if scale.dim() else scale
        elif self.per_tensor:
            scale = self.compute_scales(weight)["weight_scale"]
        else:
            scale = torch.empty(shape[0], 1, dtype=torch.float32, device=weight.device)
        codes = None
        for start, stop, rows in self._chunks(weight, group):
            if scales is None and not self.per_tensor:
                scale[start:stop] = group_scales(rows, self.qmax, self.clip_search())
            row_scale = scale if scale.dim() == 0 else scale[start:stop]
            rounded = round_to_codes(rows, row_scale, self.qmax)
            stored = self.store_codes(rounded)
            if codes is None:
                codes = torch.empty((shape[0], *stored.shape[1:]), dtype=stored.dtype, device=stored.device)
            codes[start:stop] = stored
            if energy is not None:
                decoded = rounded.mul_(row_scale.float())
                energy.add(weight[start:stop], unrotate_groups(decoded, group) if group else decoded)
        if group and not bool(torch.isfinite(scale * (self.qmax * 2 * math.sqrt(group))).all()):
            # Decoding rotates back in float32: a partial sum of G terms reaches sqrt(G) times the
            # largest rotated value, so beyond FLT_MAX / (2 sqrt(G)) ComfyUI's decode can overflow.
            raise CqError(
                f"{self.name}: magnitudes up to {float(weight.abs().amax()):.4g} overflow float32 in the ConvRot "
                f"rotation (group {group}), so ComfyUI could not decode this weight."
            )
        return {"weight": codes, "weight_scale": self.store_scale(scale)}

    def decode(self, tensors: Mapping[str, torch.Tensor], shape: tuple[int, int] | None = None) -> torch.Tensor:
        return self.decode_rows(tensors, 0, tensors["weight"].shape[0])

    # -- the compute path ----------------------------------------------------------

    #: How comfy-kitchen's eager backend quantizes this layout's activations, per row (after the
    #: layer's ConvRot rotation): codes in [activation_low, activation_qmax]; the row's scale is
    #: ``max(amax, activation_amax_floor) / activation_qmax``, at least ``activation_scale_floor``.
    activation_qmax: ClassVar[int]
    activation_low: ClassVar[int]
    activation_amax_floor: ClassVar[float] = 0.0
    activation_scale_floor: ClassVar[float] = 0.0

    def activation_fake_quant(self, x: torch.Tensor, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The input rotated per ConvRot group (when the layer rotates), quantized per row with
        round-half-even as comfy-kitchen's eager ``int8_linear`` / ``convrot_w4a4_linear`` do,
        dequantized and rotated back into the basis :meth:`decode` returns. The codes are
        bit-exact; the eager kernel multiplies integer codes and scales afterwards, so outputs
        agree to float32 rounding (about 1e-6 relative)."""
        k = x.shape[-1]
        rows = x.reshape(-1, k).float()
        group = self.rotation_group((tensors["weight"].shape[0], k))
        if group:
            rows = unrotate_groups(rows, group)  # H is symmetric: the float32 product ComfyUI forms
        amax = rows.abs().amax(-1, keepdim=True).clamp(min=self.activation_amax_floor)
        scale = (amax / self.activation_qmax).clamp_(min=self.activation_scale_floor)
        # + 0.0: integer codes have no -0
        codes = (rows / scale).round_().clamp_(self.activation_low, self.activation_qmax).add_(0.0)
        values = codes * scale
        return (unrotate_groups(values, group) if group else values).reshape(x.shape)

    def decode_rows(
        self, tensors: Mapping[str, torch.Tensor], start: int, stop: int, shape: tuple[int, int] | None = None
    ) -> torch.Tensor:
        codes = self.load_codes(tensors["weight"][start:stop])
        scale = tensors["weight_scale"].float()
        if scale.dim() > 0:
            scale = scale.reshape(-1, 1)[start:stop]
        values = codes.mul_(scale)
        group = self._rotation((tensors["weight"].shape[0], codes.shape[1]))
        return unrotate_groups(values, group) if group else values
