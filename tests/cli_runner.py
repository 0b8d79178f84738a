"""Run ``cq`` in-process through its real entry point (error handling included)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from cq_core.cli.app import main


@dataclass
class Result:
    code: int
    out: str
    err: str


def run_cq(capsys: pytest.CaptureFixture, *args: str) -> Result:
    capsys.readouterr()
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    captured = capsys.readouterr()
    return Result(code, captured.out, captured.err)
