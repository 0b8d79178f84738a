"""``--executor ray`` (plugins/cq_ray) on a local Ray instance with 2 CPU workers: the local bytes.

The instance starts once for the module (about 5 s); every test converts on it.
Without ``ray`` installed these tests are skipped, except under CI, where they fail.
"""

from __future__ import annotations

import os
import socket
import sys

import pytest
import torch

import cq_core
from cq_core.io.calibration_file import save_statistics
from cq_core.plugin.manager import set_registry
from tests.cli_runner import run_cq
from tests.helpers import build_registry, jobs_of, write_checkpoint

LAYERS = [(256, 128), (128, 256), (256, 256), (128, 128)]
#: Ray names a worker process after the task it runs.
TASK_TITLE = "ray::convert_tensor"


def under_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


@pytest.fixture(scope="module")
def ray_instance():
    try:
        import ray
    except ImportError:
        message = "ray is not installed: pip install -e ./plugins/cq_ray (the README's test command does)"
        if under_ci():
            pytest.fail(message)
        pytest.skip(message)
    import logging

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    yield ray
    ray.shutdown()


@pytest.fixture
def ray_registry(ray_instance):
    registry = build_registry("cq_ray.plugin")
    set_registry(registry)
    return registry


def model() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    tensors = {}
    for i, (n, k) in enumerate(LAYERS):
        tensors[f"blocks.{i}.norm.weight"] = torch.ones(k, dtype=torch.bfloat16)
        tensors[f"blocks.{i}.fc.weight"] = (torch.randn(n, k, generator=g) * 0.05).to(torch.bfloat16)
        tensors[f"blocks.{i}.fc.bias"] = torch.randn(n, generator=g).to(torch.bfloat16)
    return tensors


def statistics() -> dict[str, dict[str, torch.Tensor]]:
    """Anisotropic, correlated inputs for every layer (what gptq and learned rounding weigh)."""
    g = torch.Generator().manual_seed(4)
    stats = {}
    for i, (_, k) in enumerate(LAYERS):
        x = torch.randn(512, k, generator=g) @ torch.randn(k, k, generator=g) * torch.linspace(0.1, 3, k)
        stats[f"blocks.{i}.fc"] = {"H": x.T @ x / x.shape[0], "absmax": x.abs().amax(0)}
    return stats


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ray")
    source = write_checkpoint(folder / "model.safetensors", model())
    calibration = save_statistics(statistics(), folder / "calib.safetensors")
    return source, calibration


#: ConvRot formats round whole rotated groups: the optimizers refuse them (round-to-nearest only).
ROUND_TO_NEAREST_ONLY = ("convrot_w4a4",)


def convert_twice(tmp_path, source, calibration, fmt, **ray_options):
    """Learned rounding for blocks 0 and 2, gptq for blocks 1 and 3, both with the statistics."""
    layer_config = tmp_path / "layers.toml"
    layer_config.write_text(f'[layers]\n"blocks\\\\.[13]\\\\.fc" = {{ format = "{fmt}", optimizer = "gptq" }}\n')
    args = {"format": fmt, "model": "none", "calibration": calibration}
    if fmt not in ROUND_TO_NEAREST_ONLY:
        args.update(optimizer="learned", optimizer_options={"steps": 8}, layer_config=layer_config)
    local = cq_core.convert(source, tmp_path / "local.safetensors", **args)
    ray = cq_core.convert(source, tmp_path / "ray.safetensors", executor="ray", executor_options=ray_options, **args)
    return local, ray


FORMATS = (
    "float8_e4m3fn", "float8_e5m2", "mxfp8", "int8_tensorwise", "int8_blockwise", "convrot_w4a4", "nvfp4", "asym_w4a8_int8",
)


def test_every_project_format_is_covered(registry):
    assert set(FORMATS) == set(registry.formats)


@pytest.mark.parametrize("fmt", FORMATS)
def test_ray_writes_the_local_bytes_for_every_format_and_both_optimizers(tmp_path, files, ray_registry, fmt):
    # Odd formats ship the tensors through the object store, even ones let workers read the file.
    transport = "object-store" if FORMATS.index(fmt) % 2 else "shared-file"
    local, ray = convert_twice(tmp_path, *files, fmt, transport=transport)
    assert len(ray.quantized) == len(LAYERS)
    if fmt not in ROUND_TO_NEAREST_ONLY:
        assert {t.note.split()[0].rstrip(":") for t in ray.quantized} == {"learned", "gptq"}
    assert (tmp_path / "local.safetensors").read_bytes() == (tmp_path / "ray.safetensors").read_bytes()
    assert [t.sqnr_db for t in ray.quantized] == [t.sqnr_db for t in local.quantized]


#: The fault test's own process: its Ray instance, a killer thread, two conversions. Run apart
#: from pytest, so that whatever a killed worker does to its driver cannot end the test run.
KILL_SCRIPT = """
import os, signal, sys, threading, time, logging
import psutil, ray, cq_core
ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
source, calibration, folder = sys.argv[1:4]
killed, done = [], threading.Event()
def kill_one_running_task():
    # Only this script's own Ray workers (descendants of its raylet): another Ray instance on the
    # machine (the test session's own, a concurrent run) keeps its workers, whose driver would abort.
    while not done.is_set() and not killed:
        for process in psutil.Process().children(recursive=True):
            try:
                title = " ".join(process.cmdline())
            except psutil.Error:
                continue
            if title.startswith(%r):
                os.kill(process.pid, signal.SIGKILL)
                killed.append(process.pid)
                return
        time.sleep(0.005)
killer = threading.Thread(target=kill_one_running_task)
killer.start()
try:
    args = dict(format="nvfp4", optimizer="gptq", model="none", calibration=calibration)
    local = cq_core.convert(source, os.path.join(folder, "local.safetensors"), **args)
    remote = cq_core.convert(source, os.path.join(folder, "ray.safetensors"), executor="ray", **args)
finally:
    done.set()
    killer.join()
assert killed, "no task was caught running"
assert not psutil.pid_exists(killed[0]) or psutil.Process(killed[0]).status() == psutil.STATUS_ZOMBIE
assert [t.sqnr_db for t in remote.quantized] == [t.sqnr_db for t in local.quantized]
ray.shutdown()
print("killed", killed[0])
""" % TASK_TITLE


@pytest.mark.slow
def test_a_killed_worker_is_replaced_and_the_bytes_are_the_same(tmp_path, files, ray_instance):
    """SIGKILL the worker process running a tensor's task: Ray reruns the task elsewhere."""
    import subprocess

    source, calibration = files
    script = tmp_path / "kill_a_worker.py"
    script.write_text(KILL_SCRIPT)
    done = subprocess.run(
        [sys.executable, str(script), str(source), str(calibration), str(tmp_path)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert done.returncode == 0 and "killed" in done.stdout, done.stderr[-3000:]
    assert (tmp_path / "local.safetensors").read_bytes() == (tmp_path / "ray.safetensors").read_bytes()


def test_an_error_in_a_task_is_cq_s_own_sentence_and_leaves_no_output(capsys, tmp_path, ray_registry):
    tensors = model()
    tensors["blocks.2.fc.weight"][3, 5] = float("nan")
    source = write_checkpoint(tmp_path / "nan.safetensors", tensors)
    result = run_cq(capsys, "convert", source, "-o", tmp_path / "out.safetensors", "--executor", "ray", "-q")
    assert result.code == 1
    last = result.err.strip().splitlines()[-1]
    assert last.startswith("cq: error: ") and last.endswith(
        "nan.safetensors: tensor 'blocks.2.fc.weight' contains NaN or Inf values; fix the source checkpoint, or pass "
        "--nonfinite keep to keep such tensors in high precision."
    ), last
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nan.safetensors"]


def test_a_bad_ray_address_is_one_sentence_and_leaves_no_output(capsys, tmp_path, files, ray_registry):
    source, _ = files
    port = free_port()
    result = run_cq(capsys, "convert", source, "-o", tmp_path / "out.safetensors", "--executor", "ray",
                    "--ray-address", f"127.0.0.1:{port}")
    assert result.code == 1
    assert result.err.strip() == (
        f"cq: error: --ray-address 127.0.0.1:{port}: no Ray cluster answers there (Connection refused); start "
        "one with 'ray start --head', or leave the address out for a local Ray instance."
    )
    result = run_cq(capsys, "convert", source, "-o", tmp_path / "out.safetensors", "--executor", "ray",
                    "--ray-address", "head-node")
    assert result.code == 2
    assert result.err.strip() == "cq: error: --ray-address head-node: expected HOST:PORT, ray://HOST:PORT or auto."
    assert list(tmp_path.iterdir()) == []


def test_without_ray_installed_the_executor_says_how_to_get_it(capsys, tmp_path, files, monkeypatch):
    set_registry(build_registry("cq_ray.plugin"))
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    source, _ = files
    result = run_cq(capsys, "convert", source, "-o", tmp_path / "out.safetensors", "--executor", "ray")
    assert result.code == 1
    assert result.err.strip() == (
        "cq: error: --executor ray needs the 'ray' package, which is not installed here: pip install 'ray>=2.60'."
    )
    assert list(tmp_path.iterdir()) == []


def test_ray_refuses_a_device_of_this_machine(capsys, tmp_path, files, ray_registry):
    source, _ = files
    result = run_cq(capsys, "convert", source, "-o", tmp_path / "out.safetensors", "--executor", "ray",
                    "--device", "cuda:1")
    assert result.code == 2
    assert "--device cuda:1 picks a device of this machine" in result.err
    assert list(tmp_path.iterdir()) == []


def free_port() -> int:
    """A port that was free a moment ago (bound, then closed): connecting to it is refused."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_worker_that_cannot_see_the_input_says_to_ship_the_bytes(tmp_path, registry):
    from cq_ray.executor import convert_tensor

    path = write_checkpoint(tmp_path / "m.safetensors", model())
    jobs = jobs_of(path, registry)
    path.unlink()  # as on a node without the shared filesystem
    with pytest.raises(cq_core.CqError, match=(
        r"m\.safetensors: cannot be read here \(No such file or directory\) on Ray node .+; where the workers do "
        r"not share the input's filesystem, pass --executor-option transport=object-store\.$"
    )):
        convert_tensor(jobs[0], None, None, "cpu", 1, False)


def test_quiet_keeps_ray_s_own_warnings_down_while_it_starts():
    """-q: Ray logs its cluster's security setup before ray.init applies logging_level."""
    import logging

    from cq_ray.executor import _ray_logging_at

    logger = logging.getLogger("ray")
    before = logger.level
    with _ray_logging_at(logging.ERROR):
        assert not logging.getLogger("ray._private.authentication").isEnabledFor(logging.WARNING)
    assert logger.level == before
