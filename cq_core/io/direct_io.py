"""Reading and writing large files past the page cache (``O_DIRECT``), with buffered fallbacks.

A buffered write copies every byte into the page cache, and once RAM is full
of cached input the kernel must also reclaim pages for each new one. On the
2-core benchmark machine writing 6.15 GB that way cost 13.9 s of kernel CPU
(16.3 s wall with fsync); the same bytes with ``O_DIRECT`` from an aligned
buffer took 0.25 s of kernel CPU (2.3 s wall). A converter is CPU-bound, so
that CPU goes straight into its wall time.

:class:`DirectFile` streams bytes through a page-aligned bounce buffer and
writes only whole aligned blocks directly (a block-aligned source arriving
when the file position is block-aligned too is written without the copy). The tail, shorter than a block, goes through the page
cache: ``flush`` turns ``O_DIRECT`` off for it, so the file has exactly the
bytes written and no padding to truncate. The file is always a new one,
created exclusively and never through a symbolic link. Where the filesystem refuses
``O_DIRECT`` (tmpfs on older kernels, some FUSE filesystems) or the
platform lacks it, every write is an ordinary one; the bytes are the same.
``CQ_DIRECT_IO=0`` in the environment turns direct I/O off altogether.

Reading is the same story at a smaller scale: reading the 12.3 GB benchmark
input into fresh memory cost 4.2 s of kernel CPU buffered (a copy out of the
page cache plus zeroing the new pages) and 0.75 s with ``O_DIRECT`` (which
also stays out of the page cache, so a model larger than RAM does not evict
everything else). :func:`read_into` reads the block-aligned span around a
tensor into an aligned spot of a buffer it is given; the caller takes the
tensor from the offset it returns.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os

try:
    import fcntl
except ImportError:  # not POSIX: no O_DIRECT either
    fcntl = None

#: Alignment of addresses, sizes and offsets for direct I/O (the largest common logical block).
ALIGN = 4096
#: Bounce buffer size: whole multiples of ALIGN.
BUFFER_BYTES = 16 * 2**20
_O_DIRECT = getattr(os, "O_DIRECT", 0) if fcntl is not None else 0
#: Set to 0 to read and write through the page cache (e.g. a slow disk and an input
#: that is already cached: then the cache's copy beats reading the disk again).
ENVIRONMENT_SWITCH = "CQ_DIRECT_IO"


def direct_io_enabled() -> bool:
    """Whether this platform has ``O_DIRECT`` and the environment does not turn it off."""
    return bool(_O_DIRECT) and os.environ.get(ENVIRONMENT_SWITCH, "1").strip().lower() not in ("0", "false", "no", "off")


#: A new file only: never an existing one, and never through a symbolic link (a link planted
#: under the name would otherwise have cq truncate whatever it points to).
CREATE_NEW = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)


class DirectFile:
    """A new write-only binary file (``write``, ``flush``, ``fileno``, ``close``) that bypasses the page cache.

    ``path`` must not exist (``FileExistsError`` otherwise, a symbolic link
    included); ``dir_fd``: an open folder ``path`` is relative to. The file is
    created plainly and ``O_DIRECT`` is switched on afterwards, so a
    filesystem that refuses it costs no second ``open`` of a name that now exists.
    """

    def __init__(self, path: str | os.PathLike, *, dir_fd: int | None = None) -> None:
        self._fd = os.open(path, CREATE_NEW, 0o666, dir_fd=dir_fd)
        self.direct = False
        if direct_io_enabled():
            try:
                fcntl.fcntl(self._fd, fcntl.F_SETFL, fcntl.fcntl(self._fd, fcntl.F_GETFL) | _O_DIRECT)
                self.direct = True
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    os.close(self._fd)
                    raise
        self._buffer = mmap.mmap(-1, BUFFER_BYTES) if self.direct else None
        self._used = 0
        self.closed = False

    # -- file protocol --------------------------------------------------------

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        size = len(view)
        if not self.direct:
            self.flush()  # what the buffer still holds goes first
            self._write_all(view)
            return size
        done = 0
        if self._used:
            done = self._fill(view)
        if self._used == 0 and size - done >= ALIGN and _address(view[done:]) % ALIGN == 0:
            whole = (size - done) // ALIGN * ALIGN  # aligned source: no copy
            self._write_all(view[done : done + whole])
            done += whole
        while done < size:
            done += self._fill(view[done:])
        return size

    def flush(self) -> None:
        """Write what the buffer holds (the tail, through the page cache when not whole blocks)."""
        if not self._used:
            return
        held = memoryview(self._buffer)[: self._used]
        whole = self._used // ALIGN * ALIGN if self.direct else 0
        if whole:
            self._write_all(held[:whole])
        if self._used > whole:
            self._stop_direct()
            self._write_all(held[whole:])
        self._used = 0

    def fileno(self) -> int:
        return self._fd

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._buffer = None  # unmapped once no view of it is left (a traceback may hold one)
        os.close(self._fd)

    def __enter__(self) -> DirectFile:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # -- internals ------------------------------------------------------------

    def _fill(self, view: memoryview) -> int:
        """Copy as much of ``view`` as fits into the buffer; write it out when full."""
        take = min(len(view), BUFFER_BYTES - self._used)
        self._buffer[self._used : self._used + take] = view[:take]
        self._used += take
        if self._used == BUFFER_BYTES:
            self._write_all(memoryview(self._buffer))
            self._used = 0
        return take

    def _write_all(self, view: memoryview) -> None:
        while len(view):
            try:
                written = os.write(self._fd, view)
            except OSError as exc:
                if exc.errno != errno.EINVAL or not self.direct:
                    raise
                self._stop_direct()  # accepted at open, refused now: write through the cache
                continue
            if written <= 0:
                raise OSError(errno.EIO, "the disk accepted no bytes")
            view = view[written:]
            if len(view) and written % ALIGN:
                self._stop_direct()  # a short write left the position unaligned

    def _stop_direct(self) -> None:
        if self.direct:
            fcntl.fcntl(self._fd, fcntl.F_SETFL, fcntl.fcntl(self._fd, fcntl.F_GETFL) & ~_O_DIRECT)
            self.direct = False


def _address(view: memoryview) -> int:
    """Start address of a byte view, or 1 (never aligned) when it cannot be taken."""
    try:
        return ctypes.addressof(ctypes.c_char.from_buffer(view))
    except (TypeError, ValueError):  # read-only (bytes) or empty
        return 1


def direct_read_fd(path: str | os.PathLike) -> int | None:
    """A read-only ``O_DIRECT`` descriptor for ``path``, or None where that is refused or turned off."""
    if not direct_io_enabled():
        return None
    try:
        return os.open(path, os.O_RDONLY | _O_DIRECT | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        if exc.errno == errno.EINVAL:
            return None
        raise


def aligned_span(offset: int, nbytes: int) -> tuple[int, int]:
    """``(start, length)`` of the whole aligned blocks that cover bytes ``offset .. offset + nbytes``."""
    start = offset - offset % ALIGN
    end = -(-(offset + nbytes) // ALIGN) * ALIGN
    return start, end - start


def read_into(fd: int, buffer: memoryview, buffer_address: int, offset: int, nbytes: int) -> int | None:
    """Read bytes ``offset .. offset + nbytes`` of the file with direct I/O into ``buffer``, which
    must hold ``aligned_span(...)[1] + ALIGN`` bytes; returns where in ``buffer`` they start.

    None when the file refuses direct reads here (the caller reads it the ordinary way).
    Raises EOFError when the file ends before ``offset + nbytes``.
    """
    start, length = aligned_span(offset, nbytes)
    skip = -buffer_address % ALIGN  # first aligned byte of the buffer
    target = buffer[skip : skip + length]
    done = 0
    while done < offset + nbytes - start:
        try:
            got = os.preadv(fd, [target[done:]], start + done)
        except OSError as exc:
            if exc.errno == errno.EINVAL:
                return None
            raise
        if got <= 0:
            raise EOFError(start + done)
        done += got
        if done % ALIGN and done < offset + nbytes - start:
            return None  # a short read left the position unaligned: let the caller read plainly
    return skip + offset - start
