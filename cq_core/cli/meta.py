"""``cq migrate`` and ``cq meta``: repair legacy layouts and edit layer metadata without re-quantizing."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from cq_core.cli.base import TYPER_SETTINGS, CqCommand
from cq_core.cli.render import count, lines, table
from cq_core.commands import meta
from cq_core.commands.migrate import MigrationReport
from cq_core.commands.migrate import migrate as run_migrate
from cq_core.plugin.manager import get_registry

meta_app = typer.Typer(
    help="Show and edit per-layer quantization metadata (both carriers kept in sync).",
    **TYPER_SETTINGS,
)

Output = Annotated[
    Path,
    typer.Option("-o", "--output", help="Where to write the edited checkpoint (NAME.safetensors.index.json: shards "
                 "mirroring the input's)."),
]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace an existing output file.")]
LayerRegex = Annotated[
    Optional[str], typer.Option("--layer", help="Only layers whose name matches this regex (default: all).")
]
AsJson = Annotated[bool, typer.Option("--json", help="Print as JSON.")]
InputFile = Annotated[Path, typer.Argument(help="A checkpoint: a .safetensors file, a .safetensors.index.json or a folder of shards.", show_default=False)]


def _echo_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2, default=str))


def _compact(config: Any) -> str:
    return "-" if config is None else json.dumps(config, separators=(",", ":"))


def _render_notes(notes: list[meta.Note]) -> str:
    return table(("what", "tensor or layer", "detail"), [(n.kind, n.subject, n.message) for n in notes])


def migrate(
    input: InputFile,
    output: Annotated[
        Optional[Path],
        typer.Option("-o", "--output", help="Where to write the migrated checkpoint (NAME.safetensors.index.json: "
                     "shards mirroring the input's)."),
    ] = None,
    check: Annotated[
        bool, typer.Option("--check", help="Only report what would change; exit 1 if the file needs migrating.")
    ] = False,
    overwrite: Overwrite = False,
    producer: Annotated[
        Optional[str],
        typer.Option("--producer", help="Who wrote the file, where its tensors alone cannot tell: 'comfyui' or the "
                     "name of an import migration (e.g. modelopt_nvfp4; 'cq plugins' lists migrations)."),
    ] = None,
    as_json: AsJson = False,
) -> None:
    """Rewrite a legacy checkpoint (scaled fp8, scaled INT8, nested params, layers without metadata)
    or another producer's quantized layout (ModelOpt, compressed-tensors, fireworks-prequant, Hugging
    Face FP8) in the current ComfyUI layout."""
    report = run_migrate(input, output, check=check, overwrite=overwrite, producer=producer, registry=get_registry())
    if as_json:
        _echo_json(report.to_json())
    else:
        typer.echo(_render_migration(report))  # its lines are escaped as they are made
    if check and (report.changed or report.refused):
        raise SystemExit(1)  # like a linter's --check; typer.Exit would be swallowed by cq's main()


def _render_migration(report: MigrationReport) -> str:
    out = []
    if report.applied:
        out.append(lines(
            f"{report.input}: " + "; ".join(f"{name} layout ({reason})" for name, reason in report.applied)
        ))
    if report.notes:
        out.append(_render_notes(report.notes))
    formats: dict[str, int] = {}
    for fmt in report.layers.values():
        formats[fmt] = formats.get(fmt, 0) + 1
    summary = ", ".join(f"{fmt}: {n}" for fmt, n in sorted(formats.items())) or "none"
    text = [f"quantized layers: {len(report.layers)} ({summary})"]
    if report.not_loadable:
        text.append(f"not loadable by stock ComfyUI: {', '.join(report.not_loadable)}")
    if report.refused:
        text.append(f"cannot be migrated: {', '.join(n.subject for n in report.refused)}")
    if not report.changed:
        text.append("already in the current layout" + (f"; copied unchanged to {report.output}" if report.written else ""))
    elif report.check:
        text.append("needs migrating (--check: nothing written)")
    else:
        text.append(f"wrote {report.output}")
    return "\n".join([*out, lines(*text)])


@meta_app.command("show", cls=CqCommand)
def show(file: InputFile, as_json: AsJson = False) -> None:
    """Each layer's JSON from the per-layer tensor and from the header, side by side."""
    info = meta.show(file)
    if as_json:
        _echo_json(info)
        return
    if not info["layers"]:
        typer.echo(lines(f"{info['file']}: no layer metadata (not a quantized checkpoint in the current layout)"))
        return
    rows = [
        (layer, _compact(row["tensor"]), _compact(row["header"]), "" if row["status"] == "agree" else row["status"].upper())
        for layer, row in info["layers"].items()
    ]
    typer.echo(table(("layer", "comfy_quant tensor", "header", "flag"), rows))
    header = "present" if info["header"] else "MISSING"
    verdict = "carriers agree" if not info["disagreeing"] else f"{len(info['disagreeing'])} layers DISAGREE"
    typer.echo(lines(f"{len(info['layers'])} layers; header {header}; {verdict}"))


def _report_edit(result: meta.EditResult, as_json: bool) -> None:
    if as_json:
        _echo_json(result.to_json())
        return
    if result.notes:
        typer.echo(_render_notes(result.notes))
    typer.echo(lines(f"wrote {result.output}: {count(len(result.layers), 'layer')} changed"))


@meta_app.command("set", cls=CqCommand)
def set_(
    file: InputFile,
    assignments: Annotated[list[str], typer.Argument(help="KEY=VALUE (true/false, integers, floats, strings).")],
    output: Output,
    layer: LayerRegex = None,
    overwrite: Overwrite = False,
    as_json: AsJson = False,
) -> None:
    """Set keys in the selected layers' JSON, e.g. full_precision_matrix_mult=true."""
    formats = get_registry().formats
    values = meta.parse_assignments(assignments, known_formats=formats)
    result = meta.set_keys(file, output, values, layer_regex=layer, formats=formats, overwrite=overwrite)
    _report_edit(result, as_json)


@meta_app.command("unset", cls=CqCommand)
def unset(
    file: InputFile,
    keys: Annotated[list[str], typer.Argument(help="Keys to remove.")],
    output: Output,
    layer: LayerRegex = None,
    overwrite: Overwrite = False,
    as_json: AsJson = False,
) -> None:
    """Remove keys from the selected layers' JSON."""
    _report_edit(meta.unset_keys(file, output, keys, layer_regex=layer, overwrite=overwrite), as_json)


@meta_app.command("sync", cls=CqCommand)
def sync(
    file: InputFile,
    output: Output,
    source: Annotated[
        str, typer.Option("--from", help="'tensors': rebuild the header from them; 'header': the reverse.")
    ] = "tensors",
    overwrite: Overwrite = False,
    as_json: AsJson = False,
) -> None:
    """Make both metadata carriers identical, rebuilding one from the other."""
    _report_edit(meta.sync(file, output, source=source, overwrite=overwrite), as_json)
