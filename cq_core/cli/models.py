"""``cq models``: list model-family presets, show one's patterns, detect a checkpoint's family."""

from __future__ import annotations

import json
import shutil
import textwrap
from pathlib import Path
from typing import Annotated, Any

import typer

from cq_core.cli.base import TYPER_SETTINGS, CqCommand
from cq_core.cli.render import lines, table
from cq_core.io.shards import open_source
from cq_core.plugin.manager import get_registry
from cq_core.plugin.types import ModelFilter

#: Categories in the order a user looks for them; others follow alphabetically.
CATEGORY_ORDER = ("text", "image", "diffusion", "video")

models_app = typer.Typer(
    help="Model-family presets: which layers stay in high precision or are dropped.",
    **TYPER_SETTINGS,
)


def _echo_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2))


def preset_json(preset: ModelFilter, plugin: str) -> dict[str, Any]:
    return {
        "name": preset.name,
        "category": preset.category,
        "plugin": plugin,
        "help": preset.help,
        "exclude": list(preset.exclude),
        "high_precision": list(preset.high_precision),
        "remove": list(preset.remove),
        "quantize": list(preset.quantize),
        "keep_all": preset.keep_all,
        "derived": preset.derive_help or None,
        "embeddings": preset.embeddings,
    }


def _category_key(category: str) -> tuple[int, str]:
    return (CATEGORY_ORDER.index(category) if category in CATEGORY_ORDER else len(CATEGORY_ORDER), category)


@models_app.callback(invoke_without_command=True)
def models(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", help="Print as JSON.")] = False,
) -> None:
    """List presets by category with their help; 'cq models show NAME' prints one's patterns."""
    if ctx.invoked_subcommand is not None:
        return
    registry = get_registry()
    rows = [
        preset_json(p, registry.owners[("model filter", name)])
        for name, p in sorted(registry.model_filters.items(), key=lambda kv: (_category_key(kv[1].category), kv[0]))
    ]
    if as_json:
        _echo_json(rows)
        return
    if not rows:
        typer.echo("no presets installed (pip install cq-models, or a third-party preset package)")
        return
    width = shutil.get_terminal_size().columns  # COLUMNS, else the terminal's, else 80
    for category in sorted({r["category"] for r in rows}, key=_category_key):
        typer.echo(f"{category}:")
        shown = [(r["name"], r["plugin"], r["help"]) for r in rows if r["category"] == category]
        lines = table(("preset", "plugin", "help"), shown, width=width - 2).splitlines()
        typer.echo("\n".join("  " + line for line in lines))
        typer.echo("")
    typer.echo(textwrap.fill("'cq convert' detects the preset from the checkpoint's tensor names; --model NAME or "
                             "--model none overrides it.", width))


@models_app.command(cls=CqCommand)
def show(
    name: Annotated[str, typer.Argument(help="A preset name from 'cq models'.", show_default=False)],
    as_json: Annotated[bool, typer.Option("--json", help="Print as JSON.")] = False,
) -> None:
    """Print a preset's patterns: substrings of tensor names it keeps or removes."""
    registry = get_registry()
    data = preset_json(registry.model_filter(name), registry.owners[("model filter", name)])
    if as_json:
        _echo_json(data)
        return
    typer.echo(f"{data['name']} ({data['category']}, from {data['plugin']}): {data['help']}")
    if data["keep_all"]:
        typer.echo("keeps every tensor of its component as it is (never quantized, never removed)")
    sections = (
        ("exclude (kept in source dtype)", data["exclude"]),
        ("high precision (kept in source dtype)", data["high_precision"]),
        ("remove (dropped from the output)", data["remove"]),
        ("quantize (Linear layers despite an 'embed'/'norm' name)", data["quantize"]),
    )
    for title, patterns in sections:
        typer.echo(f"{title}:")
        typer.echo(lines(*(f"  {p}" for p in patterns)) if patterns else "  -")
    if data["derived"]:
        typer.echo(f"derived from the checkpoint (kept in source dtype): {data['derived']}")
    if data["embeddings"]:
        typer.echo(f"token-embedding tables: {data['embeddings']} (unless --embeddings says otherwise)")


@models_app.command(cls=CqCommand)
def detect(
    file: Annotated[Path, typer.Argument(help="A checkpoint: a .safetensors file, a .safetensors.index.json or a folder of shards.", show_default=False)],
    as_json: Annotated[bool, typer.Option("--json", help="Print as JSON.")] = False,
) -> None:
    """Say which components FILE holds and the preset 'cq convert' would apply to each (reads the header only)."""
    with open_source(file) as source:
        components = get_registry().detect_components(list(source.tensors), dict(source.metadata))
    if as_json:
        _echo_json([{"prefix": c.prefix, "preset": c.preset, "reason": c.reason} for c in components])
    elif not components:
        typer.echo("no preset detected")
    else:
        for c in components:
            typer.echo(lines(f"{c.preset}: {c.reason}" + (f" [component {c.prefix!r}]" if c.prefix else "")))
