"""SIGTERM to ``cq convert --executor ray``, while Ray starts and once its tasks run: cq's one
sentence, exit 143 (128 + SIGTERM), no output, and nothing left running that cq started (Ray's
GCS, raylet, dashboard and runtime-env agents, workers: every process descended from cq).

Linux only (it follows the process tree in /proc). About 20 s per case on 2 cores."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import write_checkpoint

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="follows the process tree in /proc"),
]
pytest.importorskip("ray")

ROOT = Path(__file__).resolve().parents[3]


def _stat(pid: int) -> tuple[int, str, str] | None:
    """(parent pid, state, start time) of ``pid``, or None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()
    return int(fields[1]), fields[0], fields[19]


def _command(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return "?"


def descendants(root: int) -> dict[int, tuple[str, str]]:
    """pid -> (start time, command line) of every living process below ``root``."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (info := _stat(int(entry))) is not None:
            parents.setdefault(info[0], []).append(int(entry))
    found, todo = {}, [root]
    while todo:
        for child in parents.get(todo.pop(), []):
            info = _stat(child)
            if info is not None and child not in found:
                found[child] = (info[2], _command(child))
                todo.append(child)
    return found


def alive(pid: int, started: str) -> bool:
    info = _stat(pid)
    return info is not None and info[2] == started and info[1] != "Z"


def model_file(tmp_path: Path) -> Path:
    g = torch.Generator().manual_seed(0)
    return write_checkpoint(tmp_path / "model.safetensors", {
        f"blocks.{i}.fc.weight": torch.randn(512, 512, generator=g).to(torch.bfloat16) for i in range(8)
    })


@pytest.mark.parametrize("when", ["while Ray starts", "while tasks run"])
def test_sigterm_with_the_ray_executor_is_one_sentence_143_and_leaves_nothing_running(tmp_path, when):
    source = model_file(tmp_path)
    out = tmp_path / "out.safetensors"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "RAY_ADDRESS": "", "COLUMNS": "200"}
    env.pop("RAY_ADDRESS")
    process = subprocess.Popen(
        [sys.executable, "-m", "cq_core", "convert", str(source), "-o", str(out), "--executor", "ray",
         "--optimizer", "learned", "--optimizer-option", "steps=3000", "--optimizer-option", "patience=3000",
         "--model", "none", "-q"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path,
    )
    seen: dict[int, tuple[str, str]] = {}
    deadline = time.monotonic() + 120
    sent = False
    try:
        while process.poll() is None and time.monotonic() < deadline:
            now = descendants(process.pid)
            seen.update(now)
            commands = " ".join(c for _, c in now.values())
            ready = ("gcs_server" in commands) if when == "while Ray starts" else ("ray::convert_tensor" in commands)
            if ready and not sent:
                if when == "while Ray starts":
                    time.sleep(0.3)
                process.send_signal(signal.SIGTERM)
                sent = True
            time.sleep(0.05)
        assert sent, f"never reached the moment to send SIGTERM ({when}); seen: {sorted(c for _, c in seen.values())}"
        stdout, stderr = process.communicate(timeout=90)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 128 + signal.SIGTERM, (process.returncode, stderr[-3000:])
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert lines and lines[-1] == "cq: interrupted; no output was written.", stderr[-3000:]
    assert "Traceback" not in stderr and "*** " not in stderr and "SIGTERM" not in stderr, stderr[-3000:]
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]
    time.sleep(3)  # a process cq asked to stop may take a moment to go
    left = {pid: command for pid, (started, command) in seen.items() if alive(pid, started)}
    assert not left, f"still running after cq exited: {left}"
