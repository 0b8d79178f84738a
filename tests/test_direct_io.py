"""DirectFile: the same bytes as a plain write, with or without O_DIRECT."""

from __future__ import annotations

import errno
import os

import pytest
import torch

from cq_core.io import direct_io
from cq_core.io.direct_io import ALIGN, DirectFile
from cq_core.io.safetensors_io import tensor_bytes


def pieces() -> list:
    """Headers (read-only bytes), block-aligned tensor memory, odd sizes, and pieces larger than the buffer."""
    generator = torch.Generator().manual_seed(0)

    def tensor(nbytes: int, offset: int = 0) -> memoryview:
        # Backed by a large allocation, so the start is page aligned unless offset says otherwise.
        t = torch.randint(0, 256, (nbytes + offset + 2 * ALIGN,), dtype=torch.uint8, generator=generator)
        pieces.keep.append(t)
        return tensor_bytes(t)[offset : offset + nbytes]

    pieces.keep = []
    return [
        b"header!" * 3,
        tensor(5 * ALIGN),  # arrives when the buffer is not empty: copied
        tensor(7 * ALIGN + 100, offset=0),
        tensor(3 * ALIGN, offset=8),  # unaligned source
        b"",
        tensor(1),
        tensor(13 * ALIGN + 17),  # several buffer fills
        b"tail",
    ]


@pytest.fixture
def small_buffer(monkeypatch):
    monkeypatch.setattr(direct_io, "BUFFER_BYTES", 4 * ALIGN)


def write_all(path, data) -> DirectFile:
    with DirectFile(path) as f:
        for piece in data:
            assert f.write(piece) == len(memoryview(piece).cast("B"))
        f.flush()
        os.fsync(f.fileno())
    return f


def test_bytes_are_exactly_those_written(tmp_path, small_buffer):
    data = pieces()
    f = write_all(tmp_path / "out.bin", data)
    expected = b"".join(bytes(memoryview(p).cast("B")) for p in data)
    assert (tmp_path / "out.bin").read_bytes() == expected
    assert f.closed


def test_direct_io_is_used_where_the_filesystem_allows_it(tmp_path):
    if not direct_io._O_DIRECT:
        pytest.skip("no O_DIRECT on this platform")
    with DirectFile(tmp_path / "probe.bin") as f:
        # pytest's tmp_path is on an ordinary disk in CI; tmpfs may refuse, which is the next test.
        opened_direct = f.direct
    if not opened_direct:
        pytest.skip("this filesystem refuses O_DIRECT")
    assert opened_direct


def test_a_filesystem_that_refuses_o_direct_gets_ordinary_writes(tmp_path, monkeypatch, small_buffer):
    if not direct_io._O_DIRECT:
        pytest.skip("no O_DIRECT on this platform")
    real_fcntl = direct_io.fcntl.fcntl

    def refusing_fcntl(fd, cmd, arg=0):
        if cmd == direct_io.fcntl.F_SETFL and arg & direct_io._O_DIRECT:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        return real_fcntl(fd, cmd, arg)

    monkeypatch.setattr(direct_io.fcntl, "fcntl", refusing_fcntl)
    data = pieces()
    f = write_all(tmp_path / "out.bin", data)
    assert not f.direct
    assert (tmp_path / "out.bin").read_bytes() == b"".join(bytes(memoryview(p).cast("B")) for p in data)


def test_an_existing_name_or_a_planted_link_is_never_opened(tmp_path):
    outside = tmp_path / "outside.txt"
    outside.write_bytes(b"precious")
    (tmp_path / "link.bin").symlink_to(outside)
    (tmp_path / "dangling.bin").symlink_to(tmp_path / "nowhere")
    (tmp_path / "there.bin").write_bytes(b"old")
    for name in ("link.bin", "dangling.bin", "there.bin"):
        with pytest.raises(FileExistsError):
            DirectFile(tmp_path / name)
    assert outside.read_bytes() == b"precious" and not (tmp_path / "nowhere").exists()
    assert (tmp_path / "there.bin").read_bytes() == b"old"


def test_a_write_refused_after_opening_switches_to_ordinary_writes(tmp_path, monkeypatch, small_buffer):
    if not direct_io._O_DIRECT:
        pytest.skip("no O_DIRECT on this platform")
    real_write, refused = os.write, []

    def refusing_write(fd, view):
        if not refused:
            refused.append(True)
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        return real_write(fd, view)

    monkeypatch.setattr(direct_io.os, "write", refusing_write)
    data = pieces()
    f = write_all(tmp_path / "out.bin", data)
    assert refused and not f.direct
    assert (tmp_path / "out.bin").read_bytes() == b"".join(bytes(memoryview(p).cast("B")) for p in data)


def test_a_full_disk_raises_and_closing_still_works(tmp_path, monkeypatch, small_buffer):
    def full(fd, view):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    f = DirectFile(tmp_path / "out.bin")
    monkeypatch.setattr(direct_io.os, "write", full)
    with pytest.raises(OSError) as caught:
        f.write(b"x" * (5 * ALIGN))
        f.flush()
    assert caught.value.errno == errno.ENOSPC
    f.close()
    f.close()  # twice is harmless
    assert f.closed


def test_the_environment_can_turn_direct_io_off(tmp_path, monkeypatch):
    from cq_core.engine.pipeline import TensorReader

    monkeypatch.setenv("CQ_DIRECT_IO", "0")
    with DirectFile(tmp_path / "out.bin") as f:
        assert not f.direct
        f.write(b"plain" * 1000)
    assert direct_io.direct_read_fd(tmp_path / "out.bin") is None
    payload = torch.arange(2**19, dtype=torch.float32)
    (tmp_path / "raw.bin").write_bytes(payload.numpy().tobytes())
    reader = TensorReader()
    try:
        assert torch.equal(reader.read(tmp_path / "raw.bin", 0, torch.float32, (2**19,)), payload)
        assert set(reader._direct_fds.values()) == {None}
    finally:
        reader.close()
