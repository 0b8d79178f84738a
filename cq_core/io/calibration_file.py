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

Every reader gets a layer's statistics through :meth:`CalibrationFile.get`, which checks them
(:func:`check_statistics`): a file edited by hand, truncated in spirit or made by another tool
is one sentence naming the layer and the file, never a silent wrong choice (an all-NaN H is
"predicted error 0" to a size budget) or a traceback deep in an optimizer. ``cq calibrate``
checks with the same function before it saves (:func:`save_statistics`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from cq_core.errors import CqError, UsageError, exception_text
from cq_core.io.safetensors_io import TensorSpec, write_safetensors
from cq_core.numerics.second_moment import DIAG_KEY, EXACT_KEY, LOWRANK_KEY, features_of

STAT_NAMES = (EXACT_KEY, LOWRANK_KEY, DIAG_KEY, "absmax", "absmean", "sample")
FILE_MARKER = "cq_calibration"
#: Key prefixes of a diffusion model inside an all-in-one ComfyUI checkpoint.
DIFFUSION_MODEL_PREFIXES = ("model.diffusion_model.",)


#: Relative slack of the Cauchy-Schwarz test below: float32 storage of an exact H rounds each
#: value by far less, and a bf16 H merged over many captures (the ComfyUI node's) by a few
#: percent at most; an H that breaks it by more is not a second moment of any inputs.
PSD_SLACK = 0.1
#: Per-channel statistics, each (K,).
CHANNEL_STATS = (DIAG_KEY, "absmax", "absmean")


def check_statistics(
    stats: Mapping[str, torch.Tensor], layer: str, where: str | os.PathLike, *, features: int | None = None,
    advice: str = "capture them again with 'cq calibrate'",
) -> None:
    """Raise :class:`CqError`, one sentence naming ``layer`` and ``where`` (the file), unless
    ``stats`` can be a layer's input statistics as :mod:`cq_core.engine.capture` keeps them:

    - every value finite;
    - one K for all: ``H`` (K, K), ``H_lowrank`` (r, K) with ``H_diag`` (K,) (both or neither),
      ``absmax`` and ``absmean`` (K,), ``sample`` (S, K); with ``features``, K is the weight's;
    - ``H`` positive semi-definite as far as O(K²) can tell: a non-negative diagonal and
      ``|H_ij| <= sqrt(H_ii H_jj)`` (any second moment's Cauchy-Schwarz bound); the bounded
      form's ``H_diag`` non-negative;
    - ``absmax`` and ``absmean`` non-negative.

    The rest of indefiniteness (rare for an exact H: it needs three or more channels) shows as a
    negative output error, which :func:`not_positive_semidefinite` names with the same words.
    The bounded form is not held to ``H_diag >= diag(H_lowrankᵀ H_lowrank)``: a bfloat16 sketch
    that has absorbed many runs (the ComfyUI node's) drifts below it by several percent, so the
    test would refuse cq's own files.
    """

    def refuse(problem: str) -> None:
        raise CqError(f"Layer {layer!r}: its calibration {problem} ({where}); {advice}.")

    for key, value in stats.items():
        if not bool(torch.isfinite(value).all()):
            refuse(f"statistics hold NaN or Inf in {key}")
    if (LOWRANK_KEY in stats) != (DIAG_KEY in stats):
        refuse(f"statistics hold {LOWRANK_KEY} without {DIAG_KEY}" if LOWRANK_KEY in stats else
               f"statistics hold {DIAG_KEY} without {LOWRANK_KEY}")
    k = features_of(stats)
    if k is None:
        k = next((int(stats[key].shape[-1]) for key in ("absmax", "absmean", "sample") if key in stats
                  and stats[key].dim() >= 1), None)
    if k is None:
        return
    if features is not None and k != features:
        refuse(f"statistics describe {k} input features, but the weight has {features} input features: they "
               "were made for another model")
    expected = {EXACT_KEY: (k, k), LOWRANK_KEY: (None, k), DIAG_KEY: (k,), "absmax": (k,), "absmean": (k,),
                "sample": (None, k)}
    for key, shape in expected.items():
        if key not in stats:
            continue
        found = tuple(stats[key].shape)
        if len(found) != len(shape) or any(want is not None and got != want for got, want in zip(found, shape)):
            refuse(f"{key!r} has shape {list(found)}, which does not fit the {k} input features of its statistics")
    for key in CHANNEL_STATS:
        if key in stats and bool((stats[key] < 0).any()):
            channel = int((stats[key] < 0).nonzero()[0, 0])
            refuse(f"{key!r} is negative at input channel {channel}" if key != DIAG_KEY else
                   f"H is not positive semi-definite ({key} is negative at input channel {channel})")
    if EXACT_KEY in stats:
        h = stats[EXACT_KEY].double()
        diag = h.diagonal()
        if bool((diag < 0).any()):
            channel = int((diag < 0).nonzero()[0, 0])
            refuse(f"H is not positive semi-definite (H[{channel}, {channel}] is negative)")
        bound = (diag.clamp(min=0).sqrt()[:, None] * diag.clamp(min=0).sqrt()[None, :]) * (1 + PSD_SLACK)
        over = h.abs() > bound + PSD_SLACK * float(diag.max()) * 1e-6
        if bool(over.any()):
            i, j = (int(v) for v in over.nonzero()[0])
            refuse(f"H is not positive semi-definite (|H[{i}, {j}]| exceeds sqrt(H[{i}, {i}] H[{j}, {j}]))")


def not_positive_semidefinite(layer: str, what: str = "an output error comes out negative") -> CqError:
    """The sentence for an H found indefinite where it is used (``what``), as
    :func:`check_statistics` words it."""
    return CqError(f"Layer {layer!r}: its calibration H is not positive semi-definite ({what}); capture the "
                   "statistics again with 'cq calibrate'.")


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

    Raises :class:`CqError` naming the layer, and writes nothing, when a layer's statistics
    would not pass :func:`check_statistics` once stored in float32 (:class:`StatisticsCapture`
    names NaN or Inf inputs, and inputs whose second moment is beyond float32, first).
    """
    for layer, entry in stats.items():
        check_statistics({key: value.float() for key, value in entry.items()}, layer, path,
                         advice="nothing was written")
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
            raise CqError(f"{self.path}: not a readable safetensors calibration file ({exception_text(exc)}).") from None
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

    def get(self, layer: str, *, features: int | None = None) -> dict[str, torch.Tensor] | None:
        """The statistics of ``layer`` (None: the file has none), checked by :func:`check_statistics`
        (``features``: the weight's K); raises :class:`CqError` naming the layer and this file.

        A ``sample`` of no rows, (0, K) (what :mod:`cq_core.engine.capture` keeps for a layer that
        saw no input), is left out: every reader treats it as a missing sample (those that need
        one say so, naming the layer; the others do without)."""
        name = self.resolve(layer)
        if name is None:
            return None
        with safe_open(str(self.path), framework="pt") as f:
            stats = {k: f.get_tensor(f"{name}.{k}") for k in STAT_NAMES if f"{name}.{k}" in self._keys}
        check_statistics(stats, name, self.path, features=features)
        if "sample" in stats and stats["sample"].shape[0] == 0:
            del stats["sample"]
        return stats


def load_statistics(path: str | os.PathLike) -> dict[str, dict[str, torch.Tensor]]:
    """Every layer's statistics from a file written by :func:`save_statistics`."""
    calib = CalibrationFile(path)
    return {layer: calib.get(layer) for layer in sorted(calib.layers)}
