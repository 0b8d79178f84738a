"""The calibration file: per-layer input statistics in a safetensors file (``cq calibrate`` writes it,
``cq convert --calibration`` and ``cq verify --calibration`` read it).

For each layer the file keeps

- ``{layer}.H``: the second-moment matrix ``E[x xᵀ]`` (K, K), float32, or, with
  a sketch ``rank`` below K (bounded memory, :mod:`cq_core.numerics.second_moment`),
  ``{layer}.H_lowrank`` (r, K) and ``{layer}.H_diag`` (K,), float32, from which
  the optimizers rebuild H ≈ Lᵀ L with the exact diagonal, and
- ``{layer}.absmax``: the largest ``|x|`` per input channel (K,), float32,
- ``{layer}.absmean``: the mean ``|x|`` per input channel (K,), float32 (AWQ's activation
  magnitudes), and
- ``{layer}.sample``: up to ``SAMPLE_ROWS`` (:mod:`cq_core.engine.capture`) input rows drawn
  uniformly from all rows seen (a fixed seed), (S, K) float32: the activations that calibrated
  ``input_scale`` and ``pre_quant_scale`` are measured on. At K = 12288 (a 12B DiT's widest
  input) that is 6 MiB per layer beside H's 576 MiB,

plus, in the file's ``cq_calibration`` metadata, the number of input rows behind each layer's
statistics (``rows``), so later runs can add to them. Keyed by the module's qualified name,
which is also the layer prefix of its weight in the model's state dict.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from cq_core.errors import CqError, UsageError
from cq_core.io.safetensors_io import TensorSpec, write_safetensors
from cq_core.numerics.second_moment import DIAG_KEY, EXACT_KEY, LOWRANK_KEY

STAT_NAMES = (EXACT_KEY, LOWRANK_KEY, DIAG_KEY, "absmax", "absmean", "sample")
FILE_MARKER = "cq_calibration"
#: Key prefixes of a diffusion model inside an all-in-one ComfyUI checkpoint.
DIFFUSION_MODEL_PREFIXES = ("model.diffusion_model.",)


def save_statistics(
    stats: Mapping[str, Mapping[str, torch.Tensor]],
    path: str | os.PathLike,
    *,
    rows: Mapping[str, int] | None = None,
) -> Path:
    """Write statistics as ``{layer}.<stat>`` tensors in a safetensors file, atomically
    (a temporary file renamed over ``path``: a reader never sees a partial file).

    ``rows``: the input rows behind each layer, recorded in the ``cq_calibration``
    metadata so that :meth:`StatisticsCapture.merge_file` can add to the file later.
    """
    tensors = {
        f"{layer}.{key}": value.contiguous().float()
        for layer, entry in stats.items()
        for key, value in entry.items()
    }
    path = Path(path)
    entries = [(name, TensorSpec(t.dtype, tuple(t.shape))) for name, t in tensors.items()]
    marker: dict[str, Any] = {"layers": len(stats)}
    if rows is not None:
        marker["rows"] = {layer: int(rows[layer]) for layer in stats}
    # Through cq's writer, like every output: a new temporary, never a link followed, one run at a time.
    with write_safetensors(path, entries, {FILE_MARKER: json.dumps(marker)}, overwrite=True) as out:
        for name, tensor in tensors.items():
            out.write(name, tensor)
    return path


class CalibrationFile:
    """Lazy per-layer access to a statistics file: one layer's H is read when asked for."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise UsageError(f"--calibration {self.path}: no such file.")
        try:
            with safe_open(str(self.path), framework="pt") as f:
                keys = list(f.keys())
                marker = (f.metadata() or {}).get(FILE_MARKER)
        except Exception as exc:  # safetensors raises several types for a bad header
            raise CqError(f"{self.path}: not a readable safetensors calibration file ({exc}).") from None
        self.layers: set[str] = {k.rsplit(".", 1)[0] for k in keys if k.rsplit(".", 1)[-1] in STAT_NAMES}
        self._keys = set(keys)
        if not self.layers:
            raise CqError(f"{self.path}: holds no calibration statistics (no '<layer>.H' tensors).")
        #: Input rows behind each layer (files from cq 0.1.0 and older: None).
        self.rows: dict[str, int] | None = None
        try:
            self.rows = json.loads(marker)["rows"] if marker else None
        except (ValueError, KeyError, TypeError):
            self.rows = None

    def resolve(self, layer: str | None) -> str | None:
        """The file's name for a checkpoint's layer: the same name, or, for a layer under
        a prefix ComfyUI strips from a diffusion model's keys (``model.diffusion_model.``
        in all-in-one checkpoints, ``comfy/model_detection.py`` ``unet_prefix_from_state_dict``),
        the name without it: statistics captured on the model ComfyUI built carry bare names."""
        if layer is None or layer in self.layers:
            return layer
        for prefix in DIFFUSION_MODEL_PREFIXES:
            if layer.startswith(prefix) and layer[len(prefix):] in self.layers:
                return layer[len(prefix):]
        return None

    def __contains__(self, layer: object) -> bool:
        return isinstance(layer, str) and self.resolve(layer) is not None

    def get(self, layer: str) -> dict[str, torch.Tensor] | None:
        name = self.resolve(layer)
        if name is None:
            return None
        with safe_open(str(self.path), framework="pt") as f:
            return {k: f.get_tensor(f"{name}.{k}") for k in STAT_NAMES if f"{name}.{k}" in self._keys}


def load_statistics(path: str | os.PathLike) -> dict[str, dict[str, torch.Tensor]]:
    """Every layer's statistics from a file written by :func:`save_statistics`."""
    calib = CalibrationFile(path)
    return {layer: calib.get(layer) for layer in sorted(calib.layers)}
