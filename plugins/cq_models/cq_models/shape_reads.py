"""The tensors whose shape ComfyUI reads to detect a model, from a table generated from ComfyUI.

ComfyUI builds a diffusion model from a config it reads off the checkpoint's
shapes (``comfy/model_detection.py``): channel counts, widths, cross-attention
dims, from top-level embedders and from layers inside blocks alike. A format
that stores a weight in another shape than (N, K) (padding, two codes per
byte) must leave those layers alone, or the file loads as the wrong model.

Which layers those are is ComfyUI's to say, so the list is not written by
hand: ``comfyui_shape_reads.json`` is generated from a ComfyUI tree by
``python -m cq_models.generate_shape_reads`` (ComfyUI is not importable when
users convert), and a test regenerates it from the pinned ComfyUI and fails
when it is stale. Each entry says when detection reads it (the key-presence
tests of the branch it sits in), so a generic name such as
``proj_out.weight`` counts only in the family whose branch reads it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from cq_core import ShapeRead

#: Where the shipped table lives.
TABLE_PATH = Path(__file__).with_name("comfyui_shape_reads.json")
#: The placeholder for a block index in the table's names.
INDEX = "{N}"


def pattern_regex(pattern: str) -> str:
    """A table name as a regular expression (``{N}``: any block index)."""
    return re.escape(pattern).replace(re.escape(INDEX), r"\d+")


@lru_cache(maxsize=4)
def load_table(path: Path = TABLE_PATH) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


@dataclass(frozen=True)
class _Entry:
    pattern: str
    regex: re.Pattern[str]
    #: alternatives, each a tuple of names that must all be present under the same prefix
    when: tuple[tuple[str, ...], ...]
    #: the dimensions detection reads; None: all
    axes: tuple[int, ...] | None


@dataclass(frozen=True)
class _Table:
    version: str
    prefixes: tuple[str, ...]
    literal: dict[str, _Entry]
    indexed: tuple[_Entry, ...]

    def entries_for(self, name: str) -> list[_Entry]:
        found = [self.literal[name]] if name in self.literal else []
        return found + [e for e in self.indexed if e.regex.fullmatch(name)]


@lru_cache(maxsize=4)
def _compiled(path: Path = TABLE_PATH) -> _Table:
    table = load_table(path)
    entries = [
        _Entry(
            pattern,
            re.compile(pattern_regex(pattern)),
            tuple(tuple(alt) for alt in read["when"]),
            None if read["axes"] is None else tuple(read["axes"]),
        )
        for pattern, read in table["reads"].items()
    ]
    # ComfyUI detects under the prefix it strips (unet_prefix_from_state_dict), or none.
    prefixes = ("", *sorted(set(table["prefixes"]), key=len, reverse=True))
    return _Table(
        table["comfyui_version"],
        prefixes,
        {e.pattern: e for e in entries if INDEX not in e.pattern},
        tuple(e for e in entries if INDEX in e.pattern),
    )


def _present(name: str, prefix: str, keys: set[str], joined: str) -> bool:
    if INDEX not in name:
        return prefix + name in keys
    return re.search(rf"(?m)^{re.escape(prefix)}{pattern_regex(name)}$", joined) is not None


def shape_read_layers(keys: Sequence[str] | Iterable[str], path: Path = TABLE_PATH) -> dict[str, ShapeRead]:
    """The names among ``keys`` whose shape ComfyUI's detection reads, each with the reason and
    the dimensions it reads.

    A name counts when it is a table entry (with its block indices), bare or
    under one of the prefixes ComfyUI strips before detection
    (``model.diffusion_model.`` and the others the table lists), and the
    checkpoint holds, under that same prefix, the names of the detection
    branch that reads it.
    """
    table = _compiled(path)
    keys = list(keys)
    key_set = set(keys)
    joined = "\n".join(keys)
    found = {}
    for key in keys:
        for prefix in table.prefixes:
            if not key.startswith(prefix):
                continue
            name = key[len(prefix) :]
            for entry in table.entries_for(name):
                if any(all(_present(a, prefix, key_set, joined) for a in alt) for alt in entry.when):
                    found[key] = ShapeRead(
                        f"ComfyUI {table.version} reads this layer's shape to detect the model ({entry.pattern!r})",
                        entry.axes,
                    )
                    break
            if key in found:
                break
    return found
