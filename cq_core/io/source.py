"""What every command reads a checkpoint through: the :class:`Source` protocol.

A source is one ``.safetensors`` file (:class:`cq_core.io.safetensors_io.SafetensorsFile`),
a shard set (:class:`cq_core.io.shards.ShardedSource`), or a view of either under
another layout's names (:class:`cq_core.engine.native_layout.NativeLayoutSource`). The
header is read when it is opened; tensor data only when asked for, one tensor at a time.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import torch

from cq_core.io.safetensors_io import TensorInfo, TensorLocation


class Source(Protocol):
    """A checkpoint opened for reading (use it as a context manager, or :meth:`close` it)."""

    #: what the user named: the file, the index, or the folder of shards
    path: Path
    #: every tensor's name, dtype, shape, in the source's own read order
    tensors: Mapping[str, TensorInfo]
    #: the safetensors ``__metadata__`` (a shard set: the first shard's value for each key)
    metadata: Mapping[str, str]
    #: the layout converter's choice (:class:`cq_core.plugin.layouts.LayoutChoice`) when the
    #: checkpoint is read under ComfyUI's names, else None
    layout: Any

    @property
    def file_size(self) -> int:
        """Bytes on disk, every file's header included."""

    @property
    def header_sha256(self) -> str:
        """SHA-256 (hex) of the header bytes as published (a shard set: of its shards' digests)."""

    @property
    def sharded(self) -> bool:
        """Whether it is read from several files (a sharded output then mirrors its shards)."""

    def files(self) -> list[Path]:
        """Every file it is read from (the index of a shard set included): no output may be one."""

    def part_metadata(self) -> list[Mapping[str, str]]:
        """Each file's own ``__metadata__``, in shard order (one for a single file)."""

    def shard_number(self, name: str) -> int:
        """0-based position of the file holding tensor ``name`` (0 for a single file)."""

    def location(self, name: str) -> TensorLocation | None:
        """Where tensor ``name``'s bytes lie, or None when it is assembled from several (only
        :meth:`read` can produce it)."""

    def read(self, name: str) -> torch.Tensor:
        """Tensor ``name`` in fresh CPU memory; :class:`cq_core.errors.CqError` naming the file
        when it cannot be read."""

    def close(self) -> None: ...

    def __enter__(self) -> Source: ...

    def __exit__(self, *exc: object) -> None: ...


class SourceView:
    """A :class:`Source` read through another one (``self.source``): what does not change with
    the view (the files, their size and header digest, the sharding) is the inner source's.
    Subclasses set ``path``, ``tensors``, ``metadata``, ``layout`` and define ``read``,
    ``location`` and ``shard_number``."""

    source: Source

    @property
    def file_size(self) -> int:
        return self.source.file_size

    @property
    def header_sha256(self) -> str:
        """The input's own header digest: the file as published, before any view of it."""
        return self.source.header_sha256

    @property
    def sharded(self) -> bool:
        return self.source.sharded

    def files(self) -> list[Path]:
        return self.source.files()

    def part_metadata(self) -> list[Mapping[str, str]]:
        return self.source.part_metadata()

    def close(self) -> None:
        self.source.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
