"""Overlapped read -> work -> write over a list of items, in order, within a memory budget.

Reading the next tensor, working on the current one(s) and writing the
previous one run at the same time: a reader thread, one or more workers (the
calling thread first) and a writer thread. Torch kernels and file I/O release the GIL, so the three
stages really overlap. Every item is charged its byte cost from the moment
it is read until it is written; the reader waits while the items in flight
would exceed the budget, so memory stays within a small multiple of the
largest tensor whatever the model size. Results are written strictly in
item order, because the output header was written before the first item.

Work runs on the calling thread so Ctrl-C arrives where the heavy work is,
and the output file is never closed while a stage still touches it: every
exit path joins both threads before returning or raising.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch

from cq_core.errors import CqError, UsageError
from cq_core.io.direct_io import ALIGN, aligned_span, direct_read_fd, read_into
from cq_core.io.source import Source

Item = TypeVar("Item")

_END = object()  # end of a stage's stream



class MemoryBudget:
    """Bytes in flight, with waiting for room; an item larger than the budget runs alone."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_use = 0
        self.peak = 0
        self._cond = threading.Condition()

    def acquire(self, nbytes: int, stop: threading.Event) -> bool:
        """Wait until ``nbytes`` fit (or nothing else is in flight); False when stopped."""
        with self._cond:
            self._cond.wait_for(lambda: stop.is_set() or self.in_use == 0 or self.in_use + nbytes <= self.limit)
            if stop.is_set():
                return False
            self.in_use += nbytes
            self.peak = max(self.peak, self.in_use)
            return True

    def release(self, nbytes: int) -> None:
        with self._cond:
            self.in_use -= nbytes
            self._cond.notify_all()

    def wake(self) -> None:
        with self._cond:
            self._cond.notify_all()


def run_pipelined(
    items: Sequence[Item],
    *,
    read: Callable[[Item], Any],
    work: Callable[[Item, Any], Any],
    write: Callable[[Item, Any], None],
    cost: Callable[[Item], int],
    budget_bytes: int,
    freed_by_work: Callable[[Item], int] | None = None,
    workers: int = 1,
) -> int:
    """``read`` on a reader thread, ``work`` on ``workers`` threads (this one first), ``write``
    on a writer thread; results are written in item order whatever order the work ends in.

    ``cost(item)`` is charged when reading starts; ``freed_by_work(item)``
    of it (the input, dropped once worked on) is returned when the work is
    done, the rest when the result is written. Returns the budget's peak
    bytes in flight. The first exception from any stage stops the others and
    is re-raised here after every thread has finished; an exception here
    (KeyboardInterrupt included) wins over theirs.
    """
    stop = threading.Event()
    budget = MemoryBudget(budget_bytes)
    to_work: queue.SimpleQueue = queue.SimpleQueue()
    done: dict[int, tuple[Any, Any, int]] = {}
    done_changed = threading.Condition()
    errors: list[BaseException] = []

    def halt() -> None:
        stop.set()
        budget.wake()
        with done_changed:
            done_changed.notify_all()

    def fail(exc: BaseException) -> None:
        errors.append(exc)
        halt()

    def reader() -> None:
        try:
            for number, item in enumerate(items):
                charge = cost(item)
                if not budget.acquire(charge, stop):
                    return
                data = read(item)
                to_work.put((number, item, data, charge))
                del data
        except BaseException as exc:  # noqa: BLE001 (handed to the calling thread)
            fail(exc)
        finally:
            for _ in range(workers):
                to_work.put(_END)

    def work_loop() -> None:
        while not stop.is_set() and (entry := to_work.get()) is not _END:
            number, item, data, charge = entry
            del entry
            if stop.is_set():
                return
            result = work(item, data)
            del data
            if freed_by_work is not None:
                freed = min(freed_by_work(item), charge)
                budget.release(freed)
                charge -= freed
            with done_changed:
                done[number] = (item, result, charge)
                done_changed.notify_all()
            del result

    def worker() -> None:
        try:
            work_loop()
        except BaseException as exc:  # noqa: BLE001
            fail(exc)

    def writer() -> None:
        try:
            for number in range(len(items)):
                with done_changed:
                    done_changed.wait_for(lambda: stop.is_set() or number in done)
                    if stop.is_set():
                        return
                    item, result, charge = done.pop(number)
                write(item, result)
                del result
                budget.release(charge)
        except BaseException as exc:  # noqa: BLE001
            fail(exc)

    threads = [
        threading.Thread(target=reader, name="cq-read", daemon=True),
        threading.Thread(target=writer, name="cq-write", daemon=True),
        *(threading.Thread(target=worker, name=f"cq-work-{n}", daemon=True) for n in range(1, workers)),
    ]
    for thread in threads:
        thread.start()
    try:
        work_loop()
        threads[1].join()  # the writer ends after the last item, or on an error
    except BaseException:
        halt()
        raise
    finally:
        halt()
        for thread in threads:
            thread.join()
    if errors:
        raise errors[0]
    return budget.peak


def run_sequential(
    items: Iterable[Item],
    *,
    read: Callable[[Item], Any],
    work: Callable[[Item, Any], Any],
    write: Callable[[Item, Any], None],
) -> None:
    """The same stages one after another on this thread: the reference the pipeline must match."""
    for item in items:
        write(item, work(item, read(item)))


# ---------------------------------------------------------------------------
# Reading into fresh (optionally pinned) memory
# ---------------------------------------------------------------------------

#: Linux transfers at most this many bytes per read call.
_MAX_READ = 1 << 30
#: Smaller tensors (norms, biases) are read the ordinary way: the page cache's
#: read-ahead serves runs of them better than one direct disk read each.
DIRECT_READ_MIN_BYTES = 1 << 20


class TensorReader:
    """Reads tensors by (path, offset) into uninitialised memory with positional reads.

    Positional reads need no shared file position, so this is safe on a
    thread of its own beside anything else that reads the same file. Tensors
    of at least :data:`DIRECT_READ_MIN_BYTES` are read with ``O_DIRECT``
    where the filesystem allows it (:mod:`cq_core.io.direct_io`: less kernel CPU,
    and the page cache is left alone); smaller ones, and every read where
    direct I/O is refused, are ordinary reads. With ``pin`` the memory is
    page-locked, so a copy to the GPU is a direct DMA.
    """

    def __init__(self, pin: bool = False, direct: bool = True) -> None:
        self.pin = pin
        self.direct = direct
        self._fds: dict[Path, int] = {}
        self._direct_fds: dict[Path, int | None] = {}

    def read(self, path: Path, offset: int, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        nbytes = dtype.itemsize
        for dim in shape:
            nbytes *= dim
        if self.direct and nbytes >= DIRECT_READ_MIN_BYTES and offset % dtype.itemsize == 0:
            tensor = self._read_direct(path, offset, nbytes, dtype, shape)
            if tensor is not None:
                return tensor
        buffer = torch.empty(nbytes, dtype=torch.uint8, device="cpu", pin_memory=self.pin)
        if nbytes:
            fd = self._fds.get(path)
            if fd is None:
                fd = self._fds[path] = os.open(path, os.O_RDONLY)
            view = _writable_bytes(buffer)
            done = 0
            while done < nbytes:
                got = os.preadv(fd, [view[done : done + _MAX_READ]], offset + done)
                if got <= 0:
                    raise _truncated(path, offset + done)
                done += got
        return buffer.view(dtype).reshape(shape)

    def _read_direct(self, path: Path, offset: int, nbytes: int, dtype, shape) -> torch.Tensor | None:
        if path not in self._direct_fds:
            self._direct_fds[path] = direct_read_fd(path)
        fd = self._direct_fds[path]
        if fd is None:
            return None
        buffer = torch.empty(
            aligned_span(offset, nbytes)[1] + ALIGN, dtype=torch.uint8, device="cpu", pin_memory=self.pin
        )
        try:
            at = read_into(fd, _writable_bytes(buffer), buffer.data_ptr(), offset, nbytes)
        except EOFError as end:
            raise _truncated(path, end.args[0]) from None
        if at is None:  # refused after all: ordinary reads for this file from now on
            os.close(fd)
            self._direct_fds[path] = None
            return None
        return buffer[at : at + nbytes].view(dtype).reshape(shape)

    def close(self) -> None:
        for fd in (*self._fds.values(), *self._direct_fds.values()):
            if fd is not None:
                os.close(fd)
        self._fds.clear()
        self._direct_fds.clear()


def _truncated(path: Path, at: int) -> CqError:
    return CqError(f"{path}: is truncated (it ended while reading at byte {at}).")


def _writable_bytes(buffer: torch.Tensor) -> memoryview:
    import ctypes

    return memoryview((ctypes.c_char * buffer.numel()).from_address(buffer.data_ptr())).cast("B")


# ---------------------------------------------------------------------------
# Devices and threads
# ---------------------------------------------------------------------------


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``auto``/None -> cuda when available, else cpu; ``cpu``; ``cuda`` or ``cuda:N``."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise UsageError(f"--device must be auto, cpu, cuda or cuda:N, not {device!r}.") from None
    if resolved.type == "cpu":
        return resolved
    if resolved.type != "cuda":
        raise UsageError(f"--device must be auto, cpu, cuda or cuda:N, not {device!r}.")
    if not torch.cuda.is_available():
        raise UsageError(f"--device {device}: no CUDA device is available to this torch build.")
    if resolved.index is not None and resolved.index >= torch.cuda.device_count():
        raise UsageError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) are present.")
    return resolved


#: The most CPU threads a run may ask for: more than any machine's cores (torch would start them all).
MAX_THREADS = 1024


def check_threads(threads: int | None) -> int | None:
    if threads is None:
        return None
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise UsageError(f"--threads must be a positive whole number, not {threads!r}.")
    if threads > MAX_THREADS:
        raise UsageError(f"--threads {threads} is more than the {MAX_THREADS} threads cq runs at most (this machine has "
                         f"{os.cpu_count() or 'an unknown number of'} CPUs; the default uses them all).")
    return threads


def to_host(tensor: torch.Tensor) -> torch.Tensor:
    """A CPU copy of a device tensor through pinned memory (call :func:`synchronize` before use)."""
    if tensor.device.type == "cpu":
        return tensor
    host = torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu", pin_memory=True)
    host.copy_(tensor, non_blocking=True)
    return host


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def read_tensor(source: Source, reader: TensorReader, name: str) -> torch.Tensor:
    """One input tensor: read in place where it lies whole, else assembled by the source
    (a tensor a layout converter fuses)."""
    location = source.location(name)
    if location is None:
        return source.read(name)
    return reader.read(location.path, location.offset, location.dtype, location.shape)
