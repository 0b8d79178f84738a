"""Sharded checkpoints: an index plus its shards in, a shard set plus a matching index out.

Input: a ``*.safetensors.index.json`` (``{"weight_map": {tensor: shard file}}``)
next to its shards, or a directory holding one model's shards, read as one
checkpoint whose tensors come in shard order, then file order.

Output: shards named ``STEM-00001-of-0000N.safetensors`` plus
``STEM.safetensors.index.json``. A layer's tensors (weight, scales, metadata
tensor) always land in the same shard, and each shard's header lists only
its own layers, so every shard is a valid quantized checkpoint by itself.
The set is written like a single file (:mod:`cq_core.io.outputs`): every shard
goes to a temporary name, and only when all are complete are they renamed,
the index last; any failure removes every temporary file and every shard
already renamed. No shard, index or stale shard removed by ``--overwrite``
may be a file of the input.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cq_core.errors import CqError, UsageError, quoted
from cq_core.io.direct_io import DirectFile
from cq_core.io.outputs import PendingOutputs, claim_outputs, file_identity
from cq_core.io.source import Source
from cq_core.io.safetensors_io import (
    SafetensorsFile,
    StreamingWriter,
    TensorInfo,
    TensorLocation,
    TensorSpec,
    build_header,
)

INDEX_SUFFIX = ".safetensors.index.json"
SHARD_NAME = re.compile(r"^(?P<stem>.+)-(?P<number>\d{5})-of-(?P<total>\d{5})\.safetensors$")


# ---------------------------------------------------------------------------
# Input
# ---------------------------------------------------------------------------


def is_sharded_input(path: Path) -> bool:
    return path.name.endswith(INDEX_SUFFIX) or path.is_dir()


def open_source(path: str | os.PathLike) -> Source:
    """Open a checkpoint, the one way every command does: a single file, an index with its
    shards, or a directory holding one model (each read as one checkpoint)."""
    path = Path(path)
    if path.name.endswith(INDEX_SUFFIX):
        return ShardedSource.from_index(path)
    if path.is_dir():
        return ShardedSource.from_directory(path)
    return SafetensorsFile(path)


def _read_index(index: Path) -> dict[str, str]:
    if not index.exists():
        raise CqError(f"{index}: no such file.")
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        raise CqError(f"{index}: is not a valid shard index (it is not readable JSON).") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise CqError(f"{index}: is not a valid shard index (it needs a non-empty \"weight_map\" of names).")
    for shard in sorted(set(weight_map.values())):
        if Path(shard).name != shard or shard in (".", ".."):
            raise CqError(f"{index}: shard {quoted(shard)} is not a plain file name next to the index.")
        if shard.endswith((INDEX_SUFFIX, ".json")):
            raise CqError(f"{index}: its weight_map names {quoted(shard)}, another index, as a shard; an index "
                          "names the .safetensors files that hold the tensors.")
    return weight_map


class ShardedSource:
    """Several safetensors files read as one checkpoint (the interface of SafetensorsFile)."""

    def __init__(self, path: Path, shard_paths: Sequence[Path], weight_map: Mapping[str, str] | None) -> None:
        self.path = path
        self.shards: list[SafetensorsFile] = []
        try:
            for shard_path in shard_paths:
                if not shard_path.exists():
                    raise CqError(f"{path}: shard {shard_path.name!r} is missing.")
                self.shards.append(SafetensorsFile(shard_path))
            self._index_tensors(weight_map)
        except BaseException:
            self.close()
            raise

    @classmethod
    def from_index(cls, index: Path) -> ShardedSource:
        weight_map = _read_index(index)
        names = list(dict.fromkeys(weight_map.values()))
        shard_order = sorted(names, key=lambda n: (SHARD_NAME.match(n) is None, n))
        return cls(index, [index.parent / n for n in shard_order], weight_map)

    @classmethod
    def from_directory(cls, directory: Path) -> ShardedSource:
        indexes = sorted(directory.glob("*" + INDEX_SUFFIX))
        if len(indexes) > 1:
            raise CqError(
                f"{directory}: holds {len(indexes)} shard indexes ({', '.join(i.name for i in indexes)}); "
                "pass the one to read."
            )
        if indexes:
            return cls.from_index(indexes[0])
        files = sorted(p for p in directory.glob("*.safetensors") if not p.name.startswith("."))
        if not files:
            raise CqError(f"{directory}: holds no .safetensors files.")
        groups: dict[tuple[str, str], list[Path]] = {}
        for file in files:
            match = SHARD_NAME.match(file.name)
            if match is None:
                raise CqError(
                    f"{directory}: {file.name!r} is not named like a shard (NAME-00001-of-00002.safetensors) "
                    "and there is no index; pass the file itself."
                )
            groups.setdefault((match["stem"], match["total"]), []).append(file)
        if len(groups) > 1:
            raise CqError(f"{directory}: holds the shards of {len(groups)} different models; pass an index file.")
        (stem, total), shard_files = next(iter(groups.items()))
        numbers = {int(SHARD_NAME.match(f.name)["number"]) for f in shard_files}
        missing = sorted(set(range(1, int(total) + 1)) - numbers)
        if missing:
            raise CqError(
                f"{directory}: shard {missing[0]} of {int(total)} of {stem!r} is missing and there is no index."
            )
        return cls(directory, shard_files, None)

    def _index_tensors(self, weight_map: Mapping[str, str] | None) -> None:
        self.tensors: dict[str, TensorInfo] = {}
        self.metadata: dict[str, str] = {}
        self._shard_of: dict[str, int] = {}
        for number, shard in enumerate(self.shards):
            for key, value in shard.metadata.items():
                self.metadata.setdefault(key, value)
            for name, info in shard.tensors.items():
                if name in self._shard_of:
                    first = self.shards[self._shard_of[name]].path.name
                    raise CqError(f"{self.path}: tensor {name!r} is in both {first!r} and {shard.path.name!r}.")
                if weight_map is not None and weight_map.get(name) != shard.path.name:
                    where = weight_map.get(name)
                    raise CqError(
                        f"{self.path}: shard {shard.path.name!r} holds tensor {name!r}, which the index "
                        + (f"places in {where!r}." if where else "does not list.")
                    )
                self.tensors[name] = info
                self._shard_of[name] = number
        if weight_map is not None:
            for name, shard_name in weight_map.items():
                if name not in self.tensors:
                    raise CqError(f"{self.path}: the index places tensor {name!r} in {shard_name!r}, which lacks it.")

    @property
    def file_size(self) -> int:
        return sum(shard.file_size for shard in self.shards)

    def shard_number(self, name: str) -> int:
        """0-based position of the shard holding ``name``."""
        return self._shard_of[name]

    @property
    def header_sha256(self) -> str:
        """SHA-256 over the shards' header digests, in shard order (the index adds nothing:
        it is derived from the headers)."""
        joined = "".join(shard.header_sha256 for shard in self.shards)
        return hashlib.sha256(joined.encode("ascii")).hexdigest()

    #: read under its own names (:class:`cq_core.io.source.Source`)
    layout = None
    sharded = True

    def files(self) -> list[Path]:
        """Its index (when it has one) and every shard."""
        index = [self.path] if self.path.is_file() else []
        return [*index, *(shard.path for shard in self.shards)]

    def part_metadata(self) -> list[Mapping[str, str]]:
        return [shard.metadata for shard in self.shards]

    def location(self, name: str) -> TensorLocation:
        return self.shards[self._shard_of[name]].location(name)

    def read(self, name: str) -> torch.Tensor:
        return self.shards[self._shard_of[name]].read(name)

    def close(self) -> None:
        for shard in self.shards:
            shard.close()

    def __enter__(self) -> ShardedSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------------------
# Output naming
# ---------------------------------------------------------------------------


def output_stem(path: Path) -> str:
    """``x.safetensors.index.json`` or ``x.safetensors`` -> ``x``."""
    name = path.name
    if name.endswith(INDEX_SUFFIX):
        return name[: -len(INDEX_SUFFIX)]
    return name.removesuffix(".safetensors")


def index_path_for(output: Path) -> Path:
    return output.with_name(output_stem(output) + INDEX_SUFFIX)


def shard_path_for(index: Path, number: int, total: int) -> Path:
    """1-based ``number`` of ``total``, named the way Hugging Face names shards."""
    return index.with_name(f"{output_stem(index)}-{number:05d}-of-{total:05d}.safetensors")


def source_stem(path: Path) -> str:
    """The model's name for a sharded input: the index's stem or the shards' common stem."""
    if path.is_dir():
        indexes = sorted(path.glob("*" + INDEX_SUFFIX))
        if indexes:
            return output_stem(indexes[0])
        for file in sorted(path.glob("*.safetensors")):
            match = SHARD_NAME.match(file.name)
            if match:
                return match["stem"]
        return path.name
    return output_stem(path)


def default_output(input_path: Path, format_name: str, sharded: bool) -> Path:
    """Next to the input: ``STEM-FORMAT.safetensors`` or ``STEM-FORMAT.safetensors.index.json``.

    For a folder of shards, next to the folder and named after it (``transformer/`` ->
    ``transformer-nvfp4.safetensors.index.json`` beside it): written into the folder, the output's
    own index would make the folder ambiguous as an input the next time."""
    if input_path.is_dir():
        folder = input_path if input_path.name not in ("", ".", "..") else input_path.resolve()
        return folder.parent / (f"{folder.name}-{format_name}" + (INDEX_SUFFIX if sharded else ".safetensors"))
    stem = f"{source_stem(input_path)}-{format_name}"
    return input_path.parent / (stem + (INDEX_SUFFIX if sharded else ".safetensors"))


def output_path_for(input_path: Path, output: str | os.PathLike | None, format_name: str, sharded: bool) -> Path:
    """Where a conversion writes: ``output`` as given (a sharded output: its index,
    :func:`index_path_for`), or :func:`default_output` beside the input.

    Raises :class:`UsageError` for ``-o ''`` or a name ending in a separator (a folder), and
    :class:`CqError` for an existing folder: a file must be named.
    """
    if output is None:
        return default_output(input_path, format_name, sharded)
    if os.fspath(output) == "":
        raise UsageError("-o '' names no file; name the file to write, or leave -o out.")
    if os.fspath(output).endswith(("/", os.sep)):
        example = Path(output) / default_output(input_path, format_name, False).name
        raise UsageError(f"-o {os.fspath(output)}: names a folder; name the file to write in it (e.g. {example}).")
    if Path(output).is_dir():  # a sharded output would otherwise be named after it, beside it
        raise CqError(f"{output}: is a directory; name a file to write.")
    return index_path_for(Path(output)) if sharded else Path(output)


# ---------------------------------------------------------------------------
# Output: splitting and the atomic shard-set writer
# ---------------------------------------------------------------------------


@dataclass
class ShardLayout:
    """One output shard: its tensors in write order and its header metadata."""

    entries: list[tuple[str, TensorSpec]]
    metadata: dict[str, str]

    @property
    def nbytes(self) -> int:
        return sum(spec.nbytes for _, spec in self.entries)

    @property
    def file_bytes(self) -> int:
        """The shard's file in bytes: its header (the 8-byte length included) and tensor data."""
        return len(build_header(self.entries, self.metadata)) + self.nbytes


def split_groups(
    groups: Sequence[Sequence[tuple[str, TensorSpec]]],
    max_bytes: int | None = None,
    shard_keys: Sequence[Any] | None = None,
) -> list[list[int]]:
    """Group indices per shard, never splitting a group.

    With ``max_bytes``: fill each shard in order until the next group would
    pass the limit (a group larger than the limit gets a shard of its own).
    Otherwise a new shard starts wherever ``shard_keys`` changes (mirroring
    the input's shards). Groups without entries join the current shard.
    """
    shards: list[list[int]] = []
    size = 0
    key = object()
    for number, group in enumerate(groups):
        group_bytes = sum(spec.nbytes for _, spec in group)
        if max_bytes is not None:
            new = not shards or (group and size and size + group_bytes > max_bytes)
        else:
            new = not shards or (group and shard_keys is not None and shard_keys[number] != key)
        if new:
            shards.append([])
            size = 0
        if group and shard_keys is not None:
            key = shard_keys[number]
        shards[-1].append(number)
        size += group_bytes
    return [s for s in shards if any(groups[i] for i in s)] or shards[:1]


@contextmanager
def write_shard_set(
    index: Path,
    shards: Sequence[ShardLayout],
    *,
    overwrite: bool = False,
    inputs: Iterable[Path] = (),
) -> Iterator[ShardSetWriter]:
    """Write ``shards`` and their index atomically as a set; yields a writer taking tensors in order.

    ``inputs``: the files being read; no shard, no index and no stale shard
    that ``overwrite`` would delete may be one of them.
    """
    total = len(shards)
    finals = [shard_path_for(index, n + 1, total) for n in range(total)]
    inputs = [Path(p) for p in inputs]
    stale = _stale_shards(index, set(finals)) if overwrite else []
    for path in stale:
        if any(file_identity(path) == file_identity(source) for source in inputs):
            raise UsageError(
                f"{path}: is a file of the input, and --overwrite of {index} would delete it as a stale "
                "shard; choose another output name."
            )
    weight_map = {name: final.name for shard, final in zip(shards, finals) for name, _ in shard.entries}
    index_body = {
        "metadata": {"total_size": sum(shard.nbytes for shard in shards)},
        "weight_map": dict(sorted(weight_map.items())),
    }
    with claim_outputs([*finals, index], overwrite=overwrite, inputs=inputs, stale=stale) as pending:
        writer = ShardSetWriter(shards, finals, pending)
        try:
            yield writer
            writer.finish()
        finally:
            writer.close()
        with pending.open(total) as file:
            file.write((json.dumps(index_body, indent=2) + "\n").encode("utf-8"))
            file.flush()
            os.fsync(file.fileno())
        # The index goes last: a reader that finds it finds every shard it names. The commit then
        # deletes the stale shards that are still the files that were there.
        pending.commit()


class ShardSetWriter:
    """Routes each tensor, in plan order, to the shard that holds it; one open file at a time."""

    def __init__(self, shards: Sequence[ShardLayout], finals: Sequence[Path], pending: PendingOutputs) -> None:
        self._shards = shards
        self._finals = finals
        self._pending = pending
        self._current = -1
        self._file: DirectFile | None = None
        self._writer: StreamingWriter | None = None

    def _open_next(self) -> None:
        self._close_current()
        self._current += 1
        if self._current >= len(self._shards):
            raise CqError("Internal error: more tensors were written than the shards hold.")
        shard = self._shards[self._current]
        self._file = self._pending.open(self._current)
        self._file.write(build_header(shard.entries, shard.metadata))
        self._writer = StreamingWriter(self._file, shard.entries, self._finals[self._current])

    def _close_current(self) -> None:
        if self._writer is None:
            return
        if not self._writer.finished():
            raise CqError(
                f"Internal error: {self._finals[self._current].name} is missing {self._writer.remaining()[0]!r}."
            )
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self._writer = None

    def write(self, name: str, tensor: torch.Tensor) -> None:
        while self._writer is None or self._writer.finished():
            self._open_next()
        self._writer.write(name, tensor)

    def finish(self) -> None:
        # Shards with no tensors left to write (all-empty shards) are still created.
        while self._current < len(self._shards) - 1:
            self._open_next()
        self._close_current()

    def close(self) -> None:
        """Close the open shard file, if any (after a failure; its temporary goes with the run's)."""
        if self._file is not None:
            self._file.close()


def _stale_shards(index: Path, keep: set[Path]) -> list[Path]:
    """Shards of an existing set under ``index``'s name that the new set does not have (--overwrite removes them)."""
    stem = output_stem(index)
    found = []
    for path in sorted(index.parent.glob(f"{glob_escape(stem)}-*-of-*.safetensors")):
        match = SHARD_NAME.match(path.name)
        if match and match["stem"] == stem and path not in keep and not path.is_symlink():
            found.append(path)
    return found


def glob_escape(text: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", text)
