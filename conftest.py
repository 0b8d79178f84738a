"""The suite's pytest hooks and shared fixtures, for every test folder of this checkout (tests/ and
plugins/<name>/tests/: pytest loads this file for any path under the repository root).

- ``--comfyui VERSION`` / ``--also-comfyui VERSION``: the ComfyUI release that judges a run (tests/comfyui.py,
  tests/second_judge.py), and the ``comfyui`` marker on every test that uses the ``comfyui`` fixture;
- fixtures any plugin's tests may use: ``comfyui``, ``model_file``, ``tiny_flux``.

The ``registry`` fixture is each folder's own (tests/conftest.py: every project plugin;
plugins/<name>/tests/conftest.py: that plugin and cq-core only). Helpers: tests/helpers.py.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch

from tests.helpers import small_model, write_checkpoint

#: Set by .ci/check-plugin-isolation (a plugin's tests with only cq-core, that plugin, pytest and hypothesis):
#: ComfyUI and its layout library are not installed there, so the tests that need them skip, even under CI.
WITHOUT_COMFYUI = "CQ_TESTS_WITHOUT_COMFYUI"
#: What that environment lacks: comfy-kitchen (ComfyUI's layout library) and ComfyUI's own ``comfy``.
COMFYUI_MODULES = ("comfy_kitchen", "comfy")
_MISSING_MODULE = re.compile(r"No module named '([\w.]+)'")


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector):
    """With ``$CQ_TESTS_WITHOUT_COMFYUI`` set, a test module that imports comfy-kitchen or ComfyUI is
    skipped, saying so, instead of failing to collect; anywhere else a missing test dependency is an error."""
    report = yield
    if report.failed and os.environ.get(WITHOUT_COMFYUI) and isinstance(collector, pytest.Module):
        missing = _MISSING_MODULE.search(str(report.longrepr))
        if missing and missing.group(1).split(".")[0] in COMFYUI_MODULES:
            report.outcome = "skipped"
            report.longrepr = (str(collector.path), 0, f"Skipped: imports {missing.group(1)}, and ${WITHOUT_COMFYUI} "
                                                       "is set: this environment has no ComfyUI")
    return report


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
    config.addinivalue_line("markers", "needs_plugins(*modules): the test's registry also holds these plugin "
                                       "modules (tests.helpers.registry_fixture); it skips where one is not installed")
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

    if os.environ.get(WITHOUT_COMFYUI):
        pytest.skip(f"${WITHOUT_COMFYUI} is set: this environment has no ComfyUI")
    version = loader.active_version()
    if not loader.is_fetched(version):
        message = (f"ComfyUI {version} is not fetched: run `python -m tests.comfyui fetch` "
                   "(the README's test command does)")
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(message)
        pytest.skip(message)
    return loader.import_comfyui()


@pytest.fixture
def model_file(tmp_path) -> Path:
    return write_checkpoint(tmp_path / "model.safetensors", small_model())


@pytest.fixture(scope="module")
def tiny_flux(comfyui, tmp_path_factory):
    """A FLUX.1 with ComfyUI's own class and key names, hidden size 128, one block of each kind
    (its output on fixed inputs: ``tests.helpers.flux_forward``)."""
    from comfy.ldm.flux.model import Flux

    torch.manual_seed(0)
    model = Flux(image_model="flux", in_channels=16, out_channels=16, vec_in_dim=32, context_in_dim=32,
                 hidden_size=128, mlp_ratio=4.0, num_heads=1, depth=1, depth_single_blocks=1,
                 axes_dim=[16, 56, 56], theta=10000, patch_size=2, qkv_bias=True, guidance_embed=True,
                 txt_ids_dims=[], operations=comfyui.ops.manual_cast, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.05)
    state = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}
    return write_checkpoint(tmp_path_factory.mktemp("flux") / "flux.safetensors", state)
