"""Calibration statistics recorded while ComfyUI samples.

:func:`capture_while_sampling` returns a clone of a ComfyUI ``ModelPatcher`` that
carries an ``OUTER_SAMPLE`` wrapper (``comfy/patcher_extension.py``
``WrappersMP.OUTER_SAMPLE``, run once per sampling run by ``CFGGuider.sample`` in
``comfy/samplers.py``). Around each sampling run the wrapper

1. attaches a :class:`cq_core.StatisticsCapture` to the Linear layers of the
   diffusion model (``patcher.model.diffusion_model``), so every model call of
   every step records its inputs, both CFG branches included (ComfyUI batches
   them into one call, or calls twice: the hooks see both);
2. after the run, detaches, adds the statistics already in the file (earlier
   runs: queued prompts accumulate) and writes the file atomically (a temporary
   renamed over it; a crash never leaves half a file).

The names are the diffusion model's own module names (``double_blocks.0.img_attn.qkv``),
which are the keys of a diffusion-model file; ``cq convert --calibration`` also
finds them under ``model.diffusion_model.`` in an all-in-one checkpoint.
Memory stays bounded by the sketch ``rank`` (see ``cq_core.numerics.second_moment``).
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

from cq_core import StatisticsCapture
from cq_core.numerics.second_moment import BOUNDED_RANK, BOUNDED_SKETCH_DTYPE

#: The wrapper's key on the ModelPatcher (one capture per patcher clone).
WRAPPER_KEY = "cq_capture_calibration"
OUTER_SAMPLE = "outer_sample"  # comfy.patcher_extension.WrappersMP.OUTER_SAMPLE

_file_locks: dict[str, threading.Lock] = {}


def _lock_for(path: Path) -> threading.Lock:
    return _file_locks.setdefault(os.path.abspath(path), threading.Lock())


class SamplingCapture:
    """The ``OUTER_SAMPLE`` wrapper: statistics of one sampling run, added to ``path``.

    ``rank``: sketch rows per layer, held in bfloat16 (0: exact H, K² floats per
    layer: small models only); ``device``: ``None`` (accumulate where the model runs) or ``"cpu"``.
    ``runs``: sampling runs recorded by this wrapper.
    """

    def __init__(self, path: str | os.PathLike, rank: int, device: str | None = None, layers: str | None = None):
        self.path = Path(path)
        self.rank = rank or None
        self.device = device
        self.layers = layers
        self.runs = 0

    def __call__(self, executor, *args: Any, **kwargs: Any):
        guider = executor.class_obj
        model = guider.model_patcher.model.diffusion_model
        capture = StatisticsCapture(
            layers=self.layers, device=self.device, rank=self.rank, sketch_dtype=BOUNDED_SKETCH_DTYPE
        )
        with capture.attach(model):
            result = executor(*args, **kwargs)
        if capture.sums:
            self.save(capture)
        return result

    def save(self, capture: StatisticsCapture) -> None:
        """Add the file's statistics to ``capture`` and write them back, atomically."""
        with _lock_for(self.path):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if self.path.is_file():
                capture.merge_file(self.path)
            capture.save(self.path)
        self.runs += 1


def capture_while_sampling(
    patcher, path: str | os.PathLike, *, rank: int = BOUNDED_RANK, device: str | None = None, layers: str | None = None
):
    """A clone of ``patcher`` whose sampling runs add their statistics to ``path``."""
    clone = patcher.clone()
    clone.remove_wrappers_with_key(OUTER_SAMPLE, WRAPPER_KEY)
    clone.add_wrapper_with_key(OUTER_SAMPLE, WRAPPER_KEY, SamplingCapture(path, rank, device, layers))
    return clone
