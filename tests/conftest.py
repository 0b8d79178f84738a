"""Shared fixtures. The registry is built from this repository's plugins only:
entry points are not loaded, so the suite never depends on what else is installed."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from cq_core.plugin.manager import Registry, make_plugin_manager, set_registry

PROJECT_PLUGINS = ("cq_fp8.plugin", "cq_int8.plugin", "cq_nvfp4.plugin", "cq_models.plugin")


def build_registry(*extra) -> Registry:
    return Registry.from_plugin_manager(
        make_plugin_manager(load_entry_points=False, extra_plugins=(*PROJECT_PLUGINS, *extra))
    )


@pytest.fixture(autouse=True)
def registry(monkeypatch) -> Registry:
    """The process-wide registry, used by the API and the CLI in every test."""
    monkeypatch.delenv("CQ_DISABLE_PLUGINS", raising=False)
    reg = build_registry()
    set_registry(reg)
    yield reg
    set_registry(None)


def write_checkpoint(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    """Write with the reference safetensors writer, not ours."""
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


def small_model(dtype=torch.bfloat16, seed=0) -> dict[str, torch.Tensor]:
    """A two-layer model with the tensor kinds a real checkpoint has."""
    g = torch.Generator().manual_seed(seed)
    return {
        "embed_tokens.weight": torch.randn(64, 32, generator=g).to(dtype),
        "blocks.0.norm1.weight": torch.ones(32, dtype=dtype),
        "blocks.0.attn.qkv.weight": torch.randn(96, 32, generator=g).to(dtype),
        "blocks.0.attn.qkv.bias": torch.randn(96, generator=g).to(dtype),
        "blocks.0.mlp.fc1.weight": torch.randn(128, 32, generator=g).to(dtype),
        "blocks.0.mlp.fc2.weight": torch.randn(32, 128, generator=g).to(dtype),
        "blocks.0.conv.weight": torch.randn(8, 4, 3, 3, generator=g).to(dtype),
        "position_ids": torch.arange(16, dtype=torch.int64),
    }


@pytest.fixture
def model_file(tmp_path) -> Path:
    return write_checkpoint(tmp_path / "model.safetensors", small_model())


def pytest_addoption(parser):
    parser.addoption(
        "--comfyui", metavar="VERSION", default=None,
        help="the ComfyUI release that judges this run (tests/comfyui.py TREES; default: the pin, "
             "or $CQ_COMFYUI_VERSION); select its tests with -m comfyui",
    )
    parser.addoption(
        "--also-comfyui", metavar="VERSION", default=None,
        help="also run every test ComfyUI judges with this release, in a second pytest process "
             "beside this one (tests/second_judge.py); its failures fail this run",
    )


def _known_version(option: str, version: str) -> str:
    from tests import comfyui as loader

    if version not in loader.TREES:
        raise pytest.UsageError(f"{option} {version}: the tests have ComfyUI {', '.join(loader.TREES)}")
    return version


def pytest_configure(config):
    config.addinivalue_line("markers", "comfyui: loads cq's output with ComfyUI (the `comfyui` fixture); "
                                       "`--comfyui VERSION -m comfyui` reruns them with another release")
    from tests import comfyui as loader

    version = config.getoption("--comfyui", default=None)
    if version:
        # the environment, so that processes the tests start (cq calibrate --comfyui, executors) judge alike
        os.environ[loader.VERSION_VARIABLE] = _known_version("--comfyui", version)
    also = config.getoption("--also-comfyui", default=None)
    if also and not hasattr(config, "workerinput"):
        if _known_version("--also-comfyui", also) == loader.active_version():
            raise pytest.UsageError(f"--also-comfyui {also}: this run is already judged by ComfyUI {also}")
        from tests.second_judge import SecondJudge, child_args

        judge = SecondJudge(also)
        judge.start(child_args(config.invocation_params.args), Path(config.invocation_params.dir))
        config.stash[SECOND_JUDGE] = judge


SECOND_JUDGE = pytest.StashKey()


@pytest.hookimpl(tryfirst=True)
def pytest_sessionfinish(session, exitstatus):
    judge = session.config.stash.get(SECOND_JUDGE, None)
    if judge is not None:
        judge.wait(interrupted=exitstatus == pytest.ExitCode.INTERRUPTED)
        if judge.failed and session.exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED):
            session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    judge = config.stash.get(SECOND_JUDGE, None)
    if judge is not None:
        terminalreporter.section(f"ComfyUI {judge.version}", sep="=", red=judge.failed, green=not judge.failed)
        for line in judge.summary():
            terminalreporter.write_line(line)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Mark every test that ComfyUI judges (it uses the ``comfyui`` fixture), before ``-m`` selects."""
    for item in items:
        if "comfyui" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.comfyui)


@pytest.fixture(scope="session")
def comfyui():
    """ComfyUI's own ``comfy`` package, imported on the CPU from the cached tree of the release that
    judges this run (``tests.comfyui.active_version()``: the pin 0.30.0, or ``--comfyui 0.33.0``).

    Without the cache a developer's run skips these tests; CI (``CI=true``) fails instead,
    so the judge of every output is never silently absent there.
    """
    from tests import comfyui as loader

    version = loader.active_version()
    if not loader.is_fetched(version):
        message = (f"ComfyUI {version} is not fetched: run `python -m tests.comfyui fetch` "
                   "(the README's test command does)")
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(message)
        pytest.skip(message)
    return loader.import_comfyui()
