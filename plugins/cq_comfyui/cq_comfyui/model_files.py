"""The model files the Quantize node offers, from ComfyUI's own model folders.

``folder_paths.get_filename_list`` lists every extension ComfyUI loads
(``.ckpt``, ``.pt``, ``.bin``, ...); cq reads ``.safetensors`` only, and a file
ComfyUI itself would read as quantized (ComfyUI 0.30 ``comfy/utils.py``
``convert_old_quants`` and ``comfy/ops.py``: a ``scaled_fp8`` marker, a
``<layer>.comfy_quant`` tensor or ``_quantization_metadata`` in the header) is
an output, not a source. Each file's header is read once per size and
modification time.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

#: ComfyUI model folders (``folder_paths`` names) whose files the Quantize node offers.
MODEL_FOLDERS = ("diffusion_models", "checkpoints", "text_encoders")
#: The largest header read when listing (a 12B-parameter model's is about 100 KB).
MAX_HEADER_BYTES = 100_000_000

_quantized_cache: dict[str, tuple[tuple[int, int], bool]] = {}


def is_quantized(path: str | os.PathLike) -> bool:
    """True when the file's header marks quantized layers as ComfyUI reads them (or cannot be read)."""
    path = os.fspath(path)
    try:
        st = os.stat(path)
    except OSError:
        return True
    key = (st.st_size, st.st_mtime_ns)
    cached = _quantized_cache.get(path)
    if cached is not None and cached[0] == key:
        return cached[1]
    answer = _header_marks_quantized(path)
    _quantized_cache[path] = (key, answer)
    return answer


def _header_marks_quantized(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > MAX_HEADER_BYTES:
                return True
            header = json.loads(f.read(length))
    except (OSError, ValueError, struct.error):
        return True  # not a readable safetensors file: nothing to offer
    if not isinstance(header, dict):
        return True
    metadata = header.get("__metadata__") or {}
    if isinstance(metadata, dict) and "_quantization_metadata" in metadata:
        return True
    return any(name == "scaled_fp8" or name.endswith(".comfy_quant") for name in header)


def source_files() -> list[str]:
    """``folder/name`` of every ``.safetensors`` file in :data:`MODEL_FOLDERS` that is not quantized."""
    import folder_paths

    files = []
    for folder in MODEL_FOLDERS:
        for name in folder_paths.get_filename_list(folder):
            if not name.lower().endswith(".safetensors"):
                continue
            full = folder_paths.get_full_path(folder, name)
            if full is not None and not is_quantized(full):
                files.append(f"{folder}/{name}")
    return files


def resolve_source(model_file: str) -> tuple[str, Path]:
    """``(folder, path)`` of a ``folder/name`` from :func:`source_files`.

    Raises :class:`cq_core.UsageError` naming ``model_file`` when it is no
    ``.safetensors`` file of those folders.
    """
    import folder_paths

    from cq_core import UsageError

    folder, _, name = model_file.partition("/")
    if folder not in MODEL_FOLDERS or not name:
        raise UsageError(f"model_file {model_file!r} is not in ComfyUI's {', '.join(MODEL_FOLDERS)} folders.")
    if not name.lower().endswith(".safetensors"):
        raise UsageError(f"model_file {model_file!r}: cq reads .safetensors files only.")
    full = folder_paths.get_full_path(folder, name)
    if full is None:
        raise UsageError(f"model_file {model_file!r} is not in ComfyUI's {folder} folder (refresh the list: R).")
    return folder, Path(full)
