"""``cq migrate``: rewrite legacy checkpoints in the current ComfyUI layout, without re-quantizing.

The input is opened as a :class:`~cq_core.plugin.draft.CheckpointDraft` (header only)
and brought to the current layout by :func:`cq_core.engine.migration.migrate_draft` (the
migrations, then the checks every current-layout file passes). The draft is streamed out one
tensor at a time. A file that needs nothing is copied byte for byte, so
migrating twice gives the same file. The input may be sharded (an index or a
folder, read as one checkpoint, so a scale in another shard than its weight
is still its weight's); a lone shard is refused where a tensor's partner is
missing, rather than the tensor dropped as an orphan.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cq_core.errors import CqError, UsageError
from cq_core.io.layer_metadata import check_carriers
from cq_core.io.outputs import check_not_inputs, check_output_name, claim_outputs
from cq_core.io.source import Source
from cq_core.io.shards import INDEX_SUFFIX, open_source
from cq_core.engine.migration import comfy_loads, migrate_draft
from cq_core.plugin.draft import CheckpointDraft, Note
from cq_core.plugin.manager import Registry, resolve_registry

#: ``--producer`` naming ComfyUI itself (a file that lost its metadata), not an import migration.
COMFYUI = "comfyui"


@dataclass
class MigrationReport:
    """What ``cq migrate`` found and did."""

    input: str
    output: str | None
    check: bool
    #: (migration name, the reason it applied)
    applied: list[tuple[str, str]] = field(default_factory=list)
    notes: list[Note] = field(default_factory=list)
    layers: dict[str, str] = field(default_factory=dict)  # layer -> format
    changed: bool = False
    written: bool = False

    def of_kind(self, kind: str) -> list[Note]:
        return [n for n in self.notes if n.kind == kind]

    @property
    def refused(self) -> list[Note]:
        return self.of_kind("refused")

    #: Layers whose format stock ComfyUI cannot load, by name.
    not_loadable: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "input": self.input,
            "output": self.output,
            "check": self.check,
            "changed": self.changed,
            "written": self.written,
            "applied": [{"migration": name, "reason": reason} for name, reason in self.applied],
            "layers": self.layers,
            "not_loadable": self.not_loadable,
            "refused": [n.subject for n in self.refused],
            "notes": [n.to_json() for n in self.notes],
        }


def migrate(
    input: str | os.PathLike,
    output: str | os.PathLike | None = None,
    *,
    check: bool = False,
    overwrite: bool = False,
    producer: str | None = None,
    registry: Registry | None = None,
) -> MigrationReport:
    """Migrate ``input`` to the current layout at ``output``; with ``check``, only report.

    ``producer``: who wrote the file, for files whose tensors fit both ComfyUI's layout and
    another producer's (see :attr:`CheckpointDraft.producer`): ``"comfyui"`` or the name of a
    registered migration. Anything else is a :class:`UsageError`.

    Raises :class:`CqError` for a quantized weight without a scale and, unless
    ``check``, for layers no ComfyUI format can hold (the report names them).
    """
    registry = resolve_registry(registry)
    if producer is not None and producer != COMFYUI and producer not in registry.migrations:
        raise UsageError(
            f"--producer {producer!r} is none of: {', '.join([COMFYUI, *registry.migrations])}."
        )
    input_path = Path(input)
    if not check:
        if output is None:
            raise UsageError("cq migrate needs -o OUTPUT (or --check to only report).")
        output = Path(output)
        check_output_name(output, overwrite)
    report = MigrationReport(str(input_path), None if check else str(output), check)
    with open_source(input_path) as source:
        if not check:
            check_not_inputs([output], source.files())
        draft = CheckpointDraft(source, registry.formats)
        draft.producer = producer
        check_carriers(input_path, draft.carriers)  # unusable layer JSON: say which cq meta command repairs it
        report.applied = migrate_draft(draft, registry)
        report.notes = draft.notes
        report.layers = {layer: config["format"] for layer, config in draft.layers.items()}
        report.not_loadable = [layer for layer, fmt in report.layers.items() if not comfy_loads(registry.formats, fmt)]
        report.changed = bool(report.applied) or any(n.kind in ("change", "drop") for n in draft.notes)
        if check:
            return report
        if report.refused:
            listed = "; ".join(f"{n.subject} ({n.message})" for n in report.refused)
            raise CqError(f"{input_path}: {len(report.refused)} layers have no layout ComfyUI loads: {listed}.")
        if report.changed or source.sharded or output.name.endswith(INDEX_SUFFIX):
            draft.write(output, overwrite=overwrite)
        else:
            # Nothing to migrate: a byte copy, so a second migration is a no-op.
            _copy(source, output, overwrite)
    report.written = True
    return report


def _copy(source: Source, output: Path, overwrite: bool) -> None:
    """``source`` byte for byte at ``output``, written like every output (see :mod:`cq_core.io.outputs`)."""
    with claim_outputs([output], overwrite=overwrite, inputs=source.files()) as pending:
        with pending.open(0) as file, open(source.path, "rb") as original:
            while chunk := original.read(16 * 2**20):
                file.write(chunk)
            file.flush()
            os.fsync(file.fileno())
        pending.commit()
