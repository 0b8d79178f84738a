"""``cq demo``: the main job on a built-in input, with every installed format (the Python API of
:mod:`cq_core.commands.convert`, composed for the command line)."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

from cq_core.commands.convert import convert
from cq_core.engine.report import Report
from cq_core.io.synthetic import DEMO_LAYOUT, write_synthetic_checkpoint
from cq_core.plugin.manager import Registry, resolve_registry


@dataclass
class DemoResult:
    source: Path
    source_bytes: int
    reports: list[Report]


def run_demo(directory: str | Path | None = None, *, registry: Registry | None = None) -> DemoResult:
    """Build the demo checkpoint and convert it with every installed format."""
    registry = resolve_registry(registry)
    with tempfile.TemporaryDirectory(prefix="cq-demo-") as tmp:
        folder = Path(directory) if directory else Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        source = write_synthetic_checkpoint(folder / "demo-model.safetensors", DEMO_LAYOUT, overwrite=True)
        reports = [
            convert(source, folder / f"demo-{name}.safetensors", format=name, overwrite=True, registry=registry)
            for name in sorted(registry.formats)
        ]
        return DemoResult(source, source.stat().st_size, reports)
