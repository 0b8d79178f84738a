"""Shared by the benchmark scripts: run `cq convert` in a fresh process and read its JSON report.

A fresh process per conversion makes the reported peak RSS the converter's own.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path


def run_convert(source: Path, output: Path, fmt: str, extra: list[str]) -> dict:
    """Convert ``source`` to ``output`` with ``fmt``; the report, plus ``process_wall`` seconds."""
    cmd = [sys.executable, "-m", "cq_core", "convert", str(source), "-o", str(output), "-f", fmt,
           "--json", "-q", "--overwrite", *extra]
    started = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"cq convert failed for {fmt}: {done.stderr.strip()}")
    report = json.loads(done.stdout)
    report["process_wall"] = wall
    output.unlink(missing_ok=True)
    return report
