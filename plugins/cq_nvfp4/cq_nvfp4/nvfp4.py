"""NVFP4: FP4 E2M1 codes with FP8 e4m3 block scales (one per 16 along K) and an fp32 global scale.

Stored, for a weight of shape (N, K) padded to (Np, Kp) = multiples of 16:
- ``weight``: U8 (Np, Kp/2), two codes per byte, even element in the high nibble;
- ``weight_scale``: F8_E4M3 block scales in the cuBLAS tiled layout,
  (roundup(Np, 128), roundup(Kp/16, 4));
- ``weight_scale_2``: F32 scalar;
- ``input_scale``: F32 scalar, only when the ``input_scale`` option is given
  (without it ComfyUI scales activations dynamically).

ComfyUI decodes ``e2m1(code) * (weight_scale_2 * block_scale)`` in fp32 and
slices to (N, K). The scales that optimizers see are unswizzled and unpadded:
``block_scale`` float32 (N, Kp/16) holding e4m3 values, and ``weight_scale_2``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from cq_core import (
    FLOAT_SCALE_DTYPES,
    Contract,
    Format,
    LayerInfo,
    Option,
    TensorRule,
    Tensors,
    TensorSpec,
    UsageError,
    one_element,
)
from cq_core.numerics.blockscale import (
    PaddedTensors,
    blocks_at,
    pad_2d,
    roundup,
    scales_per_column,
    stored_rows,
    swizzle,
    swizzled_shape,
)
from cq_core.numerics.metrics import ErrorEnergy, rows_per_chunk
from cq_nvfp4 import e2m1
from cq_nvfp4.block_scales import (
    AMAX,
    BLOCK,
    E4M3_MAX,
    EXACT,
    SCALE_SEARCHES,
    best_octave,
    choose_block_scales,
    global_scale,
    inverse_scale,
    rounded_blocks,
    searched_global_scale,
)

PAD = 16
SCALAR = ()
#: The ``global_scale`` option: chosen jointly with the block scales, ComfyUI's amax/2688, or
#: the first with exact block scales and the second otherwise.
SEARCH, GLOBAL_AMAX, AUTO = "search", "amax", "auto"
GLOBAL_SCALES = (AUTO, SEARCH, GLOBAL_AMAX)
_BOOLEANS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def _packed_weight(weight_shape: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
    ok = len(weight_shape) == 2 and not weight_shape[0] % PAD and not (2 * weight_shape[1]) % PAD
    return (tuple(weight_shape),) if ok else ()


def _swizzled_block_scales(weight_shape: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
    return (swizzled_shape(weight_shape[0], 2 * weight_shape[1] // BLOCK),)


def _input_channels(weight_shape: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
    # One per input channel: K, which the stored weight shows only padded to 16.
    padded = 2 * weight_shape[1]
    return tuple((k,) for k in range(padded, max(padded - PAD, 0), -1))


#: What ComfyUI 0.30 loads for nvfp4 (``comfy/quant_ops.py`` QUANT_ALGOS["nvfp4"]: parameters
#: ``weight_scale``, ``weight_scale_2``, ``input_scale``, ``pre_quant_scale``; ``comfy/ops.py``
#: ``_load_quantized_module`` views ``weight_scale`` as e4m3, raises without either scale, and
#: multiplies the input by ``pre_quant_scale`` first). Padding follows comfy-kitchen's
#: ``get_padded_shape`` (multiples of 16).
NVFP4_CONTRACT = Contract(
    tensors={
        "weight": TensorRule((torch.uint8,), _packed_weight, describe="U8 E2M1 pairs, padded to multiples of 16"),
        "weight_scale": TensorRule(
            (torch.float8_e4m3fn, torch.uint8), _swizzled_block_scales, view=True,
            describe="E4M3 block scales, swizzled",
        ),
        "weight_scale_2": TensorRule(FLOAT_SCALE_DTYPES, one_element, describe="a float scalar"),
        "input_scale": TensorRule(FLOAT_SCALE_DTYPES, one_element, required=False, describe="a float scalar"),
        "pre_quant_scale": TensorRule(
            FLOAT_SCALE_DTYPES, _input_channels, required=False, describe="one float per input channel"
        ),
    },
    json={"full_precision_matrix_mult": bool},
)


def nvfp4_fake_quant(x: torch.Tensor, input_scale: torch.Tensor | None = None) -> torch.Tensor:
    """``x`` (..., K) float32 quantized to NVFP4 and dequantized, step for step as comfy-kitchen's
    eager ``quantize_nvfp4`` / ``dequantize_nvfp4``: per block of 16 along K (K zero-padded to
    16), the scale ``amax / 6 / global`` clamped to 448 and rounded to e4m3; the values divided
    by ``global * scale``, clamped to ±6, rounded to E2M1 (ties to even), multiplied back.

    ``input_scale``: the global scale (a stored ``L.input_scale``); None computes it per call
    from the whole input, as ComfyUI does: ``amax(|x|) / (448 * 6)``."""
    k = x.shape[-1]
    rows = x.reshape(-1, k).float()
    if input_scale is None:
        g = torch.amax(rows.abs()) / (E4M3_MAX * e2m1.MAX)
    else:
        g = input_scale.to(rows.device, torch.float32).reshape(())
    blocks = pad_2d(rows, rows.shape[0], roundup(k, PAD)).reshape(rows.shape[0], -1, BLOCK)
    block_scale = (blocks.abs().amax(-1) / e2m1.MAX / g).clamp_(max=E4M3_MAX)
    total = g * block_scale.to(torch.float8_e4m3fn).float()
    safe = torch.where(total == 0, torch.ones_like(total), total).unsqueeze(-1)
    ratio = torch.where(total.unsqueeze(-1) == 0, 0.0, blocks / safe).clamp_(-e2m1.MAX, e2m1.MAX)
    # comfy-kitchen keeps the sign of a value that rounds to zero (-0): the same bits here
    values = torch.copysign(e2m1.nearest(ratio), ratio) * total.unsqueeze(-1)
    return values.reshape(rows.shape[0], -1)[:, :k].reshape(x.shape)


class Nvfp4Format(Format):
    name = "nvfp4"
    description = "FP4 E2M1 with e4m3 scales per 16 along K and a global scale (Blackwell tensor cores)."
    contract = NVFP4_CONTRACT
    comfyui_since = "0.30.0"  # in QUANT_ALGOS of every ComfyUI the tests read (0.30.0 the oldest)
    comfyui_lora = ("merged: re-quantized with new global and block scales, whose noise can swamp the LoRA's change; "
                    "with --awq the LoRA is added to W / pre_quant_scale, its effect scaled by it per input channel")
    # ComfyUI 0.30 ``comfy/ops.py`` emulates nvfp4 unless ``supports_nvfp4_compute`` (compute
    # capability >= 10: Blackwell).
    native_gpus = ("blackwell",)
    #: input_scale is the activation's global scale: block scale 448 times E2M1's 6.
    activation_max = E4M3_MAX * e2m1.MAX
    options = (
        Option(
            "scale_search",
            str,
            EXACT,
            "Each block's e4m3 scale: exact (the least squared error over every e4m3 value, found "
            "exactly; default), neighbours (amax/6 and its two e4m3 neighbours: the default before "
            "docs/scales.md, bit for bit), or off (the plain amax/6 recipe). true/false mean exact/off.",
            choices=SCALE_SEARCHES,
        ),
        Option(
            "global_scale",
            str,
            AUTO,
            "weight_scale_2: search (chosen jointly with exact block scales: amax/1344, or a power of "
            "two below it where that lowers the total error; never more error than amax/2688), amax "
            "(ComfyUI's amax/2688), or auto (search with scale_search=exact, else amax).",
            choices=GLOBAL_SCALES,
        ),
        Option(
            "input_scale",
            float,
            None,
            "Static activation scale written as L.input_scale; omitted by default (ComfyUI then "
            "computes it per call).",
            positive=True,
        ),
    )

    def __init__(self, **options) -> None:
        search = options.get("scale_search")
        if isinstance(search, bool) or (isinstance(search, str) and search.strip().lower() in _BOOLEANS):
            # Recipes written before the option had modes say true (the search) or false (amax/6).
            truthy = search is True or (isinstance(search, str) and _BOOLEANS[search.strip().lower()])
            options["scale_search"] = EXACT if truthy else AMAX
        super().__init__(**options)
        if self.opts["global_scale"] == SEARCH and self.opts["scale_search"] != EXACT:
            raise UsageError(
                "Option global_scale=search of format 'nvfp4' needs scale_search=exact (its proof "
                "of never losing rests on exact block scales)."
            )

    @property
    def searches_global_scale(self) -> bool:
        return self.opts["global_scale"] == SEARCH or (
            self.opts["global_scale"] == AUTO and self.opts["scale_search"] == EXACT
        )

    @classmethod
    def from_layer_config(cls, config, stored: Mapping[str, TensorSpec]) -> Format:
        # A static input scale is visible only as a stored tensor; its value does not affect decode.
        return cls(input_scale=1.0) if "input_scale" in stored else cls()

    # -- what the format takes -------------------------------------------------

    def accepts(self, layer: LayerInfo) -> str | None:
        refusal = super().accepts(layer)
        if refusal:
            return refusal
        n = layer.shape[0]
        if layer.bias_shape is not None and n % PAD:
            return f"has a bias and N={n} is not a multiple of {PAD}: the padded nvfp4 GEMM would break it"
        return None

    def stored_specs(self, shape: tuple[int, ...]) -> dict[str, TensorSpec]:
        n, k = roundup(shape[0], PAD), roundup(shape[1], PAD)
        specs = {
            "weight": TensorSpec(torch.uint8, (n, k // 2)),
            "weight_scale": TensorSpec(torch.float8_e4m3fn, swizzled_shape(n, k // BLOCK)),
            "weight_scale_2": TensorSpec(torch.float32, SCALAR),
        }
        if self.opts["input_scale"] is not None:
            specs["input_scale"] = TensorSpec(torch.float32, SCALAR)
        return specs

    def logical_shape(self, stored: Mapping[str, TensorSpec]) -> tuple[int, ...]:
        n, packed = stored["weight"].shape  # two FP4 values per byte, padded to PAD
        return (n, 2 * packed)

    # -- the grid, for optimizers --------------------------------------------

    def compute_scales(self, weight: torch.Tensor) -> Tensors:
        return self._encode_or_scale(weight, None, codes=False)[1]

    scale_block = BLOCK

    def refit_scales(
        self, weight: torch.Tensor, scales: Tensors, cols: slice, importance: torch.Tensor | None = None
    ) -> Tensors:
        # The block's e4m3 scale, searched as compute_scales does, for the values given;
        # the global scale stays (the other blocks depend on it).
        start = cols.start or 0
        if start % BLOCK or weight.shape[1] > BLOCK:
            raise ValueError(f"nvfp4 refits one aligned block of {BLOCK} columns at a time")
        block = pad_2d(weight.float(), weight.shape[0], BLOCK).unsqueeze(1)
        if importance is not None:
            importance = pad_2d(importance.float().reshape(1, -1), 1, BLOCK).reshape(BLOCK)
        g = scales["weight_scale_2"].to(block.device)
        chosen, _ = choose_block_scales(block, g, self.opts["scale_search"], importance)
        scales["block_scale"][:, start // BLOCK] = chosen[:, 0].to(scales["block_scale"].device)
        return scales

    @staticmethod
    def _nearest(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """Nearest E2M1 values of ``weight / scale`` (``scale`` broadcasts; a zero scale gives 0)."""
        return e2m1.nearest(weight * inverse_scale(scale))

    def _column_scales(self, scales: Tensors, cols: slice, width: int) -> torch.Tensor:
        block_scale = scales["block_scale"]
        g = scales["weight_scale_2"].to(block_scale.device)
        # The same fp32 product ComfyUI forms before multiplying the codes.
        return g * scales_per_column(block_scale, BLOCK, cols, width)

    def to_grid(self, weight: torch.Tensor, scales: Tensors, cols: slice = slice(None)) -> torch.Tensor:
        scale = self._column_scales(scales, cols, weight.shape[1])
        return self._nearest(weight.float(), scale).mul_(scale)

    def grid_neighbours(
        self, weight: torch.Tensor, scales: Tensors, cols: slice = slice(None)
    ) -> tuple[torch.Tensor, torch.Tensor]:
        scale = self._column_scales(scales, cols, weight.shape[1])
        ratio = weight.float().abs() * inverse_scale(scale)
        low, high = e2m1.magnitude_below_above(ratio)
        low, high = low * scale, high * scale
        negative = weight < 0
        return torch.where(negative, -high, low), torch.where(negative, -low, high)

    def _stored(self, packed: torch.Tensor, block_scale: torch.Tensor, g: torch.Tensor, shape) -> Tensors:
        rows = packed.shape[0]
        block_scale = pad_2d(block_scale, rows, block_scale.shape[1])
        stored = {
            "weight": packed,
            "weight_scale": swizzle(block_scale.to(torch.float8_e4m3fn).view(torch.uint8)).view(
                torch.float8_e4m3fn
            ),
            "weight_scale_2": g.float().reshape(SCALAR),
        }
        if self.opts["input_scale"] is not None:
            stored["input_scale"] = torch.tensor(self.opts["input_scale"], dtype=torch.float32, device="cpu")
        return PaddedTensors(stored, tuple(shape))

    def pack(self, weight_on_grid: torch.Tensor, scales: Tensors) -> Tensors:
        return self.encode(weight_on_grid, scales)

    def encode(self, weight: torch.Tensor, scales: Tensors | None = None) -> Tensors:
        packed, scales = self._encode_or_scale(weight, scales, codes=True)
        return self._stored(packed, scales["block_scale"], scales["weight_scale_2"], tuple(weight.shape))

    def encode_measured(self, weight: torch.Tensor, scales: Tensors | None = None) -> tuple[Tensors, float, float]:
        if weight.device.type != "cpu":  # the measurement's arithmetic is the CPU's: measure apart
            return super().encode_measured(weight, scales)
        energy = ErrorEnergy()
        packed, scales = self._encode_or_scale(weight, scales, codes=True, energy=energy)
        stored = self._stored(packed, scales["block_scale"], scales["weight_scale_2"], tuple(weight.shape))
        return (stored, *energy.totals())

    def _encode_or_scale(
        self, weight: torch.Tensor, scales: Tensors | None, codes: bool, energy: ErrorEnergy | None = None
    ):
        """(packed codes or None, scales): one pass over row chunks, choosing block scales
        (when ``scales`` is None) and coding each chunk from the same rounded values.

        With ``energy``, each chunk is also decoded while in cache, with the arithmetic
        of :meth:`decode_rows` (codes' values times the fp32 product of global and e4m3
        block scale), and added to it.

        With the global-scale search, the pass runs at :func:`searched_global_scale`; only
        where some blocks lie in e4m3's subnormal range does :func:`best_octave` weigh lower
        powers of two, and the pass runs again at one that wins (its energy replaces the first's).
        """
        if scales is not None:
            return self._pass(weight, scales, None, codes, energy)
        low, high = torch.aminmax(weight)
        amax = torch.maximum(-low, high)
        if not self.searches_global_scale:
            return self._pass(weight, None, global_scale(amax), codes, energy)
        g = searched_global_scale(amax)
        n, k = weight.shape
        record = torch.empty((2, n, roundup(k, PAD) // BLOCK), dtype=torch.int32, device=weight.device)
        first = ErrorEnergy() if energy is not None else None
        result = self._pass(weight, None, g, codes, first, record)
        octave = best_octave(record.reshape(2, -1), g, lambda index: blocks_at(weight, index, BLOCK))
        if octave:
            again = ErrorEnergy() if energy is not None else None
            result = self._pass(weight, None, g * 2.0**octave, codes, again)
            first = again
        if energy is not None:
            energy.signal, energy.noise = first.signal, first.noise
        return result

    def _pass(self, weight, scales, g, codes: bool, energy: ErrorEnergy | None, record=None):
        """One pass of :meth:`_encode_or_scale` at given ``scales``, or choosing block scales at
        the global scale ``g`` (filling ``record``, see :func:`exact_block_scales`)."""
        n, k = weight.shape
        padded_cols = roundup(k, PAD)
        if scales is None:
            block_scale = torch.empty((n, padded_cols // BLOCK), dtype=torch.float32, device=weight.device)
        else:
            # Stored scales are e4m3: code with exactly what decoders will read.
            block_scale = scales["block_scale"].to(weight.device, torch.float8_e4m3fn).float()
            g = scales["weight_scale_2"].to(weight.device, torch.float32)
        packed = torch.zeros((roundup(n, PAD), padded_cols // 2), dtype=torch.uint8, device=weight.device) \
            if codes else None
        step = rows_per_chunk(tuple(weight.shape))
        for start in range(0, n, step):
            stop = min(start + step, n)
            # Padded to whole blocks, one scale broadcasts over each block: no per-column scales.
            blocks = pad_2d(weight[start:stop].float(), stop - start, padded_cols).reshape(stop - start, -1, BLOCK)
            if scales is None:
                block_scale[start:stop], values = choose_block_scales(
                    blocks, g, self.opts["scale_search"], record=None if record is None else record[:, start:stop]
                )
            else:
                values = rounded_blocks(blocks, g * block_scale[start:stop])[1]
            if codes:
                packed[start:stop] = e2m1.pack_pairs(e2m1.codes(values).reshape(stop - start, -1))
            if energy is not None:
                total_scale = g.float().reshape(()) * block_scale[start:stop]
                decoded = values.mul_(total_scale.unsqueeze(-1)).reshape(stop - start, padded_cols)[:, :k]
                energy.add(weight[start:stop], decoded)
        return packed, {"block_scale": block_scale, "weight_scale_2": g}

    # -- the compute path --------------------------------------------------------

    def activation_fake_quant(self, x: torch.Tensor, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The input times ``pre_quant_scale`` (when stored), then NVFP4 in two levels as
        comfy-kitchen's eager ``quantize_nvfp4`` does it and dequantized (bit-exact).

        The global scale is ``input_scale`` when stored, else ``amax(|x|) / (448 * 6)`` over
        the whole call's input (``comfy/quant_ops.py`` ``TensorCoreNVFP4Layout.quantize``).
        """
        smoothing = tensors.get("pre_quant_scale")
        if smoothing is not None:  # comfy/ops.py: input * pre_quant_scale, before quantizing
            x = x * smoothing.to(x.device, x.dtype)
        return nvfp4_fake_quant(x, tensors.get("input_scale"))

    # -- decode ----------------------------------------------------------------

    def decode(self, tensors: Mapping[str, torch.Tensor], shape: tuple[int, int] | None = None) -> torch.Tensor:
        packed = tensors["weight"]
        return self.decode_rows(tensors, 0, packed.shape[0], shape=shape)

    def decode_rows(
        self, tensors: Mapping[str, torch.Tensor], start: int, stop: int, shape: tuple[int, int] | None = None
    ) -> torch.Tensor:
        """Rows ``start:stop``, sliced to the unpadded width; ``shape`` is the weight's (N, K).

        Without ``shape`` the unpadded shape comes from tensors that :meth:`encode`
        made; tensors read from a file decode at their padded shape.
        """
        packed = tensors["weight"]
        padded_cols = packed.shape[1] * 2
        stop, k, block_scale = stored_rows(tensors, (packed.shape[0], padded_cols), BLOCK, start, stop, shape)
        block_scale = block_scale.view(torch.float8_e4m3fn).float()
        total_scale = tensors["weight_scale_2"].float() * block_scale
        values = e2m1.decode_codes(e2m1.unpack_pairs(packed[start:stop]))
        values = values.reshape(stop - start, -1, BLOCK).mul_(total_scale.unsqueeze(-1))
        values = values.reshape(stop - start, padded_cols)[:, :k]
        smoothing = tensors.get("pre_quant_scale")
        if smoothing is not None:  # ComfyUI multiplies the input by it: the weight it applies is W * s
            values = values * smoothing.float().reshape(1, -1)
        return values
