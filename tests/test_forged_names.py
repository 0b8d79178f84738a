"""A checkpoint's tensor names and metadata values cannot forge lines of cq's human output:
newlines, other control characters, bidi overrides and line separators are printed escaped
(tables of convert, verify, meta show, inspect, migrate, models detect; warnings; errors), while
--json stays exact."""

from __future__ import annotations

import json
import unicodedata
from pathlib import Path

import pytest
import torch

import cq_core
from tests.cli_runner import run_cq
from tests.conftest import write_checkpoint
from tests.test_meta import rewrite_metadata

#: A layer name that, printed raw, writes lines of its own and reverses the rest of its line.
FORGED = "blocks.0.attn\nwrote /etc/passwd\ncq: error: forged\r\x1b[2K\u202ebidi\u2066\u2028\x85x"
#: What must never reach a terminal from a file: C0 and C1 controls (but the line ends cq writes
#: itself), bidi embeddings, overrides and isolates, line and paragraph separators.
DANGEROUS = {chr(c) for c in range(0x20) if c != 0x0A} | {chr(c) for c in range(0x7F, 0xA0)} | \
    {chr(c) for c in range(0x202A, 0x202F)} | {chr(c) for c in range(0x2066, 0x206A)} | {"\u2028", "\u2029"}


def assert_clean(text: str) -> None:
    found = sorted({f"U+{ord(c):04X}" for c in text if c in DANGEROUS or unicodedata.category(c) == "Cs"})
    assert not found, f"unescaped {found} in {text!r}"
    for line in text.split("\n"):
        assert not line.startswith(("wrote /etc/passwd", "cq: error: forged")), text


@pytest.fixture
def forged_model(tmp_path) -> Path:
    g = torch.Generator().manual_seed(0)
    return write_checkpoint(tmp_path / "forged.safetensors", {
        f"{FORGED}.weight": torch.randn(64, 64, generator=g),
        "blocks.0.mlp.fc1.weight": torch.randn(64, 64, generator=g),
        "norm\u202e.weight": torch.ones(64),
    })


def test_convert_dry_run_verify_inspect_and_meta_show_escape_names(capsys, tmp_path, forged_model):
    out = tmp_path / "out.safetensors"
    runs = {
        "dry run": run_cq(capsys, "convert", forged_model, "--dry-run", "--model", "none"),
        "convert": run_cq(capsys, "convert", forged_model, "-o", out, "--model", "none", "--all"),
        "verify": run_cq(capsys, "verify", forged_model, out),
        "inspect": run_cq(capsys, "inspect", out),
        "meta show": run_cq(capsys, "meta", "show", out),
        "models detect": run_cq(capsys, "models", "detect", forged_model),
        "quiet": run_cq(capsys, "convert", forged_model, "-o", tmp_path / "q.safetensors", "--model", "none", "-q"),
    }
    for what, r in runs.items():
        assert r.code == 0, (what, r.err)
        assert_clean(r.out)
        assert_clean(r.err)
    assert "blocks.0.attn\\nwrote /etc/passwd\\ncq: error: forged\\r\\x1b[2K\\u202ebidi" in runs["convert"].out
    assert "blocks.0.attn\\nwrote" in runs["verify"].out and "blocks.0.attn\\nwrote" in runs["meta show"].out


def test_json_keeps_names_exact(capsys, tmp_path, forged_model):
    r = run_cq(capsys, "convert", forged_model, "-o", tmp_path / "out.safetensors", "--model", "none", "--json")
    assert r.code == 0, r.err
    assert f"{FORGED}.weight" in {t["name"] for t in json.loads(r.out)["tensors"]}
    r = run_cq(capsys, "verify", forged_model, tmp_path / "out.safetensors", "--json")
    assert FORGED in {layer["layer"] for layer in json.loads(r.out)["layers"]}


def test_values_read_from_metadata_are_escaped(capsys, tmp_path, forged_model):
    """A forged format string and layer name in the metadata carriers: inspect, meta show, verify,
    migrate --check print them escaped; the errors they cause are one line."""
    out = tmp_path / "out.safetensors"
    cq_core.convert(forged_model, out, model="none")
    config = {"format": "float8_e4m3fn\nwrote /etc/passwd"}
    forged = rewrite_metadata(out, tmp_path / "bad.safetensors", header={FORGED: config}, tensors={FORGED: config})
    for args in (("inspect", forged), ("meta", "show", forged), ("verify", forged_model, forged),
                 ("migrate", forged, "--check")):
        r = run_cq(capsys, *args)
        assert_clean(r.out)
        assert_clean(r.err)
        assert r.err.count("\n") <= 1 or not r.err.startswith("cq: error"), (args, r.err)


def test_an_error_naming_a_forged_tensor_is_one_line(capsys, tmp_path):
    bad = write_checkpoint(tmp_path / "nan.safetensors", {
        f"{FORGED}.weight": torch.full((64, 64), float("nan")),
    })
    r = run_cq(capsys, "convert", bad, "-o", tmp_path / "o.safetensors", "--model", "none")
    assert r.code == 1 and r.err.startswith("cq: error: ") and r.err.count("\n") == 1, r.err
    assert_clean(r.err)


def test_warnings_naming_a_forged_tensor_are_escaped(capsys, tmp_path):
    bad = write_checkpoint(tmp_path / "nan.safetensors", {
        f"{FORGED}.weight": torch.full((64, 64), float("nan")),
        "fine.weight": torch.randn(64, 64),
    })
    r = run_cq(capsys, "convert", bad, "-o", tmp_path / "o.safetensors", "--model", "none", "--nonfinite", "keep")
    assert r.code == 0, r.err
    assert_clean(r.out)
    assert_clean(r.err)
