"""How cq creates its output files: never through a link, never two runs at once, never over an input.

Every command that writes a checkpoint goes through :func:`claim_outputs`:

- The output folder is opened once; every temporary file, rename and
  removal is relative to that open folder, so swapping the folder for a
  link half-way changes nothing.
- A run first takes an exclusive ``flock`` on ``.NAME.cq-lock`` next to the
  output (the index, for a shard set). A second run for the same output
  stops right there with one sentence, before any work.
- Each output is streamed to a temporary file with a name no one else uses
  (``.NAME.<random>.cq-partial``), created with ``O_EXCL | O_NOFOLLOW``: a
  file or a link planted under that name is never opened, let alone
  truncated.
- The finished file replaces the output only if the output is still what it
  was when the run began: absent (a no-replace ``link``), or, with
  ``--overwrite``, the very file that was there. A writer that is not cq
  (and so takes no lock) is noticed there, and this run's file is discarded.
  "The very file" is more than (device, inode): a filesystem hands a deleted
  file's inode number to the next file created (ext4 does at once), so the
  file that was there is held open for the whole run (its number cannot be
  reused while it is open) and its size, mtime and ctime must be unchanged
  too (:class:`FileSnapshot`). Stale shards that ``--overwrite`` deletes are
  held and compared the same way.
- On any failure, only what this run created is removed: its temporaries,
  the outputs it had already renamed, its lock file.

:func:`check_not_inputs` compares every file a run will write or remove
with every file it reads, by identity (device and inode), not by name.
"""

from __future__ import annotations

import errno
import os
import secrets
import stat
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from cq_core.errors import CqError, UsageError
from cq_core.io.direct_io import DirectFile

try:
    import fcntl
except ImportError:  # not POSIX: no flock; the checks at rename still hold
    fcntl = None

PARTIAL_SUFFIX = ".cq-partial"
LOCK_SUFFIX = ".cq-lock"
#: errno values of a filesystem that has no hard links: the rename falls back to a checked replace.
_NO_HARD_LINKS = {errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK, errno.ENOSYS}


def _signature(st: os.stat_result) -> tuple[int, ...]:
    """What "the same file, unchanged" compares: identity, then size, mtime and ctime in nanoseconds."""
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def hold_open(folder: "OutputFolder", name: str) -> int | None:
    """A descriptor on the file ``name`` in ``folder`` (never through a link), or None when it
    cannot be opened: ``O_PATH`` where the system has it (no read permission needed)."""
    flags = getattr(os, "O_PATH", os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    flags |= getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        return os.open(name, flags, dir_fd=folder.fd)
    except OSError:
        return None


class FileSnapshot:
    """A file as it was when the run began, held open while the run lasts, so that its inode
    number cannot go to another file; :meth:`unchanged` says whether ``name`` is still it."""

    def __init__(self, folder: "OutputFolder", name: str, st: os.stat_result) -> None:
        self.name = name
        self.fd = hold_open(folder, name)
        if self.fd is not None and _signature(os.fstat(self.fd)) != _signature(st):
            os.close(self.fd)  # replaced between the look and the open: compare with what was looked at
            self.fd = None
        self.signature = _signature(st)

    def unchanged(self, folder: "OutputFolder") -> bool:
        st = folder.lstat(self.name)
        return st is not None and _signature(st) == self.signature

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def file_identity(path: Path, *, follow: bool = True) -> tuple[int, int] | None:
    """(device, inode) of ``path``, or None when there is nothing there."""
    try:
        st = os.stat(path, follow_symlinks=follow)
    except (FileNotFoundError, NotADirectoryError):
        return None
    return st.st_dev, st.st_ino


def check_not_inputs(outputs: Iterable[Path], inputs: Iterable[Path], *, verb: str = "overwrite") -> None:
    """Refuse when a file this run writes (or removes) is a file it reads, however it is named."""
    known = {}
    for path in inputs:
        identity = file_identity(Path(path))
        if identity is not None:
            known.setdefault(identity, Path(path))
    for path in outputs:
        identity = file_identity(Path(path))
        if identity is not None and identity in known:
            same = known[identity]
            what = "the input" if Path(path) == same else f"the input {same}"
            raise UsageError(f"{path}: the output would {verb} {what}; write to a new file.")


def partial_name(output_name: str) -> str:
    """A fresh hidden name for the temporary file of ``output_name``."""
    return f".{output_name}.{secrets.token_hex(6)}{PARTIAL_SUFFIX}"


def partial_files(output: Path) -> list[Path]:
    """Temporary files of ``output`` now in its folder (of this run or of another)."""
    prefix = f".{output.name}."
    try:
        names = os.listdir(output.parent)
    except OSError:
        return []
    return sorted(output.parent / n for n in names if n.startswith(prefix) and n.endswith(PARTIAL_SUFFIX))


class OutputFolder:
    """The folder outputs go to, held open; names are relative to it."""

    def __init__(self, folder: Path) -> None:
        self.path = folder
        if not folder.is_dir():
            raise CqError(f"{folder}: the output directory does not exist.")
        try:
            self.fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0))
        except OSError as exc:
            raise CqError(f"{folder}: the output directory cannot be opened ({exc.strerror}).") from None

    def lstat(self, name: str) -> os.stat_result | None:
        try:
            return os.stat(name, dir_fd=self.fd, follow_symlinks=False)
        except FileNotFoundError:
            return None

    def identity(self, name: str) -> tuple[int, int] | None:
        st = self.lstat(name)
        return None if st is None else (st.st_dev, st.st_ino)

    def snapshot(self, name: str) -> FileSnapshot | None:
        """The file ``name`` as it is now, held open (None: nothing there)."""
        st = self.lstat(name)
        return None if st is None else FileSnapshot(self, name, st)

    def create(self, final_name: str) -> tuple[str, DirectFile]:
        """A new temporary file for ``final_name``: (its name, the open file)."""
        for _ in range(100):
            name = partial_name(final_name)
            try:
                return name, DirectFile(name, dir_fd=self.fd)
            except FileExistsError:
                continue
        raise CqError(f"{self.path}: cannot find a free temporary name for {final_name}.")

    def remove(self, name: str) -> None:
        try:
            os.unlink(name, dir_fd=self.fd)
        except FileNotFoundError:
            pass

    def sync(self) -> None:
        try:
            os.fsync(self.fd)
        except OSError:
            pass  # best effort: some filesystems cannot sync a folder

    def close(self) -> None:
        os.close(self.fd)


class OutputLock:
    """An exclusive ``flock`` on ``.NAME.cq-lock`` in the output folder, removed on release."""

    def __init__(self, folder: OutputFolder, output: Path) -> None:
        self.folder = folder
        self.name = f".{output.name}{LOCK_SUFFIX}"
        self.fd: int | None = None
        if fcntl is None:
            return
        flags = os.O_RDONLY | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
        for _ in range(100):
            try:
                fd = os.open(self.name, flags, 0o644, dir_fd=folder.fd)
            except OSError as exc:
                if exc.errno == errno.ELOOP:
                    raise CqError(f"{folder.path / self.name}: is a symbolic link; cq will not use it as its "
                                  "lock file (remove it).") from None
                raise CqError(f"{folder.path}: cannot be written ({exc.strerror}); nothing was written.") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise CqError(
                    f"{output}: another cq run is writing it right now; wait for it to finish or choose "
                    "another output."
                ) from None
            except OSError:
                os.close(fd)  # a filesystem without flock: the checks at rename still hold
                return
            # The run that held the lock removes the file when done: lock the file the name has now.
            st = os.fstat(fd)
            if folder.identity(self.name) == (st.st_dev, st.st_ino):
                self.fd = fd
                return
            os.close(fd)
        raise CqError(f"{output}: cannot take the lock {self.name}; other runs keep replacing it.")

    def release(self) -> None:
        if self.fd is None:
            return
        st = os.fstat(self.fd)
        if self.folder.identity(self.name) == (st.st_dev, st.st_ino):
            self.folder.remove(self.name)
        os.close(self.fd)
        self.fd = None


class PendingOutputs:
    """The temporaries of one run's outputs, committed together or not at all."""

    def __init__(self, folder: OutputFolder, finals: Sequence[Path], overwrite: bool,
                 stale: Sequence[str] = ()) -> None:
        self.folder = folder
        self.finals = list(finals)
        self.overwrite = overwrite
        #: What each output was when the run began (None: absent), held open; a commit needs it unchanged.
        self.before = [folder.snapshot(final.name) for final in self.finals]
        #: Files --overwrite deletes after the commit (stale shards), held the same way.
        self.stale = [snap for snap in (folder.snapshot(name) for name in stale) if snap is not None]
        for final, before in zip(self.finals, self.before):
            if before is not None and not overwrite:  # it appeared since the first look
                self._release()
                raise CqError(f"{final}: already exists; pass --overwrite to replace it.")
        self.temporaries: dict[int, str] = {}
        #: The file each temporary name was created as: a name swapped meanwhile is never renamed into place.
        self.written: dict[int, tuple[int, int]] = {}
        self.held: dict[int, int] = {}
        self.renamed: list[int] = []

    def open(self, number: int) -> DirectFile:
        """Create the temporary file of output ``number`` (0-based), exclusively."""
        if number in self.temporaries:
            raise CqError(f"Internal error: {self.finals[number]} was opened twice.")
        name, file = self.folder.create(self.finals[number].name)
        self.temporaries[number] = name
        # Held open until the rename, so the inode cannot be freed and its number reused by a swapped-in file.
        self.held[number] = os.dup(file.fileno())
        st = os.fstat(self.held[number])
        self.written[number] = (st.st_dev, st.st_ino)
        return file

    def commit(self) -> None:
        """Rename every temporary onto its output, in order; the last one is the index, if any."""
        for number, final in enumerate(self.finals):
            if number not in self.temporaries:
                raise CqError(f"Internal error: {final} was never written.")
        for number, final in enumerate(self.finals):
            self._rename(self.temporaries[number], final, self.before[number], self.written[number])
            del self.temporaries[number]
            self.renamed.append(number)
        self.renamed.clear()  # committed: the outputs are the user's now
        for snap in self.stale:  # only the very files that were there: a stranger's file under the name stays
            if snap.unchanged(self.folder):
                self.folder.remove(snap.name)
        self._release()
        self.folder.sync()

    def _release(self) -> None:
        for fd in getattr(self, "held", {}).values():
            os.close(fd)
        self.held = {}
        for snap in [*self.before, *self.stale]:
            if snap is not None:
                snap.close()

    def _rename(self, tmp: str, final: Path, before: FileSnapshot | None, written: tuple[int, int]) -> None:
        fd = self.folder.fd
        taken = CqError(
            f"{final}: another program wrote it while cq was writing it; its file was kept and this "
            "run's output discarded."
        )
        swapped = CqError(
            f"{self.folder.path / tmp}: another program replaced cq's temporary file while cq was writing it; "
            f"{final.name} was not written."
        )
        if self.folder.identity(tmp) != written:
            raise swapped
        if before is None:
            try:
                os.link(tmp, final.name, src_dir_fd=fd, dst_dir_fd=fd, follow_symlinks=False)
            except FileExistsError:
                raise taken from None
            except OSError as exc:
                if exc.errno not in _NO_HARD_LINKS:
                    raise
                if self.folder.lstat(final.name) is not None:
                    raise taken from None
                os.replace(tmp, final.name, src_dir_fd=fd, dst_dir_fd=fd)
                return
            if self.folder.identity(final.name) != written:  # swapped between the check and the link
                self.folder.remove(final.name)
                raise swapped
            self.folder.remove(tmp)
            return
        if not before.unchanged(self.folder):
            raise taken
        os.replace(tmp, final.name, src_dir_fd=fd, dst_dir_fd=fd)

    def discard(self) -> None:
        """Remove what this run created: its temporaries and the outputs it had renamed."""
        for number, name in self.temporaries.items():
            if self.folder.identity(name) == self.written.get(number):  # never what another program put there
                self.folder.remove(name)
        self.temporaries.clear()
        for number in self.renamed:
            self.folder.remove(self.finals[number].name)
        self.renamed.clear()
        self._release()


def check_output_name(output: Path, overwrite: bool) -> None:
    """Refuse an output name cq must not write: a folder, a link, an existing file without --overwrite."""
    try:
        st = os.stat(output, follow_symlinks=False)
    except FileNotFoundError:
        return
    except NotADirectoryError:
        raise CqError(f"{output.parent}: is not a directory.") from None
    if stat.S_ISLNK(st.st_mode):
        raise CqError(
            f"{output}: is a symbolic link; cq writes new files, never through a link (remove it or name "
            "its target)."
        )
    if stat.S_ISDIR(st.st_mode):
        raise CqError(f"{output}: is a directory; name a file to write.")
    if not overwrite:
        raise CqError(f"{output}: already exists; pass --overwrite to replace it.")
    if not stat.S_ISREG(st.st_mode):
        raise CqError(f"{output}: is not a regular file; cq will not replace it.")


@contextmanager
def claim_outputs(
    finals: Sequence[Path],
    *,
    overwrite: bool = False,
    inputs: Iterable[Path] = (),
    lock_name: Path | None = None,
    stale: Sequence[Path] = (),
) -> Iterator[PendingOutputs]:
    """Check, lock and write ``finals`` (all in one folder) as one unit.

    Yields a :class:`PendingOutputs`; the caller opens each output's
    temporary file, writes and closes it, then calls ``commit()``. Leaving
    the block without a commit, or by an exception, removes everything the
    run created. ``inputs``: files the run reads, which no output may be.
    ``lock_name``: the output whose lock guards the set (default the last).
    ``stale``: files in the same folder that a committed run deletes (``--overwrite``'s stale
    shards), each only if it is still the file that was there when the run began.
    """
    finals = [Path(p) for p in finals]
    folder_path = finals[-1].parent
    if any(final.parent != folder_path for final in finals):
        raise CqError("Internal error: outputs of one run must share a folder.")
    for final in finals:
        check_output_name(final, overwrite)
    check_not_inputs(finals, inputs)
    folder = OutputFolder(folder_path)
    try:
        lock = OutputLock(folder, lock_name or finals[-1])
        try:
            pending = PendingOutputs(folder, finals, overwrite, [path.name for path in stale])
            try:
                yield pending
            except OSError as exc:
                pending.discard()
                where = finals[-1] if len(finals) == 1 else f"{finals[-1]} and its shards"
                raise CqError(f"{where}: writing failed ({exc.strerror or exc}); nothing was written.") from None
            except BaseException:
                pending.discard()
                raise
            pending.discard()  # no-op after a commit; a block left early writes nothing
        finally:
            lock.release()
    finally:
        folder.close()
