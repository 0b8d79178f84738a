"""The example third-party preset package, installed with pip as a user would, then used through `cq`.

The in-process test registry never loads entry points, so `cq` runs as a
subprocess here: the real discovery path.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests import key_layouts as fam

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "cq-preset-example"
PIP = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("pip") is None and not EXAMPLE.exists(), reason="pip or the example is missing"),
]


def _cq(*args):
    return subprocess.run([sys.executable, "-m", "cq_core", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, "CQ_DISABLE_PLUGINS": ""}, timeout=120)


@pytest.fixture(scope="module")
def example_installed(tmp_path_factory):
    # Build from a copy, so the install leaves no build/ or egg-info in the repository.
    source = tmp_path_factory.mktemp("example") / "cq-preset-example"
    shutil.copytree(EXAMPLE, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    installed = subprocess.run([*PIP, "install", "--no-deps", "--no-build-isolation", str(source)],
                               capture_output=True, text=True, timeout=300)
    if installed.returncode != 0:
        pytest.skip(f"pip could not install the example here: {installed.stderr.strip()[-300:]}")
    try:
        yield
    finally:
        subprocess.run([*PIP, "uninstall", "-y", "cq-preset-example"], capture_output=True, timeout=300)


def sd3_keys() -> dict[str, tuple[int, ...]]:
    d, w = fam.D, fam.W
    block = {"context_block.attn.qkv.weight": (3 * d, d), "context_block.adaLN_modulation.1.weight": (6 * d, d),
             "x_block.attn.qkv.weight": (3 * d, d), "x_block.mlp.fc1.weight": (4 * d, d),
             "x_block.attn.proj.weight": w}
    return {"x_embedder.proj.weight": (d, 16, 2, 2), "context_embedder.weight": (d, 128),
            "t_embedder.mlp.0.weight": (d, 256), "y_embedder.mlp.0.weight": (d, 128), "pos_embed": (1, 16, d),
            "final_layer.linear.weight": (64, d), **fam.blocks(2, block, "joint_blocks")}


def test_example_preset_is_listed_detected_and_applied(example_installed, tmp_path):
    listed = _cq("models", "--json")
    assert listed.returncode == 0, listed.stderr
    rows = {row["name"]: row for row in json.loads(listed.stdout)}
    assert rows["example_sd3"]["plugin"] == "preset_example" and rows["example_sd3"]["category"] == "image"
    assert "flux" in rows  # beside the presets of cq-models

    path = fam.write_keys(tmp_path / "sd3.safetensors", fam.prefixed(sd3_keys(), "model.diffusion_model."))
    detected = _cq("models", "detect", path)
    assert detected.stdout.startswith("example_sd3: SD3 MMDiT"), detected.stderr

    plan = _cq("convert", path, "--dry-run", "--json")
    assert plan.returncode == 0, plan.stderr
    report = json.loads(plan.stdout)
    assert report["preset"] == "example_sd3" and report["preset_reason"].startswith("detected: SD3 MMDiT")
    actions = {t["name"].removeprefix("model.diffusion_model."): (t["action"], t["reason"]) for t in report["tensors"]}
    assert actions["context_embedder.weight"] == ("keep", "preset 'example_sd3' keeps 'context_embedder' in high precision")
    assert actions["final_layer.linear.weight"][0] == "keep"
    assert actions["joint_blocks.1.x_block.mlp.fc1.weight"][0] == "quantize"

    # A checkpoint of another family is left to cq-models' own detection.
    other = fam.write_keys(tmp_path / "flux.safetensors", fam.flux1())
    assert _cq("models", "detect", other).stdout.startswith("flux: FLUX.1")
