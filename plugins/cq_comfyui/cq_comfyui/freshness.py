"""When ComfyUI may reuse a Quantize node's last result, and when it must run it again.

ComfyUI reuses a node's cached outputs while the node's inputs and the value of
its ``IS_CHANGED`` classmethod stay what they were at the last run (ComfyUI 0.30
``execution.py`` ``IsChangedCache``: it is asked once per queued prompt, before
anything of that prompt runs, with the widget values only). A Quantize node's
result is its output file, which depends on files the widgets only name: the
source model, the statistics file (rewritten by every capture run) and the
output itself (which the user may delete or replace).

So each run is recorded here: the inputs it read (:func:`input_stamp`: the
widget values and each file's size, modification time and inode) and the
output it left (:func:`file_stamp`). ``IS_CHANGED`` returns that run's token
while both still hold, so ComfyUI reuses the result; otherwise a token never
returned before, so ComfyUI runs the node, which then writes a new file (or
says why not). Comparing with what the last run *read*, not with what
``IS_CHANGED`` saw before it, keeps a Quantize node ordered after a sampler of
the same prompt (its statistics change while that prompt runs) from running
twice. The record lives as long as the ComfyUI process.
"""

from __future__ import annotations

import itertools
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

Stamp = tuple[Any, ...]

_tokens = itertools.count(1)
_lock = threading.Lock()


def file_stamp(path: str | os.PathLike | None) -> tuple[int, int, int] | None:
    """``(size, mtime_ns, inode)`` of a file, or None when there is none (or no path)."""
    if path is None:
        return None
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_size, st.st_mtime_ns, st.st_ino)


def input_stamp(widgets: Mapping[str, Any], files: Mapping[str, str | os.PathLike | None]) -> Stamp:
    """What a run reads: the widget values and the stamp of each named file."""
    return (
        tuple(sorted((k, repr(v)) for k, v in widgets.items())),
        tuple(sorted((k, file_stamp(p)) for k, p in files.items())),
    )


@dataclass
class Run:
    """One finished run: what it read, what it left at ``output``, and its token."""

    inputs: Stamp
    output: tuple[int, int, int] | None
    token: str
    result: Any = None


class RunRecords:
    """The last run per output file, and the tokens ``IS_CHANGED`` handed out meanwhile."""

    def __init__(self) -> None:
        self._runs: dict[str, Run] = {}
        self._pending: dict[str, str] = {}

    def current(self, output: str | os.PathLike, inputs: Stamp) -> Run | None:
        """The last run for ``output`` when its inputs are ``inputs`` and its file is still the one it left."""
        run = self._runs.get(os.fspath(output))
        if run is not None and run.inputs == inputs and run.output == file_stamp(output):
            return run
        return None

    def token(self, output: str | os.PathLike, inputs: Stamp) -> str:
        """``IS_CHANGED``'s value: the current run's token, or a new one (the node must run)."""
        key = os.fspath(output)
        with _lock:
            run = self.current(key, inputs)
            token = run.token if run is not None else f"run-{next(_tokens)}"
            # Kept for the run of this prompt: ComfyUI files its result under this value, even when
            # the node runs anyway (a new link, a dropped cache) and reads newer files.
            self._pending[key] = token
            return token

    def record(self, output: str | os.PathLike, inputs: Stamp, result: Any) -> Run:
        """A run that wrote ``output`` after reading ``inputs``; it keeps the token ``IS_CHANGED``
        handed out for its prompt (a new one when it was not asked)."""
        key = os.fspath(output)
        with _lock:
            token = self._pending.pop(key, None) or f"run-{next(_tokens)}"
            run = Run(inputs, file_stamp(key), token, result)
            self._runs[key] = run
            return run
