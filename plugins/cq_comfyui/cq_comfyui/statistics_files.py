"""Statistics files in ComfyUI's model folder ``cq_calibration``, and whether one fits a model.

A statistics file (``cq calibrate``, the capture node) holds, per Linear layer
``L`` with K input features, ``L.absmax`` (K,) and ``L.H`` (K, K) or the
bounded ``L.H_lowrank`` (R, K) with ``L.H_diag`` (K,)
(:mod:`cq_core.numerics.second_moment`). Whether it fits a model is read from
its header alone (names and shapes), so a file of another model is refused
before a sampling run or a conversion starts, not after.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from cq_core import UsageError
from cq_core.numerics.second_moment import DIAG_KEY, EXACT_KEY, LOWRANK_KEY

CALIBRATION_FOLDER = "cq_calibration"
#: The tensor beside every layer's H: its per-input-channel absolute maximum, shape (K,).
ABSMAX_KEY = "absmax"
#: Prefixes ComfyUI strips from a diffusion model's keys (``comfy/model_detection.py``
#: ``unet_prefix_from_state_dict``): statistics captured on the model it built carry bare names.
DIFFUSION_MODEL_PREFIX = "model.diffusion_model."


def calibration_folder() -> Path:
    """``models/cq_calibration`` (or the first path registered under that name), created."""
    import folder_paths

    if CALIBRATION_FOLDER not in folder_paths.folder_names_and_paths:
        folder_paths.folder_names_and_paths[CALIBRATION_FOLDER] = (
            [os.path.join(folder_paths.models_dir, CALIBRATION_FOLDER)], {".safetensors"}
        )
    folder = Path(folder_paths.get_folder_paths(CALIBRATION_FOLDER)[0])
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def calibration_files() -> list[str]:
    """The statistics files ComfyUI lists in ``cq_calibration``."""
    import folder_paths

    calibration_folder()
    return folder_paths.get_filename_list(CALIBRATION_FOLDER)


def calibration_path(name: str) -> Path:
    """The statistics file ``name`` (relative, ``.safetensors`` added) in the calibration folder.

    Raises :class:`UsageError` (naming the widget ``calibration_name``) for an
    empty name or one that leaves the folder.
    """
    stem = name.strip()
    if not stem or stem in (".safetensors",):
        raise UsageError("calibration_name is empty; name the statistics file (e.g. flux1-dev).")
    folder = calibration_folder().resolve()
    file = stem if stem.endswith(".safetensors") else f"{stem}.safetensors"
    path = (folder / file).resolve()
    if folder not in path.parents or path.name.startswith("."):
        raise UsageError(f"calibration_name {name!r} must name a file inside {folder}.")
    return path


def layer_widths(path: str | os.PathLike) -> dict[str, int]:
    """Each layer of a statistics file and its K (input features), from the header alone."""
    from safetensors import safe_open

    widths: dict[str, int] = {}
    with safe_open(os.fspath(path), framework="pt") as f:
        for key in f.keys():
            layer, _, stat = key.rpartition(".")
            if stat in (ABSMAX_KEY, DIAG_KEY, EXACT_KEY, LOWRANK_KEY):
                widths.setdefault(layer, f.get_slice(key).get_shape()[-1])
    return widths


def misfit(path: str | os.PathLike, layers: Mapping[str, int]) -> str | None:
    """Why the statistics in ``path`` do not fit ``layers`` (layer name -> K), or None.

    They fit when they name at least one of the layers (a name under
    :data:`DIFFUSION_MODEL_PREFIX` also matches its bare form) and every layer
    they share has the same K. Returns a phrase such as ``"layer 'x' has 3072
    input features there, 128 here"``.
    """
    try:
        stored = layer_widths(path)
    except Exception as exc:  # safetensors raises several types for a bad file
        return f"it is not a readable statistics file ({exc})"
    shared = 0
    for layer, width in layers.items():
        name = layer if layer in stored else layer.removeprefix(DIFFUSION_MODEL_PREFIX)
        if name not in stored:
            continue
        shared += 1
        if stored[name] != width:
            return f"layer {name!r} has {stored[name]} input features there, {width} here"
    if not shared:
        example = next(iter(sorted(stored)), None)
        return ("it names none of this model's layers" + (f" (it holds e.g. {example!r})" if example else ""))
    return None
