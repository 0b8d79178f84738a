"""Usage errors and help text, with whichever typer pip installs (click vendored or not)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import typer

from cq_core.cli.app import app
from tests.cli_runner import run_cq


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["convert", "x.safetensors", "--bogus"],
        ["bogus"],
        ["convert"],
        ["convert", "x.safetensors", "--threads", "many"],
        ["meta"],
        ["meta", "set"],
        ["models", "show"],
        ["verify", "a.safetensors"],
    ],
    ids=lambda args: " ".join(args) or "(nothing)",
)
def test_every_usage_error_is_one_line_and_exit_2(capsys, args):
    result = run_cq(capsys, *args)
    assert result.code == 2
    assert result.out == ""
    lines = result.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("cq: error: "), result.err
    assert "--help'" in lines[0]


def test_usage_error_through_the_console_entry_point(tmp_path):
    env = {**os.environ, "COLUMNS": "80"}
    proc = subprocess.run(
        [sys.executable, "-m", "cq_core", "convert", "x.safetensors", "--bogus"],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stdout == ""
    [line] = proc.stderr.splitlines()
    assert line.startswith("cq: error: No such option") and "--bogus" in line
    assert line.endswith("; see 'cq convert --help'.")


def _commands(group, path=("cq",)):
    """Every command of the click tree typer builds, with its path."""
    for name, command in sorted(getattr(group, "commands", {}).items()):
        yield (*path, name), command
        yield from _commands(command, (*path, name))


def test_help_names_arguments_in_capitals_and_no_type_after_flags(capsys):
    commands = list(_commands(typer.main.get_command(app)))
    assert len(commands) > 10
    for path, command in commands:
        result = run_cq(capsys, *path[1:], "--help")
        assert result.code == 0, path
        usage = result.out.splitlines()[0]
        assert usage.startswith(f"Usage: {' '.join(path)} "), usage
        assert "{" not in usage and "<" not in usage, usage
        assert "<bool>" not in result.out, path
        options = [line for line in result.out.splitlines() if line.lstrip().startswith("-")]
        assert not any("<list[" in line for line in options), path  # a repeatable option takes one value a use
        for param in command.params:
            if param.param_type_name == "argument":
                assert param.name.upper() in usage, (path, usage)


def test_convert_usage_line():
    # the exact line a reader sees first
    ctx = typer.main.get_command(app).commands["convert"].make_context("cq convert", ["--help"], resilient_parsing=True)
    assert ctx.command.get_usage(ctx) == "Usage: cq convert [OPTIONS] INPUT"
