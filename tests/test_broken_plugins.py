"""A plugin that fails to import (a half-installed package while pip works, a syntax error, a
missing dependency) or whose registration hook raises is one warning sentence naming the
distribution, the entry point and CQ_DISABLE_PLUGINS; commands that do not need it go on, and one
that asks for what it would have registered says why it is missing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


def fake_distribution(site: Path, name: str, entry_point: str, module: str | None = None,
                      source: str | None = None) -> None:
    """An installed distribution as importlib.metadata sees it: a dist-info folder on sys.path."""
    info = site / f"{name.replace('-', '_')}-0.3.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.3.1\n")
    (info / "entry_points.txt").write_text(f"[cq]\n{entry_point}\n")
    if module is not None:
        (site / f"{module}.py").write_text(source or "")


def cq(site: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    path = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH", "")) if p)
    return subprocess.run([sys.executable, "-m", "cq_core", *args], capture_output=True, text=True, timeout=180,
                          env={**os.environ, "PYTHONPATH": path, **(env or {})})


@pytest.fixture(params=["missing module", "syntax error", "raises on import", "registration raises",
                        "misspelled hook", "hook arguments"])
def broken_site(request, tmp_path) -> Path:
    site = tmp_path / "site"
    site.mkdir()
    if request.param == "missing module":  # pip has written the metadata, not yet the package
        fake_distribution(site, "cq-halfway", "halfway = cq_halfway.plugin")
    elif request.param == "syntax error":
        fake_distribution(site, "cq-halfway", "halfway = cq_halfway_plugin", "cq_halfway_plugin", "def broken(:\n")
    elif request.param == "raises on import":
        fake_distribution(site, "cq-halfway", "halfway = cq_halfway_plugin", "cq_halfway_plugin",
                          "import not_installed_dependency_of_cq_halfway\n")
    elif request.param == "misspelled hook":  # pluggy's check_pending: "unknown hook"
        fake_distribution(site, "cq-halfway", "halfway = cq_halfway_plugin", "cq_halfway_plugin",
                          "import cq_core\n\n@cq_core.hookimpl\ndef cq_register_formatz(register):\n    pass\n")
    elif request.param == "hook arguments":  # pluggy's register: an argument the hook does not pass
        fake_distribution(site, "cq-halfway", "halfway = cq_halfway_plugin", "cq_halfway_plugin",
                          "import cq_core\n\n@cq_core.hookimpl\ndef cq_register_formats(registrar):\n    pass\n")
    else:
        fake_distribution(site, "cq-halfway", "halfway = cq_halfway_plugin", "cq_halfway_plugin",
                          "import cq_core\n\n@cq_core.hookimpl\ndef cq_register_formats(register):\n"
                          "    raise RuntimeError('the plugin broke')\n")
    return site


def test_commands_that_do_not_need_the_broken_plugin_go_on_with_one_warning(broken_site, model_file):
    formats = cq(broken_site, "formats")
    assert formats.returncode == 0, formats.stderr
    assert "float8_e4m3fn" in formats.stdout
    warning = [line for line in formats.stderr.splitlines() if line]
    assert len(warning) == 1 and "Traceback" not in formats.stderr, formats.stderr
    line = warning[0]
    assert line.startswith("warning: ") and "cq-halfway 0.3.1" in line and "'halfway'" in line, line
    assert "CQ_DISABLE_PLUGINS=halfway" in line, line
    dry = cq(broken_site, "convert", str(model_file), "--dry-run", "-q")
    assert dry.returncode == 0 and "would be quantized" in dry.stdout, dry.stderr
    listed = json.loads(cq(broken_site, "plugins", "--json").stdout)
    broken = next(p for p in listed if p["name"] == "halfway")
    assert broken["distribution"] == "cq-halfway" and broken["error"], broken


def test_asking_for_what_the_broken_plugin_would_register_names_it(broken_site, model_file):
    r = cq(broken_site, "convert", str(model_file), "-f", "halfway_fp6", "--dry-run")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    error = r.stderr.strip().splitlines()[-1]
    assert error.startswith("cq: error: Unknown format 'halfway_fp6'") and "cq-halfway" in error, error


def test_disabling_the_broken_plugin_silences_it(broken_site):
    r = cq(broken_site, "formats", env={"CQ_DISABLE_PLUGINS": "halfway"})
    assert r.returncode == 0 and r.stderr == "", r.stderr


def test_version_marks_a_broken_plugin_not_loaded(broken_site):
    r = cq(broken_site, "--version")
    assert r.returncode == 0 and "cq-halfway 0.3.1 (not loaded)" in r.stdout, (r.stdout, r.stderr)


def test_a_misspelled_hook_name_is_named_with_the_closest_real_hook(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    fake_distribution(site, "cq-halfway", "halfway = cq_halfway_plugin", "cq_halfway_plugin",
                      "import cq_core\n\n@cq_core.hookimpl\ndef cq_register_formatz(register):\n    pass\n")
    r = cq(site, "plugins")
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    (line,) = [line for line in r.stderr.splitlines() if line]
    assert "'cq_register_formatz' (did you mean 'cq_register_formats'?)" in line, line
    assert "cq-halfway 0.3.1" in line and "CQ_DISABLE_PLUGINS=halfway" in line, line
