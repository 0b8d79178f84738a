"""The ``cq`` console script: Ctrl-C while the modules load (torch takes a second or two) ends
quietly, like Ctrl-C during a command, instead of printing a traceback."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> None:
    try:
        from cq_core.cli.app import main as run
    except KeyboardInterrupt:
        sys.stderr.write("cq: interrupted; no output was written.\n")
        sys.exit(130)
    run(argv)
