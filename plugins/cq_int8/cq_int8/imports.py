"""Hugging Face FP8 with 2-D block scales, re-quantized into ComfyUI's per-row ``int8_tensorwise``.

Hugging Face FP8 releases (DeepSeek-V3's layout; ``quantization_config`` ``{"quant_method":
"fp8", "weight_block_size": [128, 128]}``; also fireworks-prequant's ``mxfp8_bw128``) store
``L.weight`` F8_E4M3 ``[N, K]`` and ``L.weight_scale_inv`` float ``[ceil(N/128), ceil(K/128)]``:
one dequantization multiplier per 128x128 tile, ``W = weight * weight_scale_inv[i // 128, j // 128]``
(the name notwithstanding). No ComfyUI layout has 2-D FP8 tiles, so the import decodes each
layer as the producer does and quantizes it again, round to nearest.

Which ComfyUI layout keeps most of it was measured (``bench/foreign_imports.py``, weight SQNR
against the FP8 decode on the 37 Linear weights of all-MiniLM-L6-v2 quantized with
fireworks-prequant's ``quantize_weight_bw128``): per-row int8_tensorwise 41.1 dB, per-tensor
float8_e4m3fn 32.2 dB, mxfp8 31.5 dB, per-tensor INT8 32.6 dB (docs/migrate.md has the table). Re-rounding an FP8 value to
another FP8 grid adds a full FP8 error again; INT8's 255 uniform steps per row are finer than
e4m3's 3 mantissa bits at all but the smallest magnitudes. The format ComfyUI loads is
``int8_tensorwise`` with an ``(N, 1)`` scale; its SQNR against the source decode is reported
per layer when the file is written.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from cq_core import CheckpointDraft, CqError, FLOAT_SCALE_DTYPES, ForeignImport, ForeignLayer, Note, TensorSpec
from cq_core.numerics.metrics import tensor_sqnr_db
from cq_int8.tensorwise import Int8TensorwiseFormat

HF_FP8_BLOCKS = "Hugging Face FP8 (128x128 block weight_scale_inv)"
#: DeepSeek-V3's and most releases' tile; a ``weight_block_size`` in the config beside the file wins.
DEFAULT_BLOCK = (128, 128)
MODULE_SUFFIXES = {"bias", "comfy_quant"}


def decode_fp8_blocks(codes: torch.Tensor, scale: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """float32 ``[N, K]`` of F8_E4M3 ``codes`` ``[N, K]`` times the tile multipliers ``scale``
    ``[ceil(N/b0), ceil(K/b1)]`` (edge tiles partial): the Hugging Face FP8 decode."""
    rows, cols = codes.shape
    per_element = scale.float().repeat_interleave(block[0], 0)[:rows].repeat_interleave(block[1], 1)[:, :cols]
    return codes.float() * per_element


def _tiles(shape: tuple[int, int], block: tuple[int, int]) -> tuple[int, int]:
    return -(-shape[0] // block[0]), -(-shape[1] // block[1])


def config_block(draft: CheckpointDraft) -> tuple[int, int] | None:
    """``quantization_config.weight_block_size`` from a ``config.json`` beside the file, if any."""
    config = draft.beside("config.json")
    block = ((config or {}).get("quantization_config") or {}).get("weight_block_size") \
        if isinstance(config, dict) else None
    if isinstance(block, list) and len(block) == 2 and all(type(b) is int and b > 0 for b in block):
        return tuple(block)
    return None


class _Requantized:
    """One layer's decode and re-quantization, computed when the first of its two output
    tensors is written and released after the second (one layer in memory at a time)."""

    def __init__(self, draft: CheckpointDraft, layer: str, block: tuple[int, int], by: str) -> None:
        self.codes = draft.tensors[f"{layer}.weight"].load
        self.scale = draft.tensors[f"{layer}.weight_scale_inv"].load
        self.draft, self.layer, self.block, self.by = draft, layer, block, by
        self.stored: dict[str, torch.Tensor] | None = None
        self.taken: set[str] = set()

    def take(self, suffix: str) -> torch.Tensor:
        if self.stored is None:
            source = decode_fp8_blocks(self.codes(), self.scale(), self.block)
            fmt = Int8TensorwiseFormat()
            self.stored = dict(fmt.encode(source))
            db = tensor_sqnr_db(source, fmt.decode(self.stored))
            self.draft.notes.append(Note("change", self.layer, f"re-quantized: weight SQNR {db:.1f} dB against "
                                         "the FP8 block decode", self.by))
        tensor = self.stored[suffix]
        self.taken.add(suffix)
        if self.taken == {"weight", "weight_scale"}:
            self.stored, self.taken = None, set()
        return tensor


class HfFp8Blocks(ForeignImport):
    name = "hf_fp8_blocks"
    description = (
        "Hugging Face FP8 with 128x128 block weight_scale_inv -> int8_tensorwise per row, re-quantized "
        "(no ComfyUI layout has FP8 blocks; the loss is reported per layer)."
    )

    def foreign_layers(self, draft: CheckpointDraft) -> list[ForeignLayer]:
        candidates = {layer: stored for layer, stored in draft.layer_tensors().items() if self._fits(stored)}
        if not candidates:
            return []
        block = self.block = config_block(draft) or DEFAULT_BLOCK
        found = []
        for layer, stored in candidates.items():
            weight, scale = stored["weight"], stored["weight_scale_inv"]
            problem = None
            if tuple(scale.shape) != _tiles(weight.shape, block):
                problem = (f"{HF_FP8_BLOCKS}: {layer}.weight_scale_inv is {CheckpointDraft.describe(scale)}, which is not one scale "
                           f"per {block[0]}x{block[1]} tile of the {CheckpointDraft.describe(weight)} weight; put the producer's "
                           "config.json (its quantization_config.weight_block_size) beside the file")
            found.append(ForeignLayer(layer, HF_FP8_BLOCKS, "int8_tensorwise", problem))
        return found

    @staticmethod
    def _fits(stored: Mapping[str, TensorSpec]) -> bool:
        weight, scale = stored.get("weight"), stored.get("weight_scale_inv")
        return (
            weight is not None and weight.dtype == torch.float8_e4m3fn and len(weight.shape) == 2
            and scale is not None and scale.dtype in FLOAT_SCALE_DTYPES and len(scale.shape) == 2
            and math.prod(scale.shape) > 1 and "weight_scale" not in stored
            and not set(stored) - {"weight", "weight_scale_inv"} - MODULE_SUFFIXES
        )

    def import_layer(self, draft: CheckpointDraft, found: ForeignLayer) -> None:
        layer = found.layer
        name = f"{layer}.weight_scale_inv"
        scale = draft.read(name).float()
        if not bool(torch.isfinite(scale).all()) or not bool((scale > 0).all()):
            raise CqError(
                f"{draft.path}: scale tensor {name!r} holds {scale[~(torch.isfinite(scale) & (scale > 0))][:4].tolist()} "
                "(a scale must be positive and finite), so its layer cannot be decoded; nothing was written."
            )
        rows, cols = draft.spec(f"{layer}.weight").shape
        work = _Requantized(draft, layer, self.block, self.name)
        draft.rewrite(f"{layer}.weight", spec=TensorSpec(torch.int8, (rows, cols)), load=lambda: work.take("weight"))
        draft.rewrite(name, new_name=f"{layer}.weight_scale", spec=TensorSpec(torch.float32, (rows, 1)),
                      load=lambda: work.take("weight_scale"))
        draft.layers[layer] = {"format": "int8_tensorwise"}
        draft.warn(layer, f"{HF_FP8_BLOCKS} -> int8_tensorwise per row: decoded and re-quantized (lossy; no "
                          "ComfyUI layout holds FP8 blocks), the weight SQNR is reported when written")
