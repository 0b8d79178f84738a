"""The cq command line, through its real entry point."""

from __future__ import annotations

import json

import pytest

from tests.cli_runner import run_cq
from tests.conftest import small_model, write_checkpoint


def test_convert_prints_a_per_layer_table_and_totals(capsys, tmp_path, model_file):
    out = tmp_path / "o.safetensors"
    r = run_cq(capsys, "convert", model_file, "-o", out)
    assert r.code == 0, r.err
    assert "blocks.0.mlp.fc1" in r.out and "SQNR dB" in r.out
    assert "3 layers quantized to float8_e4m3fn" in r.out and "Mparam/s" in r.out and "peak RSS" in r.out
    assert out.exists()


def test_default_output_name_and_refusal_to_overwrite(capsys, model_file):
    r = run_cq(capsys, "convert", model_file, "-q")
    expected = model_file.with_name("model-float8_e4m3fn.safetensors")
    assert r.code == 0 and expected.exists()
    before = expected.read_bytes()
    r = run_cq(capsys, "convert", model_file)
    assert r.code == 1
    assert r.err.strip() == f"cq: error: {expected}: already exists; pass --overwrite to replace it."
    assert expected.read_bytes() == before
    assert run_cq(capsys, "convert", model_file, "--overwrite").code == 0


def test_dry_run_reads_no_data_and_explains_each_tensor(capsys, tmp_path):
    path = write_checkpoint(tmp_path / "m.safetensors", small_model())
    # Corrupt every tensor's data: a dry run must not notice, because it reads none.
    size = path.stat().st_size
    with open(path, "r+b") as f:
        header_len = int.from_bytes(f.read(8), "little")
        f.seek(8 + header_len)
        f.write(b"\xff" * (size - 8 - header_len))
    r = run_cq(capsys, "convert", path, "--dry-run")
    assert r.code == 0, r.err
    assert "norm or embedding table" in r.out
    assert "4-D tensor" in r.out and "not a .weight tensor" in r.out
    assert "3 layers would be quantized" in r.out
    assert not list(tmp_path.glob("*float8*"))

    r = run_cq(capsys, "convert", path, "--dry-run", "--json")
    plan = json.loads(r.out)
    assert plan["dry_run"] and {t["name"]: t["action"] for t in plan["tensors"]}["blocks.0.mlp.fc2.weight"] == "quantize"


def test_exclude_keeps_matching_layers(capsys, tmp_path, model_file):
    r = run_cq(capsys, "convert", model_file, "-o", tmp_path / "o.safetensors", "--exclude", r"mlp\.fc\d", "--json")
    actions = {t["name"]: (t["action"], t["reason"]) for t in json.loads(r.out)["tensors"]}
    assert actions["blocks.0.mlp.fc1.weight"][0] == "keep"
    assert "excluded by --exclude" in actions["blocks.0.mlp.fc1.weight"][1]
    assert actions["blocks.0.attn.qkv.weight"][0] == "quantize"


def test_bad_input_is_one_line_and_nonzero(capsys, tmp_path, model_file):
    cases = [
        (("convert", tmp_path / "missing.safetensors"), 1, "no such file"),
        (("convert", model_file, "--format", "int3"), 2, "Unknown format 'int3'; valid: "),
        (("convert", model_file, "-O", "nonsense"), 2, "must look like KEY=VALUE"),
        (("convert", model_file, "-O", "colour=red"), 2, "has no option 'colour'"),
        (("convert", model_file, "-O", "input_scale=big"), 2, "takes a float"),
        (("convert", model_file, "--exclude", "("), 2, "not a valid regular expression"),
        (("convert", model_file, "--exclude", ""), 2, "--exclude '' is an empty pattern, which matches every tensor"),
        (("convert", model_file, "--optimizer", "magic"), 2, "Unknown optimizer 'magic'; valid: "),
        (("convert", model_file, "--model", "sd9"), 2, "Unknown model preset 'sd9'; valid: "),
        (("convert", model_file, "--device", "tpu"), 2, "--device must be auto, cpu, cuda or cuda:N"),
        (("inspect", tmp_path / "nothing"), 1, "no such file"),
        (("convert", model_file, "--dry-run", "--verify"), 2, "--dry-run writes no output for --verify"),
    ]
    for args, code, message in cases:
        r = run_cq(capsys, *args)
        assert r.code == code, (args, r.err)
        assert message in r.err, (args, r.err)
        assert len(r.err.strip().splitlines()) == 1, r.err
        assert "Traceback" not in r.err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]


@pytest.mark.parametrize(
    ("bad", "extra"),
    [
        (float("nan"), ()),
        (float("inf"), ()),
        (float("nan"), ("--no-measure",)),  # then a separate scan, before optimizing, finds it
        (float("-inf"), ("-f", "nvfp4")),
        (float("nan"), ("-f", "int8_tensorwise", "--optimizer", "learned")),
    ],
)
def test_nan_weight_fails_without_partial_output(capsys, tmp_path, bad, extra):
    tensors = small_model()
    tensors["blocks.0.mlp.fc2.weight"][3, 4] = bad
    path = write_checkpoint(tmp_path / "nan.safetensors", tensors)
    r = run_cq(capsys, "convert", path, "-o", tmp_path / "o.safetensors", *extra)
    assert r.code == 1
    assert f"{path}: tensor 'blocks.0.mlp.fc2.weight' contains NaN or Inf" in r.err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nan.safetensors"]


def test_already_quantized_input_is_decoded_and_quantized_again(capsys, tmp_path, model_file):
    out = tmp_path / "o.safetensors"
    assert run_cq(capsys, "convert", model_file, "-o", out).code == 0
    r = run_cq(capsys, "convert", out, "-o", tmp_path / "again.safetensors")
    assert r.code == 0 and "warning: the input was already quantized" in r.err


def test_plugins_formats_optimizers_listing(capsys, monkeypatch):
    r = run_cq(capsys, "plugins", "--json")
    rows = {p["name"]: p for p in json.loads(r.out)}
    fp8 = rows["cq_fp8.plugin"]  # in-process tests register modules, not entry points
    assert fp8["distribution"] == "cq-fp8" and fp8["version"] == "0.1.0"
    assert {"float8_e4m3fn", "float8_e5m2"} <= set(fp8["registers"]["format"])
    assert "cq_register_formats" in fp8["hooks"]
    monkeypatch.setenv("COLUMNS", "100")
    listing = run_cq(capsys, "plugins").out
    assert max(len(line) for line in listing.splitlines()) <= 100  # the presets' long list wraps
    assert "wan" in listing
    r = run_cq(capsys, "formats")
    assert r.code == 0
    line = next(line for line in r.out.splitlines() if line.startswith("float8_e4m3fn"))
    assert " 0.30.0 and later " in line
    assert " 0.31.0 and later " in next(line for line in r.out.splitlines() if line.startswith("asym_w4a8_int8"))
    assert " no release " in next(line for line in r.out.splitlines() if line.startswith("int8_blockwise"))
    formats = {f["name"]: f for f in json.loads(run_cq(capsys, "formats", "--json").out)}
    option = formats["float8_e4m3fn"]["options"][0]
    assert (option["name"], option["type"], option["default"]) == ("input_scale", "float", 1.0)
    assert "rtn" in run_cq(capsys, "optimizers").out


def test_inspect_reports_formats_and_carrier_agreement(capsys, tmp_path, model_file):
    out = tmp_path / "o.safetensors"
    run_cq(capsys, "convert", model_file, "-o", out)
    info = json.loads(run_cq(capsys, "inspect", out, "--json").out)
    assert info["formats"] == {"float8_e4m3fn": 3}
    assert info["carriers"]["agree"] and info["carriers"]["layer_tensors"] == 3
    assert info["dtypes"]["F8_E4M3"]["tensors"] == 3
    text = run_cq(capsys, "inspect", out).out
    assert "quantized layers: 3 (float8_e4m3fn: 3)" in text and "agree" in text
    assert "quantized layers: none" in run_cq(capsys, "inspect", model_file).out


def test_demo_converts_with_every_installed_format(capsys, tmp_path, registry):
    r = run_cq(capsys, "demo", "--keep", tmp_path)
    assert r.code == 0, r.err
    for name in registry.formats:
        assert name in r.out
        assert (tmp_path / f"demo-{name}.safetensors").exists()
    e4m3 = next(line for line in r.out.splitlines() if line.startswith("float8_e4m3fn"))
    assert e4m3.split()[1] == "yes"
    mean_sqnr = float(e4m3.split("MB")[1].split()[0])
    assert 30 < mean_sqnr < 33  # near the FP8 round-to-nearest limit


def test_debug_shows_the_traceback(capsys, tmp_path):
    import pytest

    from cq_core.errors import CqError

    with pytest.raises(CqError, match="no such file"):
        run_cq(capsys, "--debug", "convert", tmp_path / "missing.safetensors")


def test_no_measure_skips_the_sqnr(capsys, tmp_path, model_file):
    import json

    r = run_cq(capsys, "convert", model_file, "-o", tmp_path / "o.safetensors", "--no-measure", "--json")
    layers = [t for t in json.loads(r.out)["tensors"] if t["action"] == "quantize"]
    assert r.code == 0 and len(layers) == 3 and all(t["sqnr_db"] is None for t in layers)


def test_large_buffers_go_back_to_the_system_on_linux():
    import sys

    from cq_core.io.memory import return_large_buffers_to_the_system

    assert return_large_buffers_to_the_system() is sys.platform.startswith("linux")


@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="a Linux-only setting")
def test_cq_asks_torch_for_huge_pages_before_torch_loads_unless_told_otherwise():
    import os
    import subprocess
    import sys

    probe = "import os, sys, cq_core; cq_core.Format; print(os.environ.get('THP_MEM_ALLOC_ENABLE'), 'torch' in sys.modules)"
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["1", "True"]
    env["THP_MEM_ALLOC_ENABLE"] = "0"  # the user's choice wins
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["0", "True"]


def test_report_summary_counts_each_format_when_rules_mix_them(capsys, tmp_path, model_file):
    r = run_cq(capsys, "convert", model_file, "-o", tmp_path / "o.safetensors", "--layer", "fc2=int8_tensorwise")
    assert r.code == 0, r.err
    assert "3 layers quantized to float8_e4m3fn (2), int8_tensorwise (1) (rtn)" in r.out


def test_importing_cq_core_loads_no_torch_until_a_name_is_used():
    import subprocess
    import sys

    code = ("import sys, cq_core; assert 'torch' not in sys.modules; cq_core.Format; "
            "assert 'torch' in sys.modules; assert set(cq_core.__all__) <= set(dir(cq_core))")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_ctrl_c_while_the_modules_load_is_quiet(monkeypatch, capsys):
    import sys
    import types

    from cq_core.cli import entry

    loading = types.ModuleType("cq_core.cli.app")

    def interrupted(name):
        raise KeyboardInterrupt

    loading.__getattr__ = interrupted
    monkeypatch.setitem(sys.modules, "cq_core.cli.app", loading)
    with pytest.raises(SystemExit) as exit_info:
        entry.main(["formats"])
    assert exit_info.value.code == 130
    assert capsys.readouterr().err == "cq: interrupted; no output was written.\n"


@pytest.mark.parametrize("pattern", ["img_in|", "^", "()", ".*"])
def test_an_exclude_that_matches_the_empty_string_is_refused(capsys, tmp_path, model_file, pattern):
    """It would exclude every tensor: a typo, never the intent."""
    r = run_cq(capsys, "convert", model_file, "-o", tmp_path / "o.safetensors", "--exclude", pattern)
    assert r.code == 2 and f"--exclude {pattern!r} matches the empty string" in r.err
    assert not (tmp_path / "o.safetensors").exists()


def test_an_output_that_names_a_folder_is_refused_single_or_sharded(capsys, tmp_path, model_file):
    """'-o new/' must not write a file called 'new'; an existing folder is no sharded output's name."""
    r = run_cq(capsys, "convert", model_file, "-o", f"{tmp_path / 'new'}/")
    assert r.code == 2 and f"-o {tmp_path / 'new'}/: names a folder; name the file to write in it" in r.err
    assert not (tmp_path / "new").exists()
    (tmp_path / "od").mkdir()
    for extra in ((), ("--max-shard-size", "20KB")):
        r = run_cq(capsys, "convert", model_file, "-o", tmp_path / "od", *extra)
        assert r.code == 1 and r.err.strip() == f"cq: error: {tmp_path / 'od'}: is a directory; name a file to write."
    empty = run_cq(capsys, "convert", model_file, "-o", "")
    assert empty.code == 2 and "-o '' names no file" in empty.err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors", "od"]
