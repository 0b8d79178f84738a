"""The pipelined converter: same bytes as a sequential run, bounded memory, clean failure."""

from __future__ import annotations

import random
import threading
import time

import pytest
import torch
from safetensors import safe_open

import cq_core
from cq_core.engine import pipeline
from cq_core.errors import CqError, UsageError
from cq_core.engine.pipeline import MemoryBudget, TensorReader, run_pipelined
from cq_core.io.outputs import partial_files
from cq_core.io.safetensors_io import SafetensorsFile, StreamingWriter
from tests.cli_runner import run_cq
from tests.comfy import LAYOUTS, comfy_dequantize
from tests.helpers import small_model, write_checkpoint

#: Formats whose layout comfy-kitchen decodes, and a shape they all take.
COMFY_FORMATS = ("float8_e4m3fn", "float8_e5m2", "int8_tensorwise", "nvfp4", "mxfp8")


def model(seed: int = 0) -> dict[str, torch.Tensor]:
    """Several quantizable layers of different sizes, multiples of 32 so every format takes them."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for i, (n, k) in enumerate([(64, 32), (96, 64), (128, 96), (32, 128), (160, 64)]):
        tensors[f"blocks.{i}.norm.weight"] = torch.ones(k, dtype=torch.bfloat16)
        tensors[f"blocks.{i}.proj.weight"] = (torch.randn(n, k, generator=g) * 0.05).to(torch.bfloat16)
        tensors[f"blocks.{i}.proj.bias"] = torch.randn(n, generator=g).to(torch.bfloat16)
    return tensors


def file_bytes(path) -> bytes:
    return path.read_bytes()


@pytest.fixture
def model_path(tmp_path):
    return write_checkpoint(tmp_path / "model.safetensors", model())


@pytest.mark.parametrize("fmt", ["float8_e4m3fn", "int8_tensorwise", "nvfp4", "mxfp8"])
def test_pipelined_output_is_byte_identical_to_sequential(tmp_path, model_path, fmt):
    piped = cq_core.convert(model_path, tmp_path / "piped.safetensors", format=fmt, model="none")
    serial = cq_core.convert(
        model_path, tmp_path / "serial.safetensors", format=fmt, model="none", pipelined=False
    )
    assert len(piped.quantized) == 5
    assert file_bytes(tmp_path / "piped.safetensors") == file_bytes(tmp_path / "serial.safetensors")
    assert [t.name for t in piped.tensors] == [t.name for t in serial.tensors]
    # the bytes are identical; a reported SQNR may differ in its last digits with the thread count.
    # Only quantized layers have one (pytest 9 refuses approx over None).
    assert [t.sqnr_db is None for t in piped.tensors] == [t.sqnr_db is None for t in serial.tensors]
    assert [t.sqnr_db for t in piped.quantized] == pytest.approx([t.sqnr_db for t in serial.quantized], rel=1e-6)


def test_explicit_cpu_device_and_one_thread_give_the_same_bytes(tmp_path, model_path):
    cq_core.convert(model_path, tmp_path / "a.safetensors", model="none")
    cq_core.convert(model_path, tmp_path / "b.safetensors", model="none", device="cpu", threads=1)
    assert file_bytes(tmp_path / "a.safetensors") == file_bytes(tmp_path / "b.safetensors")


def test_threads_setting_is_restored_after_a_run(tmp_path, model_path):
    before = torch.get_num_threads()
    cq_core.convert(model_path, tmp_path / "a.safetensors", model="none", threads=1)
    assert torch.get_num_threads() == before


@pytest.mark.parametrize("fmt", COMFY_FORMATS)
def test_pipelined_output_decodes_in_comfy_kitchen(registry, tmp_path, model_path, fmt):
    out = tmp_path / "out.safetensors"
    cq_core.convert(model_path, out, format=fmt, model="none")
    source = model()
    fmt_obj = registry.format(fmt)()
    with safe_open(str(out), "pt") as f:
        stored = {k: f.get_tensor(k) for k in f.keys()}
    for i in range(5):
        layer = f"blocks.{i}.proj"
        weight = source[f"{layer}.weight"]
        mine = {k.removeprefix(layer + "."): v for k, v in stored.items() if k.startswith(layer + ".")}
        params = {"scale": mine["weight_scale"]}
        if fmt == "nvfp4":
            params = {"scale": mine["weight_scale_2"], "block_scale": mine["weight_scale"]}
        elif fmt == "mxfp8":  # ComfyUI hands the U8 exponents to comfy-kitchen as E8M0
            params = {"scale": mine["weight_scale"].view(torch.float8_e8m0fnu)}
        theirs = comfy_dequantize(LAYOUTS[fmt], mine["weight"], weight.shape, **params).float()
        theirs = theirs[: weight.shape[0], : weight.shape[1]]
        ours = fmt_obj.decode(mine)
        assert torch.allclose(theirs, ours, rtol=0, atol=1e-6), layer
        # and it is a faithful picture of the source weight, not of some other layer
        err = (theirs - weight.float()).norm() / weight.float().norm()
        assert err < (0.2 if fmt == "nvfp4" else 0.08), (layer, float(err))


def test_report_lists_every_tensor_in_plan_order_with_peak_memory(tmp_path, model_path):
    report = cq_core.convert(model_path, tmp_path / "out.safetensors", model="none")
    with SafetensorsFile(model_path) as source:
        assert [t.name for t in report.tensors] == list(source.tensors)  # the input's order
    assert report.peak_rss_bytes > 50 << 20  # torch alone is more than this
    assert all(t.sqnr_db is not None for t in report.quantized)


# -- failures -------------------------------------------------------------------------------


def _no_leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name != "model.safetensors")


def test_write_failure_midway_leaves_nothing(tmp_path, model_path, monkeypatch):
    real_write = StreamingWriter.write
    calls = []

    def failing_write(self, name, tensor):
        calls.append(name)
        if len(calls) == 7:
            raise OSError(28, "No space left on device")
        real_write(self, name, tensor)

    monkeypatch.setattr(StreamingWriter, "write", failing_write)
    with pytest.raises(CqError, match="No space left"):
        cq_core.convert(model_path, tmp_path / "out.safetensors", model="none")
    assert _no_leftovers(tmp_path) == []
    assert threading.active_count() == 1 or not any(t.name.startswith("cq-") for t in threading.enumerate())


def test_read_failure_midway_leaves_nothing(tmp_path, model_path, monkeypatch):
    real_read = TensorReader.read
    calls = []

    def failing_read(self, path, offset, dtype, shape):
        calls.append(offset)
        if len(calls) == 4:
            raise CqError(f"{path}: is truncated (test).")
        return real_read(self, path, offset, dtype, shape)

    monkeypatch.setattr(TensorReader, "read", failing_read)
    with pytest.raises(CqError, match="truncated"):
        cq_core.convert(model_path, tmp_path / "out.safetensors", model="none")
    assert _no_leftovers(tmp_path) == []
    assert not any(t.name.startswith("cq-") for t in threading.enumerate())


def test_work_failure_midway_leaves_nothing(tmp_path):
    tensors = model()
    tensors["blocks.3.proj.weight"][5, 7] = float("nan")
    path = write_checkpoint(tmp_path / "model.safetensors", tensors)
    with pytest.raises(CqError, match="blocks.3.proj.weight"):
        cq_core.convert(path, tmp_path / "out.safetensors", model="none")
    assert _no_leftovers(tmp_path) == []
    assert not partial_files(tmp_path / "out.safetensors")


# -- the pipeline itself ---------------------------------------------------------------------


def test_pipeline_keeps_order_and_the_memory_budget_under_random_delays():
    rng = random.Random(0)
    items = list(range(40))
    sizes = {i: rng.choice([10, 30, 100]) for i in items}
    in_flight = {"now": 0, "peak": 0}
    lock = threading.Lock()
    written = []

    def read(i):
        with lock:
            in_flight["now"] += sizes[i]
            in_flight["peak"] = max(in_flight["peak"], in_flight["now"])
        time.sleep(rng.random() * 0.002)
        return i * 10

    def work(i, data):
        time.sleep(rng.random() * 0.002)
        return data + 1

    def write(i, result):
        time.sleep(rng.random() * 0.002)
        written.append((i, result))
        with lock:
            in_flight["now"] -= sizes[i]

    peak = run_pipelined(items, read=read, work=work, write=write, cost=sizes.__getitem__, budget_bytes=150)
    assert written == [(i, i * 10 + 1) for i in items]
    assert peak <= 150
    assert in_flight["peak"] <= 150


def test_an_item_larger_than_the_budget_runs_alone():
    budget = MemoryBudget(100)
    stop = threading.Event()
    assert budget.acquire(500, stop)  # nothing else in flight: admitted
    blocked = threading.Event()

    def second():
        budget.acquire(10, stop)
        blocked.set()

    thread = threading.Thread(target=second)
    thread.start()
    assert not blocked.wait(0.05)  # waits while the big one is in flight
    budget.release(500)
    assert blocked.wait(2)
    thread.join()


@pytest.mark.parametrize("stage", ["read", "work", "write"])
def test_the_first_error_of_any_stage_is_raised_and_all_threads_end(stage):
    def maybe_fail(name, i):
        if name == stage and i == 5:
            raise ValueError(f"{stage} failed at {i}")

    def read(i):
        maybe_fail("read", i)
        return i

    def work(i, data):
        maybe_fail("work", i)
        return data

    written = []

    def write(i, result):
        maybe_fail("write", i)
        written.append(i)

    with pytest.raises(ValueError, match=f"{stage} failed at 5"):
        run_pipelined(range(20), read=read, work=work, write=write, cost=lambda i: 1, budget_bytes=3)
    assert written == list(range(min(len(written), 5)))
    assert 5 not in written
    assert not any(t.name.startswith("cq-") for t in threading.enumerate())


def test_tensor_reader_reads_exact_bytes_at_offsets(tmp_path):
    path = tmp_path / "raw.bin"
    payload = torch.arange(1000, dtype=torch.float32)
    path.write_bytes(b"x" * 13 + payload.numpy().tobytes())
    reader = TensorReader()
    try:
        got = reader.read(path, 13 + 40, torch.float32, (10, 5))
        assert torch.equal(got, payload[10:60].reshape(10, 5))
        with pytest.raises(CqError, match="truncated"):
            reader.read(path, 13 + 3900, torch.float32, (100,))
    finally:
        reader.close()


def _raw_file(tmp_path, lead: int, elements: int):
    payload = torch.randn(elements, generator=torch.Generator().manual_seed(1))
    path = tmp_path / "raw.bin"
    path.write_bytes(b"x" * lead + payload.numpy().tobytes())
    return path, payload


@pytest.mark.parametrize("direct", [True, False])
@pytest.mark.parametrize("lead", [0, 8, 4096 - 4, 4096 * 3 + 12, 6])  # 6: float32 off its alignment, read plainly
def test_large_tensors_read_the_same_with_and_without_direct_io(tmp_path, direct, lead):
    # 2 MB tensors take the O_DIRECT path where the filesystem allows it; the file
    # offsets here start inside a block, end inside one, and run to the file's end.
    path, payload = _raw_file(tmp_path, lead, 3 * 2**19)
    reader = TensorReader(direct=direct)
    try:
        for first, rows in ((0, 4), (1, 4), (2, 4)):  # the last one ends at the file's last byte
            got = reader.read(path, lead + first * 2**21, torch.float32, (rows, 2**17))
            assert torch.equal(got, payload[first * 2**19 : (first + 1) * 2**19].reshape(rows, 2**17))
        if direct and lead % 4 == 0 and _filesystem_allows_direct_io(path):
            assert reader._direct_fds[path] is not None  # really read with O_DIRECT
        with pytest.raises(CqError, match="truncated"):
            reader.read(path, lead + 2 * 2**21 + 4, torch.float32, (4, 2**17))  # 4 bytes past the end
    finally:
        reader.close()


def _filesystem_allows_direct_io(path) -> bool:
    import os

    fd = pipeline.direct_read_fd(path)
    if fd is not None:
        os.close(fd)
    return fd is not None


def test_reader_falls_back_to_ordinary_reads_when_direct_io_is_refused(tmp_path, monkeypatch):
    path, payload = _raw_file(tmp_path, 12, 2**19)
    calls = []

    def refused(*args):
        calls.append(args)
        return None

    monkeypatch.setattr(pipeline, "read_into", refused)  # refused at the first read
    reader = TensorReader()
    try:
        for _ in range(2):
            assert torch.equal(reader.read(path, 12, torch.float32, (2**19,)), payload)
    finally:
        reader.close()
    assert len(calls) == (1 if _filesystem_allows_direct_io(path) else 0)  # then never again
    monkeypatch.setattr(pipeline, "direct_read_fd", lambda path: None)  # refused at open
    reader = TensorReader()
    try:
        assert torch.equal(reader.read(path, 12, torch.float32, (2**19,)), payload)
    finally:
        reader.close()


# -- options -----------------------------------------------------------------------------------


@pytest.mark.parametrize("device", ["tpu", "cuda:x", "metal"])
def test_unknown_device_is_a_usage_error(tmp_path, model_path, device):
    with pytest.raises(UsageError, match="--device"):
        cq_core.convert(model_path, tmp_path / "out.safetensors", device=device)
    assert _no_leftovers(tmp_path) == []


def test_cuda_without_a_gpu_is_a_usage_error(tmp_path, model_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UsageError, match="--device cuda: no CUDA device"):
        cq_core.convert(model_path, tmp_path / "out.safetensors", device="cuda")
    assert pipeline.resolve_device("auto") == torch.device("cpu")
    assert pipeline.resolve_device(None) == torch.device("cpu")


@pytest.mark.parametrize("threads", [0, -2, 1.5, True])
def test_bad_thread_counts_are_usage_errors(tmp_path, model_path, threads):
    with pytest.raises(UsageError, match="--threads"):
        cq_core.convert(model_path, tmp_path / "out.safetensors", threads=threads)


def test_cli_validates_threads_and_device(capsys, tmp_path, model_path):
    result = run_cq(capsys, "convert", model_path, "-o", tmp_path / "o.safetensors", "--threads", "0")
    assert result.code == 2 and "--threads" in result.err and result.err.count("\n") == 1
    result = run_cq(capsys, "convert", model_path, "-o", tmp_path / "o.safetensors", "--device", "tpu")
    assert result.code == 2 and "--device" in result.err
    result = run_cq(
        capsys, "convert", model_path, "-o", tmp_path / "o.safetensors", "--device", "cpu", "--threads", "1", "-q"
    )
    assert result.code == 0, result.err
    assert (tmp_path / "o.safetensors").exists()


def test_small_model_fixture_still_converts(tmp_path):
    """The conftest model mixes kept, quantized and non-float tensors."""
    path = write_checkpoint(tmp_path / "m.safetensors", small_model())
    piped = cq_core.convert(path, tmp_path / "a.safetensors", model="none")
    cq_core.convert(path, tmp_path / "b.safetensors", model="none", pipelined=False)
    assert file_bytes(tmp_path / "a.safetensors") == file_bytes(tmp_path / "b.safetensors")
    assert len(piped.tensors) == len(small_model())


@pytest.mark.parametrize("workers", [2, 4])
def test_several_workers_still_write_in_order(workers):
    rng = random.Random(workers)
    written = []

    def work(i, data):
        time.sleep(rng.random() * 0.003)  # later items often finish first
        return data * 2

    run_pipelined(range(30), read=lambda i: i, work=work, write=lambda i, r: written.append((i, r)),
                  cost=lambda i: 1, budget_bytes=8, freed_by_work=lambda i: 1, workers=workers)
    assert written == [(i, 2 * i) for i in range(30)]
    assert not any(t.name.startswith("cq-") for t in threading.enumerate())


def test_three_cpu_workers_give_the_same_bytes(tmp_path, model_path):
    cq_core.convert(model_path, tmp_path / "a.safetensors", model="none", format="nvfp4", pipelined=False)
    cq_core.convert(model_path, tmp_path / "b.safetensors", model="none", format="nvfp4", threads=3)
    assert file_bytes(tmp_path / "a.safetensors") == file_bytes(tmp_path / "b.safetensors")
