"""Safetensors reading without loading data, and a streaming atomic writer.

The reader parses and validates the header only; tensors are read one at a
time with plain file reads (no mmap), so memory holds one tensor, not the
file. The writer writes the whole header first (every output tensor's dtype
and shape is known from the plan), then each tensor as it is produced, to a
temporary name in the output directory that is renamed on success and
removed on any failure, Ctrl-C included (:mod:`cq_core.io.outputs`: exclusive
temporaries, one run per output, never over an input).
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import math
import os
import shutil
import struct
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from cq_core.errors import CqError, exception_text
from cq_core.io.outputs import claim_outputs
from cq_core.io.sizes import human_bytes


@dataclass(frozen=True)
class TensorSpec:
    """dtype and shape of one stored tensor, known before any data is read."""

    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

#: safetensors dtype string <-> torch dtype
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "U16": torch.uint16,
    "U32": torch.uint32,
    "U64": torch.uint64,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
if hasattr(torch, "float8_e8m0fnu"):
    DTYPES["F8_E8M0"] = torch.float8_e8m0fnu
#: FP4 E2M1, two per byte (other producers' NVFP4, e.g. fireworks-prequant). The header counts
#: FP4 elements, torch counts bytes (``float4_e2m1fn_x2``): the last dimension differs by 2.
FP4_DTYPE = getattr(torch, "float4_e2m1fn_x2", None)
if FP4_DTYPE is not None:
    DTYPES["F4"] = FP4_DTYPE
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}

#: The reference implementation refuses larger headers; so do we.
MAX_HEADER_BYTES = 100_000_000
#: No tensor dimension or byte offset can exceed what an int64 holds (torch's and the file's limit).
MAX_INDEX = 2**63 - 1
METADATA_KEY = "__metadata__"


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # offsets relative to the start of the data section
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def dtype_name(self) -> str:
        return DTYPE_NAMES[self.dtype]


def dtype_name(dtype: torch.dtype) -> str:
    try:
        return DTYPE_NAMES[dtype]
    except KeyError:
        raise CqError(f"dtype {dtype} cannot be stored in safetensors.") from None


def _is_unicode(text: str) -> bool:
    """False for strings JSON escapes can make but UTF-8 cannot hold (lone surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _short_repr(value: object, limit: int = 80) -> str:
    """``repr`` cut to ``limit`` characters, for values quoted in one-line messages."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _short(exc: Exception, limit: int = 120) -> str:
    return exception_text(exc, limit)


def _no_duplicates(path: Path):
    def hook(pairs):
        seen = set()
        for key, _ in pairs:
            if key in seen:
                raise CqError(f"{path}: the header lists tensor {key!r} twice.")
            seen.add(key)
        return dict(pairs)

    return hook


@dataclass(frozen=True)
class TensorLocation:
    """Where a tensor's bytes lie in the input: a worker that sees the same file reads them itself.

    ``path`` is absolute (a cluster's workers must mount the input at the same
    path); ``offset`` is the byte offset of the tensor's data in that file;
    ``dtype`` and ``shape`` are the stored tensor's (safetensors: little-endian,
    C order).
    """

    path: Path
    offset: int
    dtype: torch.dtype
    shape: tuple[int, ...]


class SafetensorsFile:
    """An open safetensors file whose header has been read and validated."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise CqError(f"{self.path}: no such file.")
        if self.path.is_dir():
            raise CqError(f"{self.path}: is a directory, not a .safetensors file.")
        try:
            self._file = open(self.path, "rb")  # noqa: SIM115 (closed by close())
        except OSError as exc:
            raise CqError(f"{self.path}: cannot be opened ({exc.strerror}).") from None
        try:
            self.file_size = os.fstat(self._file.fileno()).st_size
            self.tensors, self.metadata, self.data_start = self._read_header()
        except BaseException:
            self._file.close()
            raise

    # -- header ------------------------------------------------------------------

    def _fail(self, what: str) -> CqError:
        return CqError(f"{self.path}: {what}")

    def _read_header(self) -> tuple[dict[str, TensorInfo], dict[str, str], int]:
        if self.file_size < 8:
            raise self._fail(
                "is not a safetensors file (it is empty)." if self.file_size == 0
                else f"is not a safetensors file (only {self.file_size} bytes)."
            )
        first = self._file.read(8)
        (header_len,) = struct.unpack("<Q", first)
        if header_len > MAX_HEADER_BYTES and all(32 <= b < 127 or b in (9, 10, 13) for b in first):
            # A real length this large has zero high bytes: eight characters of text are a text file.
            raise self._fail(
                f"is not a safetensors file (it begins with the text {first.decode('ascii')!r}, "
                + ("JSON: an index or a config file?" if first.lstrip()[:1] in (b"{", b"[") else "not a binary header")
                + ")."
            )
        if header_len > MAX_HEADER_BYTES:
            raise self._fail(
                f"is not a safetensors file (it declares a {header_len}-byte header; the limit is "
                f"{MAX_HEADER_BYTES})."
            )
        if 8 + header_len > self.file_size:
            raise self._fail(
                f"is truncated or not a safetensors file (the header needs {header_len} bytes, "
                f"the file has {self.file_size - 8} after the length)."
            )
        raw = self._file.read(header_len)
        #: SHA-256 of the header bytes: names, dtypes, shapes, offsets and metadata (no data).
        self.header_sha256 = hashlib.sha256(raw).hexdigest()
        try:
            header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates(self.path))
        except ValueError as exc:  # invalid UTF-8 or JSON, or an integer too long to convert
            raise self._fail(f"is not a safetensors file (its header is not valid JSON: {_short(exc)}).") from None
        except RecursionError:
            raise self._fail("is not a safetensors file (its header nests JSON too deeply).") from None
        if not isinstance(header, dict):
            raise self._fail("is not a safetensors file (its header is not a JSON object).")

        metadata = header.pop(METADATA_KEY, None)
        metadata = {} if metadata is None else metadata
        if not isinstance(metadata, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
        ):
            raise self._fail("has a malformed __metadata__ (it must map strings to strings).")
        for key, value in metadata.items():
            if not _is_unicode(key):
                raise self._fail(f"has a __metadata__ key {key!r} that is not valid Unicode (a lone surrogate).")
            if not _is_unicode(value):
                raise self._fail(
                    f"has a __metadata__ value under {key!r} that is not valid Unicode (a lone surrogate)."
                )

        data_start = 8 + header_len
        data_len = self.file_size - data_start
        tensors = [self._tensor_info(name, entry) for name, entry in header.items()]
        tensors.sort(key=lambda t: (t.begin, t.end))
        previous_end, previous_name = 0, None
        for info in tensors:
            if info.begin < previous_end and info.nbytes:
                raise self._fail(f"tensors {previous_name!r} and {info.name!r} overlap in the header.")
            if info.end > data_len:
                raise self._fail(
                    f"is truncated: tensor {info.name!r} ends at byte {info.end} of the data, "
                    f"which has only {data_len} bytes."
                )
            if info.nbytes:
                previous_end, previous_name = info.end, info.name
        return {t.name: t for t in tensors}, metadata, data_start

    def _tensor_info(self, name: str, entry: object) -> TensorInfo:
        if not _is_unicode(name):
            raise self._fail(f"tensor name {name!r} is not valid Unicode (a lone surrogate).")
        if not isinstance(entry, dict):
            raise self._fail(f"tensor {name!r} has a malformed header entry.")
        dtype_str, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if dtype_str is None:
            raise self._fail(f"tensor {name!r} has no dtype in its header entry.")
        if not isinstance(dtype_str, str) or dtype_str not in DTYPES:
            raise self._fail(f"tensor {name!r} has an unknown dtype {_short_repr(dtype_str)}.")
        if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= MAX_INDEX for d in shape
        ):
            raise self._fail(f"tensor {name!r} has a malformed shape {_short_repr(shape)}.")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1] <= MAX_INDEX
        ):
            raise self._fail(f"tensor {name!r} has malformed data offsets {_short_repr(offsets)}.")
        dtype = DTYPES[dtype_str]
        if dtype is FP4_DTYPE:
            if not shape or shape[-1] % 2:
                raise self._fail(f"tensor {name!r} is F4 of shape {shape}; its last dimension must be even.")
            shape = [*shape[:-1], shape[-1] // 2]  # as torch holds it: one byte per pair
        expected = math.prod(shape) * dtype.itemsize
        if offsets[1] - offsets[0] != expected:
            raise self._fail(
                f"tensor {name!r} spans {offsets[1] - offsets[0]} bytes but {dtype_str}{shape} "
                f"needs {expected}."
            )
        return TensorInfo(name, dtype, tuple(shape), offsets[0], offsets[1])

    # -- data ----------------------------------------------------------------------

    #: read under its own names (:class:`cq_core.io.source.Source`)
    layout = None
    sharded = False

    def files(self) -> list[Path]:
        return [self.path]

    def part_metadata(self) -> list[Mapping[str, str]]:
        return [self.metadata]

    def shard_number(self, name: str) -> int:
        return 0

    def location(self, name: str) -> TensorLocation:
        """Where a tensor's data lies: this file (absolute) and the byte offset in it."""
        info = self.tensors[name]
        return TensorLocation(self.path.absolute(), self.data_start + info.begin, info.dtype, info.shape)

    def read(self, name: str) -> torch.Tensor:
        """Read one tensor into fresh memory (CPU, contiguous)."""
        info = self.tensors[name]
        buffer = bytearray(info.nbytes)
        if info.nbytes:
            self._file.seek(self.data_start + info.begin)
            got = self._file.readinto(buffer)
            if got != info.nbytes:
                raise self._fail(f"is truncated while reading tensor {name!r}.")
            flat = torch.frombuffer(buffer, dtype=torch.uint8)
        else:
            flat = torch.empty(0, dtype=torch.uint8, device="cpu")
        return flat.view(info.dtype).reshape(info.shape)

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> SafetensorsFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------


def build_header(entries: Sequence[tuple[str, TensorSpec]], metadata: Mapping[str, str]) -> bytes:
    """The length-prefixed, 8-byte-aligned header for tensors written in ``entries`` order."""
    header: dict[str, object] = {}
    if metadata:
        header[METADATA_KEY] = dict(metadata)
    offset = 0
    for name, spec in entries:
        if name in header:
            raise CqError(f"The output would contain tensor {name!r} twice.")
        shape = list(spec.shape)
        if spec.dtype is FP4_DTYPE:  # the header counts FP4 elements, two per byte
            shape = [*shape[:-1], shape[-1] * 2]
        header[name] = {
            "dtype": dtype_name(spec.dtype),
            "shape": shape,
            "data_offsets": [offset, offset + spec.nbytes],
        }
        offset += spec.nbytes
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """A zero-copy byte view of a contiguous CPU tensor (keep the tensor alive while used)."""
    tensor = tensor.contiguous()
    nbytes = tensor.numel() * tensor.element_size()
    if nbytes == 0:
        return memoryview(b"")
    return memoryview((ctypes.c_char * nbytes).from_address(tensor.data_ptr())).cast("B")


class StreamingWriter:
    """Writes tensors, in header order, to an open temporary file."""

    def __init__(self, file, entries: Sequence[tuple[str, TensorSpec]], output: Path) -> None:
        self._file = file
        self._entries = list(entries)
        self._next = 0
        self._output = output

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self._next >= len(self._entries):
            raise CqError(f"Internal error: tensor {name!r} was not planned for {self._output}.")
        expected_name, spec = self._entries[self._next]
        if name != expected_name:
            raise CqError(f"Internal error: wrote {name!r} where the plan expected {expected_name!r}.")
        if tensor.dtype != spec.dtype or tuple(tensor.shape) != spec.shape:
            raise CqError(
                f"Tensor {name!r} came out as {tensor.dtype} {tuple(tensor.shape)} but the plan "
                f"promised {spec.dtype} {spec.shape}; the plugin that produced it is wrong."
            )
        tensor = tensor.detach().cpu().contiguous()
        self._file.write(tensor_bytes(tensor))
        self._next += 1

    def finished(self) -> bool:
        return self._next == len(self._entries)

    def remaining(self) -> list[str]:
        return [name for name, _ in self._entries[self._next :]]


@contextmanager
def write_safetensors(
    output: str | os.PathLike,
    entries: Sequence[tuple[str, TensorSpec]],
    metadata: Mapping[str, str],
    *,
    overwrite: bool = False,
    inputs: Iterable[str | os.PathLike] = (),
) -> Iterator[StreamingWriter]:
    """Stream a safetensors file to ``output`` atomically.

    Yields a :class:`StreamingWriter`; every entry must be written, in order.
    On success the file is fsynced and renamed onto ``output``; on any
    exception (KeyboardInterrupt included) the temporary file is removed and
    ``output`` is left untouched. ``inputs``: the files being read, which
    ``output`` must not be (see :mod:`cq_core.io.outputs` for the rest).
    """
    output = Path(output)
    header = build_header(entries, metadata)
    with claim_outputs([output], overwrite=overwrite, inputs=[Path(p) for p in inputs]) as pending:
        check_free_space(output, len(header) + sum(spec.nbytes for _, spec in entries))
        with pending.open(0) as file:
            file.write(header)
            writer = StreamingWriter(file, entries, output)
            yield writer
            if not writer.finished():
                raise CqError(
                    f"Internal error: {len(writer.remaining())} planned tensors were never written, "
                    f"first {writer.remaining()[0]!r}."
                )
            file.flush()
            os.fsync(file.fileno())
        pending.commit()


#: Room left free beyond the planned size (filesystem metadata, other writers).
FREE_SPACE_MARGIN = 16 * 2**20


def check_free_space(output: Path, needed: int) -> None:
    """Refuse before writing when the output's filesystem cannot hold ``needed`` bytes."""
    free = shutil.disk_usage(output.parent).free
    if needed + FREE_SPACE_MARGIN > free:
        raise CqError(
            f"{output}: needs {human_bytes(needed)} (and {human_bytes(FREE_SPACE_MARGIN)} to spare) "
            f"but only {human_bytes(free)} is free on its disk; nothing was written."
        )
