"""Every regular expression a user (or a shared file) gives runs in linear time (RE2): a
catastrophic pattern against hostile tensor names cannot hang a run, and a pattern RE2 does
not support is one sentence naming the flag and the pattern."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import cq_core
from cq_core.engine.rules import compile_patterns
from cq_core.errors import UsageError
from tests.cli_runner import run_cq

SCRIPT = textwrap.dedent(
    r'''
    import sys, torch
    from pathlib import Path
    import cq_core
    from cq_core.cli.app import main
    from tests.helpers import EVIL, HOSTILE_LAYERS, build_registry, hostile_model, write_checkpoint
    from cq_core.plugin.manager import set_registry

    set_registry(build_registry())
    work = Path(sys.argv[1])
    src = write_checkpoint(work / "evil.safetensors", hostile_model())
    plain = write_checkpoint(work / "plain.safetensors", {"b.weight": torch.randn(32, 32)})

    def cq(*args):
        try:
            main([str(a) for a in args])
        except SystemExit as exc:
            assert exc.code in (0, None, 1, 2), exc.code
        print("done", args[0], flush=True)

    cq("convert", src, "--dry-run", "-q", "--model", "none", "--layer", f"{EVIL}=skip")
    cq("convert", src, "--dry-run", "-q", "--model", "none", "-x", EVIL)
    config = work / "layers.toml"
    config.write_text(f'[layers]\n"{EVIL}" = "skip"\n')
    cq("convert", src, "--dry-run", "-q", "--model", "none", "--layer-config", config)
    recipe = work / "recipe.toml"
    recipe.write_text(f'format = "float8_e4m3fn"\nexclude = ["{EVIL}"]\n[layers]\n"{EVIL}" = "skip"\n')
    cq("convert", src, "--dry-run", "-q", "--model", "none", "--recipe", recipe)
    # A shared checkpoint's recorded recipe carries the pattern; the hostile names are the new input's.
    shared = work / "shared.safetensors"
    cq_core.convert(plain, shared, model="none", exclude=[EVIL], layers={EVIL: "skip"})
    cq("convert", src, "--dry-run", "-q", "--model", "none", "--recipe-from", shared)
    quantized = work / "q.safetensors"
    cq_core.convert(src, quantized, model="none")
    cq("meta", "set", quantized, "full_precision_matrix_mult=true", "--layer", EVIL, "-o", work / "m.safetensors")
    builder = work / "evilmodel.py"
    builder.write_text(
        "import torch\n"
        "from tests.helpers import HOSTILE_LAYERS\n"
        "def build():\n"
        "    m = torch.nn.Module()\n"
        "    for name in HOSTILE_LAYERS:\n"
        "        m.add_module(name, torch.nn.Linear(4, 4))\n"
        "    m.forward = lambda x: sum(getattr(m, n)(x) for n in HOSTILE_LAYERS)\n"
        "    return m\n"
        "def data():\n"
        "    return [torch.randn(2, 4)]\n"
    )
    cq("calibrate", "--model", f"{builder}:build", "--data", f"{builder}:data", "--layers", EVIL,
       "-o", work / "stats.safetensors", "-q")
    '''
)


@pytest.mark.slow
def test_a_catastrophic_pattern_against_hostile_names_finishes_at_every_site(tmp_path):
    """--layer, -x, --layer-config, --recipe, --recipe-from, cq meta --layer, cq calibrate --layers:
    with a backtracking engine the first of these would run for hours."""
    root = Path(__file__).resolve().parents[1]
    try:
        done = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], cwd=root, capture_output=True,
                              text=True, timeout=60)
    except subprocess.TimeoutExpired as exc:
        finished = (exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        pytest.fail(f"a user pattern ran unbounded; finished before the hang: {finished.split()!r}")
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("done") == 7, done.stdout + done.stderr
    assert "Traceback" not in done.stderr, done.stderr


@pytest.mark.parametrize(
    "pattern, what",
    [
        (r"(a)\1", "a backreference"),
        (r"(?P<x>a)(?P=x)", "a backreference"),
        (r"attn(?=\.qkv)", "lookaround"),
        (r"(?<!single_)blocks", "lookaround"),
        (r"(?!x)attn", "lookaround"),
    ],
)
def test_a_pattern_re2_does_not_support_is_one_sentence_naming_flag_and_pattern(capsys, model_file, pattern, what):
    with pytest.raises(UsageError) as caught:
        compile_patterns([pattern], "--exclude")
    message = str(caught.value)
    assert message.startswith(f"--exclude {pattern!r} uses {what}"), message
    assert "RE2" in message and message.count(".") >= 1 and "\n" not in message
    r = run_cq(capsys, "convert", model_file, "--dry-run", "--layer", f"{pattern}=skip")
    assert r.code == 2 and f"--layer {pattern!r} uses {what}" in r.err, r.err
    assert r.err.count("\n") == 1, r.err  # RE2's own log line never reaches stderr


def test_unsupported_patterns_are_named_at_every_site(capsys, tmp_path, model_file):
    bad = r"(a)\1"
    config = tmp_path / "layers.toml"
    config.write_text('[layers]\n"(a)\\\\1" = "skip"\n')
    r = run_cq(capsys, "convert", model_file, "--dry-run", "--layer-config", config)
    assert r.code == 2 and "layers.toml: rule '(a)\\\\1' uses a backreference" in r.err, r.err
    r = run_cq(capsys, "convert", model_file, "--dry-run", "-x", bad)
    assert r.code == 2 and "--exclude '(a)\\\\1' uses a backreference" in r.err, r.err
    recipe = tmp_path / "r.toml"
    recipe.write_text('exclude = ["(a)\\\\1"]\n')
    r = run_cq(capsys, "convert", model_file, "--dry-run", "--recipe", recipe)
    assert r.code == 2 and "uses a backreference" in r.err and "r.toml" in r.err, r.err
    quantized = tmp_path / "q.safetensors"
    cq_core.convert(model_file, quantized)
    r = run_cq(capsys, "meta", "set", quantized, "full_precision_matrix_mult=true", "--layer", bad,
               "-o", tmp_path / "m.safetensors")
    assert r.code == 2 and "--layer '(a)\\\\1' uses a backreference" in r.err, r.err
    with pytest.raises(UsageError, match=r"--layers '\(\?=x\)' uses lookaround"):
        from cq_core.engine.capture import StatisticsCapture
        StatisticsCapture(layers="(?=x)")


def test_patterns_match_as_before():
    """RE2 takes the patterns people write: classes, anchors, alternation, inline flags, groups."""
    names = ["blocks.1.mlp.fc1.weight", "single_blocks.10.attn.qkv.weight", "img_in.weight", "Norm.weight"]
    cases = {
        r"blocks\.1\.mlp": [names[0]],
        r"^single_blocks\.\d+\.": [names[1]],
        "img_in|final_layer": [names[2]],
        "(?i)norm": [names[3]],
        r"fc[12]\.weight$": [names[0]],
        r"(?P<n>\d{2})": [names[1]],
        ".": names,
    }
    for pattern, expected in cases.items():
        regex = compile_patterns([pattern], "--layer")[0]
        assert [n for n in names if regex.search(n)] == expected, pattern
        assert regex.pattern == pattern


def test_a_name_that_is_not_valid_utf8_is_searched_not_a_traceback():
    regex = compile_patterns(["attn"], "--layer")[0]
    assert regex.search("blocks.\udcff.attn.weight") and not regex.search("\ud800")


@pytest.mark.slow
@pytest.mark.parametrize("pattern", ["(a{1000}){1000}", "x" * 10_000_000])
def test_a_pattern_too_large_for_re2_is_one_sentence_and_short(pattern):
    with pytest.raises(UsageError) as caught:
        compile_patterns([pattern], "--layer")
    message = str(caught.value)
    assert message.startswith("--layer '") and "is too large for RE2" in message, message[:300]
    assert len(message) < 500


def test_python_only_syntax_is_named_without_pythons_warnings(capsys, model_file):
    r = run_cq(capsys, "convert", model_file, "--dry-run", "-q", "-x", "[[:alpha:]]")
    assert r.code == 0 and "Warning" not in r.err, r.err  # RE2 reads it as the POSIX class
    r = run_cq(capsys, "convert", model_file, "--dry-run", "-x", r"fc\Z")
    assert r.code == 2 and r"\z or $" in r.err and r.err.count("\n") == 1, r.err


def test_a_rule_or_exclude_matching_no_tensor_is_a_warning_naming_it(tmp_path, capsys):
    from tests.helpers import small_model, write_checkpoint

    src = write_checkpoint(tmp_path / "m.safetensors", small_model())
    r = run_cq(capsys, "convert", src, "-o", tmp_path / "o.safetensors", "-x", "nomatch_at_all", "--layer",
               "nomatch2=nvfp4", "--layer", "fc1=int8_tensorwise", "-x", "fc2")
    assert r.code == 0, r.err
    warnings = [line for line in r.err.splitlines() if "matches no tensor" in line]
    assert len(warnings) == 2, r.err
    assert "--layer rule 'nomatch2' -> nvfp4 matches no tensor of the input" in warnings[0]
    assert "--exclude 'nomatch_at_all' matches no tensor of the input" in warnings[1]
    assert "its names look like 'blocks.0.attn.qkv.weight'" in warnings[0]  # a weight of the input
