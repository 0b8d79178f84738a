"""Other producers' NVFP4 imported into ComfyUI's ``nvfp4`` layout by ``cq migrate``.

NVIDIA ModelOpt, compressed-tensors (llm-compressor) and fireworks-prequant all store the
same numbers as ComfyUI, arranged differently (``../shared/FORMATS.md``, "Other producers'
NVFP4"):

- two E2M1 codes per byte with the even column in the **low** nibble (ComfyUI: high);
- E4M3 block scales, one per 16 along K, unswizzled ``[N, K/16]`` (ComfyUI: the cuBLAS
  128x4 tiled layout, ``cq_core.numerics.blockscale.swizzle``);
- a per-tensor global scale, under another name and, for compressed-tensors, as a divisor.

| producer | packed codes | block scales | global scale | activation scale |
|---|---|---|---|---|
| ModelOpt (``modelopt/torch/quantization/qtensor/nvfp4_tensor.py``; export ``hf_quant_config.json``) | ``weight`` U8 | ``weight_scale`` | ``weight_scale_2`` (multiplier) | ``input_scale`` (multiplier) |
| compressed-tensors (``nvfp4-pack-quantized``) | ``weight_packed`` U8 | ``weight_scale`` | ``weight_global_scale`` (divisor) | ``input_global_scale`` (divisor) |
| fireworks-prequant 0.2 (``quantize_weight``) | ``weight`` F4 | ``weight_scale_inv`` | ``weight_scale_global`` (multiplier) | none (dynamic) |

The import swaps the nibbles, swizzles the block scales and writes the global scale as
ComfyUI's multiplier ``weight_scale_2``: the codes and block scales are copied bit for bit.
ModelOpt decodes ``code * (block_scale * weight_scale_2)`` and fireworks-prequant stores the
same multiplier, so their files import bit-exact. compressed-tensors decodes
``code * (block_scale / weight_global_scale)``: ComfyUI's ``code * (weight_scale_2 *
block_scale)`` equals it bit for bit when some float32 ``w`` gives ``w * s == s / g`` for
every block scale ``s`` the layer uses. :func:`divisor_as_multiplier` looks for one among
``1/g`` and its float32 neighbours (always found when ``g`` is a power of two); when there is
none, ``1/g`` rounded is written and the note gives the largest relative difference of the
decode (at most about 2**-23).

Detection is by names and dtypes. ModelOpt's names are ComfyUI's own, so a ModelOpt layer is
told from a ComfyUI layer that lost its metadata by its block-scale shape (``[N, K/16]`` vs
the padded tiles) or by the producer's ``hf_quant_config.json`` / ``config.json`` beside the
file. When every layer's shape fits both and no such file is there, the file is refused in one
sentence that says how to resolve it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch

from cq_core import CheckpointDraft, CqError, FLOAT_SCALE_DTYPES, ForeignImport, ForeignLayer, TensorSpec
from cq_core.numerics.blockscale import swizzle, swizzled_shape
from cq_nvfp4.block_scales import BLOCK

#: FP4 E2M1 pairs, as torch (and fireworks-prequant) type them; None in a torch without it.
FP4_DTYPE = getattr(torch, "float4_e2m1fn_x2", None)
#: ComfyUI's nvfp4 stores rows padded to this (comfy-kitchen ``get_padded_shape``); cq migrate
#: never changes a stored shape that ComfyUI's model detection may read.
ROW_PAD = 16
SCALAR = ()
#: Tensors that may sit beside a layer without belonging to the layout.
MODULE_SUFFIXES = {"bias", "comfy_quant"}
#: ModelOpt's KV-cache scales: no ComfyUI layer reads them.
KV_CACHE_SUFFIXES = {"k_scale", "v_scale"}


def swap_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """Bytes with their two 4-bit halves exchanged: low-nibble-first pairs -> ComfyUI's high-first."""
    packed = packed.view(torch.uint8)
    return ((packed & 0x0F) << 4) | (packed >> 4)


def divisor_as_multiplier(divisor: torch.Tensor, block_scales: torch.Tensor) -> tuple[torch.Tensor, float]:
    """ComfyUI's ``weight_scale_2`` for a producer that divides by ``divisor`` (compressed-tensors).

    ``block_scales``: the E4M3 block scales the layer uses (any shape). Returns ``(w, error)``:
    a float32 scalar ``w`` and the largest relative difference between ``w * s`` and ``s /
    divisor`` over those scales ``s`` (0.0: every block decodes bit-exact). Tries ``1/divisor``
    rounded to float32 and its two neighbours; when none is exact, ``1/divisor`` is returned.
    """
    g = divisor.float().reshape(SCALAR)
    values = torch.unique(block_scales.view(torch.float8_e4m3fn).float())
    values = values[values > 0]
    wanted = values / g
    nearest = (1.0 / g).reshape(SCALAR)
    best, best_error = nearest, math.inf
    for w in (nearest, torch.nextafter(nearest, torch.tensor(math.inf)),
              torch.nextafter(nearest, torch.tensor(0.0))):
        got = values * w
        error = float(((got - wanted).abs() / wanted).max()) if values.numel() else 0.0
        if error == 0.0:
            return w, 0.0
        if w is nearest:
            best, best_error = w, error
    return best, best_error


def _positive_scalar(draft: CheckpointDraft, name: str) -> torch.Tensor:
    """The float32 value of a one-element scale; CqError naming it unless positive and finite."""
    value = draft.read(name).float().reshape(SCALAR)
    if not bool(torch.isfinite(value)) or float(value) <= 0:
        raise CqError(
            f"{draft.path}: scale tensor {name!r} holds {float(value)} (a scale must be positive and finite), "
            "so its layer cannot be decoded; nothing was written."
        )
    return value


def _one_element_float(spec: TensorSpec | None) -> bool:
    return spec is not None and spec.dtype in FLOAT_SCALE_DTYPES and math.prod(spec.shape) == 1


def _block_scale_shape(packed: TensorSpec) -> tuple[int, int]:
    rows, pairs = packed.shape
    return rows, 2 * pairs // BLOCK


def _layer_problem(packed: TensorSpec) -> str | None:
    """Why ComfyUI's nvfp4 cannot hold this layer as it is (shapes only), or None."""
    rows, pairs = packed.shape
    if (2 * pairs) % BLOCK:
        return f"K={2 * pairs} is not a multiple of {BLOCK}, the NVFP4 block"
    if rows % ROW_PAD:
        return (f"N={rows} is not a multiple of {ROW_PAD}: ComfyUI's nvfp4 stores rows padded to {ROW_PAD}, "
                "and cq migrate does not change a stored shape ComfyUI's model detection may read")
    return None


def _import(
    draft: CheckpointDraft,
    found: ForeignLayer,
    *,
    packed: str,
    block_scales: str,
    global_scale: str,
    global_value: Callable[[], torch.Tensor],
    input_scale: tuple[str, Callable[[], torch.Tensor]] | None,
    how: str,
) -> None:
    """Rewrite one layer in ComfyUI's nvfp4: codes nibble-swapped under ``L.weight``, block
    scales swizzled under ``L.weight_scale``, ``L.weight_scale_2`` and ``L.input_scale`` as given."""
    layer = found.layer
    spec = draft.spec(packed)
    rows, pairs = spec.shape
    scale_rows, scale_cols = _block_scale_shape(spec)

    def codes(load=draft.tensors[packed].load) -> torch.Tensor:
        return swap_nibbles(load())

    def tiles(load=draft.tensors[block_scales].load) -> torch.Tensor:
        return swizzle(load().view(torch.uint8)).view(torch.float8_e4m3fn)

    draft.rewrite(packed, new_name=f"{layer}.weight", spec=TensorSpec(torch.uint8, (rows, pairs)), load=codes)
    draft.rewrite(block_scales, new_name=f"{layer}.weight_scale",
                  spec=TensorSpec(torch.float8_e4m3fn, swizzled_shape(scale_rows, scale_cols)), load=tiles)
    value = global_value()
    draft.rewrite(global_scale, new_name=f"{layer}.weight_scale_2", spec=TensorSpec(torch.float32, SCALAR),
                  load=lambda v=value: v.clone())
    if input_scale is not None:
        name, compute = input_scale
        activation = compute()
        draft.rewrite(name, new_name=f"{layer}.input_scale", spec=TensorSpec(torch.float32, SCALAR),
                      load=lambda v=activation: v.clone())
    for suffix in sorted(KV_CACHE_SUFFIXES):
        if f"{layer}.{suffix}" in draft.tensors:
            draft.drop(f"{layer}.{suffix}", "a KV-cache scale; no ComfyUI layer reads it")
    draft.layers[layer] = {"format": "nvfp4"}
    draft.note(layer, f"{found.layout} -> nvfp4: {how}")




# ---------------------------------------------------------------------------
# NVIDIA ModelOpt
# ---------------------------------------------------------------------------

MODELOPT = "NVIDIA ModelOpt NVFP4"


def modelopt_producer(draft: CheckpointDraft) -> dict | None:
    """ModelOpt's quantization section when the producer's files beside the checkpoint name
    ModelOpt and an NVFP4 algorithm, else None. ModelOpt's HF export writes
    ``hf_quant_config.json`` (``{"producer": {"name": "modelopt"}, "quantization": {"quant_algo":
    "NVFP4", ...}}``) and ``config.json`` with ``quantization_config.quant_method == "modelopt"``."""
    for filename, producer_of, section_of in (
        ("hf_quant_config.json", lambda c: (c.get("producer") or {}).get("name"), lambda c: c.get("quantization")),
        ("config.json", lambda c: (c.get("quantization_config") or {}).get("quant_method"),
         lambda c: c.get("quantization_config")),
    ):
        config = draft.beside(filename)
        if not isinstance(config, dict) or producer_of(config) != "modelopt":
            continue
        section = section_of(config)
        if isinstance(section, dict) and "NVFP4" in str(section.get("quant_algo", "")).upper():
            return section
    return None


def _modelopt_shape(stored: Mapping[str, TensorSpec]) -> str | None:
    """"modelopt", "comfyui" or "either": whose block-scale arrangement the layer's shape fits."""
    weight, scale, scale_2 = stored.get("weight"), stored.get("weight_scale"), stored.get("weight_scale_2")
    if weight is None or weight.dtype != torch.uint8 or len(weight.shape) != 2:
        return None
    if scale is None or scale.dtype != torch.float8_e4m3fn or not _one_element_float(scale_2):
        return None
    extra = set(stored) - {"weight", "weight_scale", "weight_scale_2", "input_scale", "pre_quant_scale"}
    if extra - MODULE_SUFFIXES - KV_CACHE_SUFFIXES:
        return None
    flat = _block_scale_shape(weight)
    tiled = swizzled_shape(*flat)
    fits_flat, fits_tiled = tuple(scale.shape) == flat, tuple(scale.shape) == tiled
    if fits_flat and fits_tiled:
        return "either"
    return "modelopt" if fits_flat else "comfyui" if fits_tiled else None


class ModelOptNvfp4(ForeignImport):
    name = "modelopt_nvfp4"
    description = (
        "NVIDIA ModelOpt NVFP4 (weight U8 low-nibble-first, weight_scale E4M3 [N, K/16], weight_scale_2, "
        "input_scale) -> nvfp4, bit-exact."
    )

    def foreign_layers(self, draft: CheckpointDraft) -> list[ForeignLayer]:
        shapes = {layer: fit for layer, stored in draft.layer_tensors().items() if (fit := _modelopt_shape(stored))}
        flat = [layer for layer, fit in shapes.items() if fit == "modelopt"]
        tiled = [layer for layer, fit in shapes.items() if fit == "comfyui"]
        if draft.producer == "comfyui":
            return []  # the user says: ComfyUI's own layout that lost its metadata
        producer = self.producer = modelopt_producer(draft) if shapes else None
        if producer is None and draft.producer == self.name:
            producer = self.producer = {}
        if not flat and producer is None:
            if tiled or not shapes:
                return []  # ComfyUI's own layout without metadata: the formats' contracts label it
            first = next(iter(shapes))
            message = (
                f"{len(shapes)} layers such as {first!r} store NVFP4 tensors without metadata "
                f"({CheckpointDraft.describe(draft.spec(f'{first}.weight_scale'))} weight_scale) whose shapes fit both ComfyUI's "
                "swizzled block scales and NVIDIA ModelOpt's unswizzled ones, so cq cannot tell which; for a ModelOpt "
                "export put its hf_quant_config.json beside the file or pass --producer modelopt_nvfp4, for a "
                "ComfyUI file that lost its metadata pass --producer comfyui."
            )
            return [ForeignLayer(layer, MODELOPT, None, message, ["nvfp4", MODELOPT]) for layer in shapes]
        if tiled:
            evidence = "the file is said to be ModelOpt's" if producer is not None else \
                f"layers such as {flat[0]!r} store them unswizzled"
            message = (
                f"layer {tiled[0]!r} stores its block scales swizzled as ComfyUI does, while {evidence}; a file "
                "from one producer would not mix both, so cq imports neither."
            )
            return [ForeignLayer(layer, MODELOPT, None, message, ["nvfp4", MODELOPT]) for layer in shapes]
        found = []
        for layer in shapes:
            problem = _layer_problem(draft.spec(f"{layer}.weight"))
            found.append(ForeignLayer(layer, MODELOPT, "nvfp4", problem and f"{MODELOPT}: {problem}"))
        return found

    def import_layer(self, draft: CheckpointDraft, found: ForeignLayer) -> None:
        layer = found.layer
        section = getattr(self, "producer", None) or {}
        input_scale = None
        if f"{layer}.input_scale" in draft.tensors:
            if "FP8" in str(section.get("quant_algo", "")).upper():
                # W4A8_NVFP4_FP8: an FP8 activation scale (amax / 448), not NVFP4's global one.
                draft.drop(f"{layer}.input_scale", "an FP8 activation scale (W4A8); ComfyUI's nvfp4 reads "
                           "input_scale as the NVFP4 global scale, so it computes one per call instead")
            else:
                name = f"{layer}.input_scale"
                input_scale = (name, lambda n=name: _positive_scalar(draft, n))
        if f"{layer}.pre_quant_scale" in draft.tensors:
            spec = draft.spec(f"{layer}.pre_quant_scale")
            draft.replace(f"{layer}.pre_quant_scale", dtype=torch.float32, shape=(math.prod(spec.shape),))
        name = f"{layer}.weight_scale_2"
        _import(draft, found, packed=f"{layer}.weight", block_scales=f"{layer}.weight_scale",
                global_scale=name, global_value=lambda: _positive_scalar(draft, name), input_scale=input_scale,
                how="nibbles swapped, block scales swizzled, weight_scale_2 and input_scale copied (bit-exact)")


# ---------------------------------------------------------------------------
# compressed-tensors (llm-compressor releases)
# ---------------------------------------------------------------------------

COMPRESSED_TENSORS = "compressed-tensors NVFP4"


class CompressedTensorsNvfp4(ForeignImport):
    name = "compressed_tensors_nvfp4"
    description = (
        "compressed-tensors nvfp4-pack-quantized (weight_packed, weight_scale [N, K/16], weight_global_scale "
        "= 1/weight_scale_2, input_global_scale) -> nvfp4."
    )

    def foreign_layers(self, draft: CheckpointDraft) -> list[ForeignLayer]:
        found = []
        for layer, stored in draft.layer_tensors().items():
            packed = stored.get("weight_packed")
            if packed is None or packed.dtype != torch.uint8 or len(packed.shape) != 2:
                continue
            scale, divisor = stored.get("weight_scale"), stored.get("weight_global_scale")
            if scale is None or scale.dtype != torch.float8_e4m3fn or not _one_element_float(divisor):
                continue
            problem = None
            if "weight_zero_point" in stored:
                problem = "has a weight_zero_point (asymmetric NVFP4), which ComfyUI's nvfp4 cannot hold"
            elif "weight" in stored:
                problem = f"holds both {layer}.weight and {layer}.weight_packed"
            elif tuple(scale.shape) != _block_scale_shape(packed):
                problem = (f"{layer}.weight_scale is {CheckpointDraft.describe(scale)}; compressed-tensors stores one E4M3 scale "
                           f"per 16 along K, {list(_block_scale_shape(packed))} next to {CheckpointDraft.describe(packed)} codes")
            elif "input_global_scale" in stored and not _one_element_float(stored["input_global_scale"]):
                problem = f"{layer}.input_global_scale is {CheckpointDraft.describe(stored['input_global_scale'])}, not one float"
            else:
                problem = _layer_problem(packed)
            found.append(ForeignLayer(layer, COMPRESSED_TENSORS, "nvfp4", problem and f"{COMPRESSED_TENSORS}: {problem}"))
        return found

    def import_layer(self, draft: CheckpointDraft, found: ForeignLayer) -> None:
        layer = found.layer
        divisor = _positive_scalar(draft, f"{layer}.weight_global_scale")
        block_scales = draft.read(f"{layer}.weight_scale")
        if not bool(torch.isfinite(block_scales.float()).all()):
            raise CqError(f"{draft.path}: block scales {layer + '.weight_scale'!r} hold NaN; the layer cannot be decoded.")
        multiplier, error = divisor_as_multiplier(divisor, block_scales)
        how = "nibbles swapped, block scales swizzled, weight_scale_2 = 1/weight_global_scale"
        how += " (bit-exact)" if error == 0.0 else (
            f" (1/{float(divisor)!r} is not exact in float32: decodes differ from compressed-tensors' by at "
            f"most {error:.1e} relative)")
        input_scale = None
        if f"{layer}.input_global_scale" in draft.tensors:
            name = f"{layer}.input_global_scale"
            # ComfyUI multiplies by input_scale where compressed-tensors divides by input_global_scale.
            input_scale = (name, lambda: 1.0 / _positive_scalar(draft, name))
            how += "; input_scale = 1/input_global_scale"
        _import(draft, found, packed=f"{layer}.weight_packed", block_scales=f"{layer}.weight_scale",
                global_scale=f"{layer}.weight_global_scale", global_value=lambda: multiplier,
                input_scale=input_scale, how=how)


# ---------------------------------------------------------------------------
# fireworks-prequant
# ---------------------------------------------------------------------------

FIREWORKS = "fireworks-prequant NVFP4"


class FireworksNvfp4(ForeignImport):
    name = "fireworks_nvfp4"
    description = (
        "fireworks-prequant NVFP4 (weight F4 low-nibble-first, weight_scale_inv E4M3 [N, K/16], "
        "weight_scale_global) -> nvfp4, bit-exact."
    )

    def foreign_layers(self, draft: CheckpointDraft) -> list[ForeignLayer]:
        if FP4_DTYPE is None:
            return []
        found = []
        for layer, stored in draft.layer_tensors().items():
            weight, scale = stored.get("weight"), stored.get("weight_scale_inv")
            if weight is None or weight.dtype != FP4_DTYPE or len(weight.shape) != 2:
                continue
            if scale is None or scale.dtype != torch.float8_e4m3fn or not _one_element_float(
                stored.get("weight_scale_global")
            ):
                continue
            problem = None
            if tuple(scale.shape) != _block_scale_shape(weight):
                problem = (f"{layer}.weight_scale_inv is {CheckpointDraft.describe(scale)}; fireworks-prequant stores one E4M3 scale "
                           f"per 16 along K, {list(_block_scale_shape(weight))}")
            else:
                problem = _layer_problem(weight)
            found.append(ForeignLayer(layer, FIREWORKS, "nvfp4", problem and f"{FIREWORKS}: {problem}"))
        return found

    def import_layer(self, draft: CheckpointDraft, found: ForeignLayer) -> None:
        layer = found.layer
        name = f"{layer}.weight_scale_global"
        _import(draft, found, packed=f"{layer}.weight", block_scales=f"{layer}.weight_scale_inv",
                global_scale=name, global_value=lambda: _positive_scalar(draft, name), input_scale=None,
                how="F4 codes nibble-swapped into U8, weight_scale_inv swizzled into weight_scale, "
                    "weight_scale_global copied as weight_scale_2 (bit-exact)")

