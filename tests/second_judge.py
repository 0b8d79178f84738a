"""``pytest --also-comfyui VERSION``: every test ComfyUI judges, run again with another ComfyUI release.

Two ComfyUI trees cannot share one process (both are the ``comfy`` package, tests/comfyui.py),
so the second judge gets its own pytest process, started when this session starts and run
beside it (the machines have two cores; the main session is mostly one): the same arguments,
plus ``--comfyui VERSION -m comfyui`` (only the tests that use the ``comfyui`` fixture, marked
by tests/conftest.py). Its output goes to a file; the end of this session waits for it, shows
its summary (and its failures, when it has some) and fails this session when it failed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

#: pytest's exit status when it collected nothing (a selection without tests ComfyUI judges).
NO_TESTS_COLLECTED = 5


@dataclass
class SecondJudge:
    """The child pytest process of one ComfyUI release, and where its output goes."""

    version: str
    process: subprocess.Popen | None = None
    folder: Path | None = None
    returncode: int | None = None
    started: list[str] = field(default_factory=list)
    output: list[str] = field(default_factory=list)

    @property
    def log(self) -> Path:
        return self.folder / "pytest.log"

    def start(self, args: list[str], rootdir: Path) -> None:
        """Start ``python -m pytest ARGS --comfyui VERSION -m comfyui`` in ``rootdir``."""
        self.folder = Path(tempfile.mkdtemp(prefix=f"cq-comfyui-{self.version}-"))
        self.started = [sys.executable, "-m", "pytest", *args, "--comfyui", self.version, "-m", "comfyui",
                        "-p", "no:cacheprovider", "--basetemp", str(self.folder / "tmp")]
        env = dict(os.environ)
        env.pop("PYTEST_ADDOPTS", None)
        # One intra-op thread: this session runs beside it on the same (two) cores, and the tiny models
        # gain nothing from more; two processes of two threads each only contend.
        env.setdefault("OMP_NUM_THREADS", "1")
        with open(self.log, "wb") as out:
            self.process = subprocess.Popen(self.started, cwd=rootdir, stdout=out, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, env=env)

    def wait(self, interrupted: bool) -> int:
        """The child's exit status (it is stopped first when this session was interrupted)."""
        if self.process is None:
            return 0
        if interrupted and self.process.poll() is None:
            self.process.terminate()
        self.returncode = self.process.wait()
        self.output = self.log.read_text(errors="replace").splitlines()
        if not self.failed:  # a failed run keeps its log and temporary files to look at
            shutil.rmtree(self.folder, ignore_errors=True)
        return self.returncode

    @property
    def failed(self) -> bool:
        return self.returncode not in (0, NO_TESTS_COLLECTED, None)

    def summary(self) -> list[str]:
        """Lines for this session's terminal summary: the child's result, its failures when it failed."""
        text = [line for line in self.output if line.strip()]
        if not self.failed:
            return [f"ComfyUI {self.version} (second judge, its own process): " + (text[-1] if text else "no output")]
        head = f"ComfyUI {self.version} (second judge, its own process) failed; its log: {self.log}"
        start = next((i for i, line in enumerate(text) if line.startswith("=") and "FAILURES" in line), None)
        shown = text[start:] if start is not None else text[-60:]
        return [head, *shown[-400:]]


def child_args(invocation: tuple[str, ...]) -> list[str]:
    """This session's command-line arguments less ``--also-comfyui`` (and its value) and ``-m``."""
    out: list[str] = []
    skip = False
    for arg in invocation:
        if skip:
            skip = False
            continue
        if arg in ("--also-comfyui", "-m", "--comfyui"):
            skip = True
            continue
        if arg.startswith(("--also-comfyui=", "--comfyui=")) or (arg.startswith("-m") and len(arg) > 2):
            continue
        out.append(arg)
    return out
