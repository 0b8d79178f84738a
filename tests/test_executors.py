"""The executor hook: where the per-tensor work runs never changes the bytes."""

from __future__ import annotations

import multiprocessing
import pickle
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest
import torch

import cq_core
from cq_core import CqError, Executor, PortableTensor
from cq_core.plugin.manager import set_registry
from tests.cli_runner import run_cq
from tests.conftest import build_registry, small_model, write_checkpoint


def run_job(job, device_type):
    """In another process: read the tensor there, as a cluster's worker does."""
    return job.run(job.load(), torch.device(device_type), job.statistics())


class SubprocessExecutor(Executor):
    """Every job in a freshly spawned process: the jobs and their outcomes must pickle."""

    name = "subprocess"
    description = "a test executor"

    def run(self, conversion):
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(1, mp_context=context) as pool:
            conversion.stream(
                lambda job, tensor: pool.submit(run_job, job, "cpu").result(), workers=2, read=lambda job: None
            )


class RefusingExecutor(Executor):
    name = "refusing"

    def start(self, settings):
        raise CqError("the cluster is away.")

    def run(self, conversion):  # pragma: no cover (start refuses)
        raise AssertionError


class ExecutorPlugin:
    __name__ = "test_executors"

    @cq_core.hookimpl
    def cq_register_executors(self, register):
        register(SubprocessExecutor)
        register(RefusingExecutor)


@pytest.fixture
def with_test_executors():
    set_registry(build_registry(ExecutorPlugin()))


def test_register_executors_hook_runs_the_work_in_another_process_with_the_same_bytes(
    tmp_path, model_file, with_test_executors, monkeypatch
):
    # The spawned process imports this module by name; ComfyUI's sources (tests/comfyui.py),
    # once imported, put their own `tests` package first on the path it inherits.
    monkeypatch.syspath_prepend(str(Path(__file__).parents[1]))
    local = cq_core.convert(model_file, tmp_path / "local.safetensors", format="float8_e4m3fn", model="none")
    other = cq_core.convert(
        model_file, tmp_path / "other.safetensors", format="float8_e4m3fn", model="none", executor="subprocess"
    )
    assert len(other.quantized) == 3
    assert (tmp_path / "local.safetensors").read_bytes() == (tmp_path / "other.safetensors").read_bytes()
    assert [t.sqnr_db for t in other.quantized] == [t.sqnr_db for t in local.quantized]


def test_the_local_executor_is_the_default_and_core_registers_it(registry):
    assert registry.owners[("executor", "local")] == "cq_core.builtin.local_executor"
    assert registry.executors["local"].in_process


def test_an_executor_that_refuses_to_start_leaves_no_output(capsys, tmp_path, model_file, with_test_executors):
    result = run_cq(capsys, "convert", model_file, "-o", tmp_path / "out.safetensors", "--executor", "refusing")
    assert result.code == 1 and result.err.strip() == "cq: error: the cluster is away."
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--executor", "nope"), "Unknown executor 'nope'; valid: local."),
        (("--executor", ""), "Unknown executor ''; valid: local."),
        (("--executor-option", "x=1"), "Executor 'local' has no option 'x' (valid: none)."),
        (("--executor-option", "x"), "--executor-option 'x' must look like KEY=VALUE."),
    ],
)
def test_bad_executor_flags_are_one_sentence(capsys, tmp_path, model_file, args, message):
    result = run_cq(capsys, "convert", model_file, "-o", tmp_path / "out.safetensors", *args)
    assert result.code == 2 and result.err.strip() == f"cq: error: {message}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]


def test_an_executor_option_s_own_flag_comes_with_its_plugin_and_needs_its_executor(capsys, tmp_path, model_file):
    """``--ray-address`` is cq_ray's (its ``address`` option names the flag), not core's: it exists
    only with the plugin installed, and needs ``--executor ray``."""
    absent = run_cq(capsys, "convert", model_file, "-o", tmp_path / "out.safetensors", "--ray-address", "h:1")
    assert absent.code == 2 and "No such option: --ray-address" in absent.err
    set_registry(build_registry("cq_ray.plugin"))
    result = run_cq(capsys, "convert", model_file, "-o", tmp_path / "out.safetensors", "--ray-address", "localhost:6379")
    assert result.code == 2 and result.err.strip() == "cq: error: --ray-address needs --executor ray."
    assert "--ray-address" in run_cq(capsys, "convert", "--help").out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]


def test_cq_executors_lists_them_with_their_options(capsys, with_test_executors):
    result = run_cq(capsys, "executors")
    assert result.code == 0
    assert "local" in result.out and "subprocess" in result.out and "a test executor" in result.out


@pytest.mark.parametrize(
    "dtype", [torch.float8_e4m3fn, torch.float8_e5m2, torch.bfloat16, torch.float32, torch.int64, torch.uint8]
)
@pytest.mark.parametrize("shape", [(3, 5), (), (0, 4)])
def test_portable_tensor_pickles_any_dtype_bit_for_bit(dtype, shape):
    tensor = (torch.randn(shape) * 100).to(dtype)
    back = pickle.loads(pickle.dumps(PortableTensor.of(tensor))).tensor()
    assert back.dtype == dtype and back.shape == tensor.shape
    assert torch.equal(back.reshape(-1).view(torch.uint8), tensor.reshape(-1).view(torch.uint8))


def jobs_of(path, registry, fmt="float8_e4m3fn"):
    """The jobs cq would hand an executor for ``path``: round-to-nearest, no preset."""
    from cq_core.engine.execute import tensor_jobs
    from cq_core.engine.plan import build_plan
    from cq_core.io.safetensors_io import SafetensorsFile

    writer = registry.metadata_writer("comfyui")()
    with SafetensorsFile(path) as source:
        plan = build_plan(source, registry, registry.format(fmt)(), writer, model="none")
        return tensor_jobs(plan, source, registry.optimizer("rtn")(), writer, True, None)


def test_a_job_names_the_file_it_cannot_read(tmp_path, registry):
    path = write_checkpoint(tmp_path / "m.safetensors", small_model())
    jobs = jobs_of(path, registry)
    assert all(job.location.path == path.absolute() for job in jobs)
    path.unlink()
    with pytest.raises(CqError, match=r"m\.safetensors: cannot be read here \(No such file"):
        jobs[0].load()
