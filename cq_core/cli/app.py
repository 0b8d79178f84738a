"""The ``cq`` command line: parses options and calls the same API a Python user calls."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import sys
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from tqdm import tqdm

from cq_core.cli.base import TYPER_SETTINGS, ClickException, CqCommand, click_error_line
from cq_core.cli.render import (
    budget_lines,
    count,
    db,
    human_bytes,
    lines,
    preset_lines,
    quantized_phrase,
    render_plan,
    render_report,
    render_summary,
    table,
)
from cq_core.commands.calibrate import calibrate as run_calibrate
from cq_core.commands.comfyui_calibrate import SamplingPlan, calibrate_with_comfyui, parse_latent_size
from cq_core.commands.convert import convert as run_convert
from cq_core.cli.demo import run_demo
from cq_core.commands.inspect import inspect_checkpoint
from cq_core.commands.verify import DEFAULT_MIN_SQNR_DB
from cq_core.commands.verify import verify as run_verify
from cq_core.cli.fields import ConvertCommand, executor_flags, keywords_from, with_field_options
from cq_core.engine.recipe import Recipe, recipe_from
from cq_core.engine.run import RunSettings
from cq_core.numerics.second_moment import BOUNDED_RANK
from cq_core.errors import CqError, UsageError, without_python_advice
from cq_core.io.memory import return_large_buffers_to_the_system
from cq_core.io.outputs import check_output_name
from cq_core.plugin.manager import DISABLE_ENV, get_registry, report_broken_plugins, unknown_disabled_plugins
from cq_core.plugin.comfyui_versions import first_comfyui_version

app = typer.Typer(
    name="cq",
    help="Convert .safetensors weights into quantized checkpoints that ComfyUI loads natively.",
    **TYPER_SETTINGS,
)


def _print_version(value: bool) -> None:
    if not value:
        return
    from importlib import metadata

    try:
        core = metadata.version("cq-core")
    except metadata.PackageNotFoundError:
        core = "unknown"
    dists = sorted({(r["distribution"], r["version"], bool(r.get("error"))) for r in get_registry().describe_plugins()
                    if r["distribution"] and r["distribution"] != "cq-core"})
    plugins = ", ".join(f"{name} {version or 'unknown'}" + (" (not loaded)" if broken else "")
                        for name, version, broken in dists) or "none"
    say(f"cq {core} (cq-core {core}; plugin distributions: {plugins})")
    raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_print_version, is_eager=True,
                           help="Print cq's version and its plugins' distributions and versions, then exit.")
    ] = False,
) -> None:
    """Convert .safetensors weights into quantized checkpoints that ComfyUI loads natively."""


def _echo_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2, default=str))


def say(text: object, *, err: bool = False) -> None:
    """Print ``text`` as one line: what it shows from a file or a flag is escaped and cut
    (:func:`cq_core.cli.render.lines`), so a forged name cannot add lines of its own."""
    typer.echo(lines(text), err=err)


@app.command(cls=ConvertCommand)
@with_field_options(Recipe, RunSettings)
def convert(
    ctx: typer.Context,
    input: Annotated[
        Path,
        typer.Argument(help="The checkpoint to quantize: a .safetensors file, a .safetensors.index.json or a "
                       "folder of shards.", show_default=False),
    ],
    output: Annotated[
        Optional[str],  # as typed: a trailing '/' (a folder) must reach convert, which refuses it
        typer.Option("-o", "--output", help="Output file. Default: INPUT-FORMAT.safetensors next to the input."),
    ] = None,
    recipe_file: Annotated[
        Optional[Path],
        typer.Option("--recipe", help="A recipe file (TOML, or JSON): format, options, optimizer, preset, rules "
                     "in one place; flags given beside it override its fields.", show_default=False),
    ] = None,
    recipe_from_file: Annotated[
        Optional[Path],
        typer.Option("--recipe-from", help="Repeat the recipe recorded in a checkpoint cq made (e.g. the "
                     "quantized old version of this model); flags given beside it override its fields.",
                     show_default=False),
    ] = None,
    calibration: Annotated[
        Optional[Path],
        typer.Option("--calibration", help="Per-layer input statistics from 'cq calibrate': for --optimizer gptq/learned, "
                     "--input-scale calibrated, --awq, and a size budget's error measure."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the plan or report as JSON.")] = False,
    all_tensors: Annotated[
        bool, typer.Option("--all", help="List every tensor in the report, not just quantized layers.")
    ] = False,
    verify_output: Annotated[
        bool, typer.Option("--verify", help="Afterwards, decode the output and check it like 'cq verify'.")
    ] = False,
    **fields: Any,
) -> None:
    """Quantize INPUT into a checkpoint ComfyUI loads, streaming one tensor at a time."""
    recipe_options = keywords_from(Recipe, fields)
    run_options = keywords_from(RunSettings, fields)
    run_options["executor_options"] = {**run_options.get("executor_options", {}),
                                       **executor_flags(ctx, run_options.get("executor"))}
    run = RunSettings(**run_options)
    if run.dry_run and verify_output:
        raise UsageError("--dry-run writes no output for --verify to check; pass one of them.")
    if recipe_file is not None and recipe_from_file is not None:
        raise UsageError("--recipe and --recipe-from both name a recipe; pass one of them.")
    registry = get_registry()
    base = Recipe.load(recipe_file) if recipe_file is not None else None
    if recipe_from_file is not None:
        base = recipe_from(recipe_from_file)
    if base is not None:  # the file's own mistakes, named by the file, before any flag applies
        source = f"--recipe {recipe_file}" if recipe_file is not None else f"--recipe-from {recipe_from_file}"
        try:
            base.validate(registry)
        except UsageError as exc:
            raise UsageError(f"{source}: {exc}") from None
    recipe = (base or Recipe()).with_options(**recipe_options)
    run = replace(run, progress=not run.quiet and not as_json and sys.stderr.isatty())
    report = run_convert(input, output, recipe=recipe, run=run, calibration=calibration, registry=registry)
    if as_json:
        _echo_json(report.to_json())
    elif run.dry_run:
        if not run.quiet:
            typer.echo(render_plan(report))
        say(
            f"{quantized_phrase(report, 'would be quantized')}; "
            f"output about {human_bytes(report.output_bytes)} (input {human_bytes(report.input_bytes)}); "
            f"preset: {report.preset or 'none'} ({report.preset_reason}); would write {report.would_write}"
        )
        if not run.quiet:  # -q: the one summary line
            for line in preset_lines(report)[1:]:
                say(line)
            for line in budget_lines(report):
                say(line)
            if report.layout:
                say(f"layout: {report.layout}")
    elif run.quiet:
        typer.echo(render_summary(report))
    else:
        typer.echo(render_report(report, all_tensors=all_tensors))
    if output is not None and report.output and Path(report.output) != Path(output):
        say(f"note: the output is sharded, so -o {output} was written as {report.output} and its "
            "shards beside it.", err=True)
    for warning in report.warnings:
        say(f"warning: {warning}", err=True)
    if verify_output and not run.dry_run:
        _run_verify(input, Path(report.output), DEFAULT_MIN_SQNR_DB, as_json=False, quiet=run.quiet)


def _run_verify(
    source: Path, quantized: Path, min_sqnr: float, *, as_json: bool, quiet: bool = False,
    calibration: Path | None = None,
) -> None:
    result = run_verify(source, quantized, min_sqnr_db=min_sqnr, calibration=calibration)
    outputs = any(c.output_sqnr_db is not None for c in result.layers)
    if as_json:
        _echo_json(result.to_json())
    else:
        if not quiet:
            typer.echo(
                table(
                    ("layer", "format", "SQNR dB", *(("output dB", "GPU path dB") if outputs else ()), "status"),
                    [
                        (c.layer, c.format or "?", db(c.sqnr_db),
                         *((db(c.output_sqnr_db), db(c.compute_sqnr_db)) if outputs else ()),
                         "; ".join(c.problems) if c.problems else (f"LOW (< {min_sqnr:g} dB)" if c.low else "ok"))
                        for c in result.layers
                    ],
                    "llrrrl" if outputs else "llrl",
                )
            )
        typer.echo(
            f"verify: {len(result.layers)} layers, {len(result.failed)} failed, "
            f"{len(result.low)} below {min_sqnr:g} dB"
        )
    if not result.ok:
        raise CqError(
            f"{quantized}: {len(result.failed)} quantized layers failed verification, "
            f"first {result.failed[0].layer!r} ({result.failed[0].problems[0]})."
        )


@app.command(cls=CqCommand)
def verify(
    source: Annotated[
        Path, typer.Argument(help="The original high-precision checkpoint (file, index or folder).", show_default=False)
    ],
    quantized: Annotated[
        Path, typer.Argument(help="The quantized checkpoint to check (file, index or folder).", show_default=False)
    ],
    min_sqnr: Annotated[
        float, typer.Option("--min-sqnr", help="List layers whose weight SQNR is below this many dB as LOW "
                            "(a warning: the exit status stays 0; failures are what makes it non-zero).")
    ] = DEFAULT_MIN_SQNR_DB,
    as_json: Annotated[bool, typer.Option("--json", help="Print as JSON.")] = False,
    calibration: Annotated[
        Optional[Path],
        typer.Option("--calibration", help="Statistics from 'cq calibrate': also report each layer's output SQNR "
                     "on its input sample, weight-only and with activations quantized as on a GPU."),
    ] = None,
) -> None:
    """Decode every quantized layer of QUANTIZED and compare it with SOURCE.

    Exits non-zero when a layer decodes to NaN/Inf, its tensors are not what
    ComfyUI's loader takes for its format, it stores quantized tensors without
    metadata, or its two metadata carriers disagree.
    """
    _run_verify(source, quantized, min_sqnr, as_json=as_json, calibration=calibration)


@app.command(cls=CqCommand)
def plugins(as_json: Annotated[bool, typer.Option("--json", help="Print as JSON.")] = False) -> None:
    """List discovered plugins: distribution, version and what each registers."""
    rows = get_registry().describe_plugins()
    if as_json:
        _echo_json(rows)
        return
    typer.echo(
        table(
            ("plugin", "distribution", "version", "registers"),
            [
                (
                    r["name"],
                    r["distribution"] or "-",
                    r["version"] or "-",
                    f"NOT LOADED: {r['error']}" if r.get("error") else
                    "; ".join(f"{kind}: {', '.join(names)}" for kind, names in r["registers"].items()) or "-",
                )
                for r in rows
            ],
            width=shutil.get_terminal_size().columns,  # COLUMNS, else the terminal's, else 80
        )
    )


@app.command(cls=CqCommand)
def formats(as_json: Annotated[bool, typer.Option("--json", help="Print as JSON.")] = False) -> None:
    """List quantization formats and the first ComfyUI release that loads each."""
    registry = get_registry()
    rows = [
        {
            "name": name,
            "comfy_loadable": cls.comfy_loadable,
            "comfyui_since": first_comfyui_version(cls),
            "comfyui_lora": cls.comfyui_lora,
            "plugin": registry.owners[("format", name)],
            "description": cls.description,
            "options": [
                {"name": o.name, "type": o.type.__name__, "default": o.default, "help": o.help,
                 "choices": list(o.choices) if o.choices else None}
                for o in cls.options
            ],
        }
        for name, cls in sorted(registry.formats.items())
    ]
    if as_json:
        _echo_json(rows)
        return
    typer.echo(
        table(
            ("format", "ComfyUI loads it", "plugin", "description"),
            [(r["name"], f"{r['comfyui_since']} and later" if r["comfyui_since"] else "no release", r["plugin"],
              r["description"]) for r in rows],
        )
    )
    typer.echo("ComfyUI loads it: the first release whose comfy/quant_ops.py QUANT_ALGOS has the format "
               "(any other name fails to load).")
    typer.echo("LoRAs (ComfyUI 0.30.0 and 0.33.0, docs/comfyui_matrix.md): where the model fits in memory ComfyUI "
               "merges a LoRA and re-quantizes each patched layer in its own format, scales recalculated and "
               "values rounded stochastically (an optimizer's rounding is lost there, the error about doubles); "
               "an offloaded layer keeps its bytes and adds the LoRA in high precision at each step.")
    for r in rows:
        if r["comfyui_lora"]:
            typer.echo(f"  LoRA, {r['name']}: {r['comfyui_lora']}")
    for r in rows:
        for o in r["options"]:
            say(f"  -O {o['name']}=...  ({r['name']}, {o['type']}, default {o['default']}): {o['help']}")


@app.command(cls=CqCommand)
def executors() -> None:
    """List executors (where 'cq convert --executor NAME' runs the per-tensor work) and their options."""
    registry = get_registry()
    rows = sorted(registry.executors.items())
    typer.echo(table(("executor", "plugin", "description"),
                     [(n, registry.owners[("executor", n)], c.description) for n, c in rows]))
    for n, c in rows:
        for o in c.options:
            say(f"  --executor-option {o.name}=...  ({n}, {o.type.__name__}, default {o.default}): {o.help}")


@app.command(cls=CqCommand)
def optimizers() -> None:
    """List rounding optimizers."""
    registry = get_registry()
    typer.echo(
        table(
            ("optimizer", "plugin", "description"),
            [(n, registry.owners[("optimizer", n)], c.description) for n, c in sorted(registry.optimizers.items())],
        )
    )


@app.command(cls=CqCommand)
def calibrate(
    output: Annotated[Path, typer.Option("-o", "--output", help="The statistics file to write (.safetensors).")],
    checkpoint: Annotated[
        Optional[Path],
        typer.Argument(help="With --comfyui: the diffusion-model file to load with ComfyUI.", show_default=False),
    ] = None,
    model: Annotated[
        Optional[str],
        typer.Option("--model", help="MODULE:NAME or FILE.py:NAME: a torch.nn.Module or a function returning one."),
    ] = None,
    data: Annotated[
        Optional[str],
        typer.Option("--data", help="MODULE:NAME or FILE.py:NAME: an iterable of batches or a function returning one."),
    ] = None,
    random_tokens: Annotated[
        Optional[str],
        typer.Option(
            "--random-tokens",
            help="Data-free instead of --data: batches of random token ids, VOCAB_SIZE or LOW:HIGH (skip unused and "
            "special ids with LOW), passed as model(input_ids=..., attention_mask=...).",
        ),
    ] = None,
    first_token: Annotated[
        Optional[int], typer.Option("--first-token", help="With --random-tokens: start each sequence with this id.")
    ] = None,
    last_token: Annotated[
        Optional[int], typer.Option("--last-token", help="With --random-tokens: end each sequence with this id.")
    ] = None,
    sequences: Annotated[
        int, typer.Option("--sequences", help="With --random-tokens: how many sequences (8 to 40 tokens each).")
    ] = 80,
    layers: Annotated[
        Optional[str], typer.Option("--layers", help="Only Linear layers whose qualified name matches this regex.")
    ] = None,
    prefix: Annotated[
        str, typer.Option("--prefix", help="Prepend this to every layer name (the checkpoint's key prefix).")
    ] = "",
    rank: Annotated[
        Optional[int],
        typer.Option("--rank", help="Bound memory: keep each layer's H as a rank-R sketch plus its exact diagonal "
                     "(R x K floats instead of K x K). Default: exact H, or 512 (held in bfloat16) with --comfyui; "
                     "0: exact."),
    ] = None,
    comfyui: Annotated[
        Optional[Path],
        typer.Option("--comfyui", help="A ComfyUI folder: load CHECKPOINT with its classes and sample it with its "
                     "sampler from random latents and random (or --conditioning) conditioning."),
    ] = None,
    runs: Annotated[int, typer.Option("--runs", help="With --comfyui: sampling runs (each its own seed and conditioning).")] = 8,
    steps: Annotated[int, typer.Option("--steps", help="With --comfyui: sampler steps per run.")] = 8,
    cfg: Annotated[float, typer.Option("--cfg", help="With --comfyui: CFG scale (above 1: both branches run).")] = 3.5,
    sampler: Annotated[str, typer.Option("--sampler", help="With --comfyui: ComfyUI's sampler name.")] = "euler",
    scheduler: Annotated[str, typer.Option("--scheduler", help="With --comfyui: ComfyUI's scheduler name.")] = "simple",
    latent_size: Annotated[
        str, typer.Option("--latent-size", help="With --comfyui: latent HEIGHTxWIDTH (an image's size / 8 for FLUX).")
    ] = "32x32",
    conditioning: Annotated[
        Optional[Path],
        typer.Option("--conditioning", help="With --comfyui: a safetensors file with 'context' (B, T, D) and "
                     "optionally 'pooled_output', instead of random conditioning."),
    ] = None,
    device: Annotated[
        str, typer.Option("--device", help="With --comfyui: where ComfyUI runs the model: auto (CUDA when this "
                          "torch has it, else the CPU), cpu, cuda or cuda:N.")
    ] = "auto",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing output file.")] = False,
    quiet: Annotated[bool, typer.Option("-q", "--quiet", help="No progress bar: only the summary line (and errors).")] = False,
) -> None:
    """Run batches through a torch model and save each Linear layer's input statistics (H = E(x xᵀ), absmax).

    Or, with --comfyui, load CHECKPOINT with a ComfyUI install's classes and sample it with its sampler:
    cq calibrate flux1-dev.safetensors --comfyui ~/ComfyUI -o flux-stats.safetensors.

    The batches are yours (--data) or, with no data at hand, random token ids (--random-tokens) for models
    that read tokens: e.g. --random-tokens 999:30522 --first-token 101 --last-token 102 for a BERT.

    This imports the modules or files that --model and --data name and runs their code, with your
    permissions: pass only code you trust.
    """
    check_output_name(output, overwrite)
    if rank is not None and rank < 0:
        raise UsageError(f"--rank must be 0 (exact H) or positive, not {rank}.")
    show = not quiet and sys.stderr.isatty()
    if comfyui is not None:
        if checkpoint is None or model is not None or data is not None or random_tokens is not None:
            raise UsageError("--comfyui takes a CHECKPOINT argument, and no --model, --data or --random-tokens.")
        plan = SamplingPlan(runs=runs, steps=steps, cfg=cfg, sampler=sampler, scheduler=scheduler,
                            latent_size=parse_latent_size(latent_size))
        with tqdm(total=runs, desc="cq calibrate", unit="run", disable=not show, leave=False) as bar:
            stats = calibrate_with_comfyui(
                checkpoint, comfyui, output, plan=plan, rank=BOUNDED_RANK if rank is None else rank or None,
                conditioning=conditioning, layers=layers, prefix=prefix, device=device, progress=_advance(bar),
            )
    else:
        if checkpoint is not None or model is None:
            raise UsageError("Pass --model MODULE:NAME (and --data or --random-tokens), or CHECKPOINT with --comfyui.")
        if device != "auto":
            raise UsageError("--device chooses where --comfyui runs the model; --model runs where your code puts it.")
        with tqdm(desc="cq calibrate", unit=" batches", disable=not show, leave=False) as bar:
            stats = run_calibrate(
                model, data, output, layers=layers, prefix=prefix, random_tokens=random_tokens,
                first_token=first_token, last_token=last_token, sequences=sequences, rank=rank or None,
                progress=_advance(bar),
            )
    say(f"wrote statistics of {count(len(stats), 'Linear layer')} to {output}")


def _advance(bar: tqdm):
    """A ``progress(number, total)`` callback that moves ``bar`` one step, its total once known."""

    def step(_number: int, total: int | None) -> None:
        if total is not None and bar.total != total:
            bar.total = total
        bar.update(1)

    return step


@app.command(cls=CqCommand)
def inspect(
    file: Annotated[Path, typer.Argument(help="A checkpoint: a .safetensors file, a .safetensors.index.json or a folder of shards.", show_default=False)],
    as_json: Annotated[bool, typer.Option("--json", help="Print as JSON.")] = False,
    recipe_only: Annotated[
        bool, typer.Option("--recipe", help="Print only the recipe that made the file, as a TOML file "
                           "'cq convert --recipe' reads.")
    ] = False,
) -> None:
    """Show what a checkpoint holds: tensors, dtypes, quantized layers, metadata carriers, the recipe."""
    info = inspect_checkpoint(file)
    if recipe_only:
        typer.echo(recipe_toml(file, info["recipe"]), nl=False)
        return
    if as_json:
        _echo_json(info)
        return
    say(f"{info['file']}: {info['tensors']} tensors, {info['params'] / 1e6:.1f} M params, "
        f"{human_bytes(info['file_bytes'])}")
    typer.echo(table(("dtype", "tensors", "size"),
                     [(k, v["tensors"], human_bytes(v["bytes"])) for k, v in info["dtypes"].items()], "lrr"))
    legacy = "; ".join(f"{name} ({reason})" for name, reason in info["legacy_layouts"].items())
    if info["calibration"] is not None:
        say(f"calibration statistics of {count(info['calibration']['layers'], 'Linear layer')} (written by "
            "'cq calibrate'; pass it to 'cq convert' or 'cq verify' with --calibration): not a checkpoint")
    elif info["quantized_layers"]:
        kinds = [*(f"{k}: {v}" for k, v in info["formats"].items()),
                 *(f"{k}: {v}" for k, v in info["foreign_formats"].items())]
        say(f"quantized layers: {info['quantized_layers']} ({', '.join(kinds)})")
        if info["foreign_layers"]:
            say(f"in other producers' layouts: {info['foreign_layers']} layers; 'cq migrate' imports them "
                "into ComfyUI's")
        for layer, found in list(info["foreign"].items())[:20]:
            if found["message"]:
                say(f"  {layer}: {found['message']}")
        c = info["carriers"]
        verdict = "agree" if c["agree"] else f"DISAGREE on {len(c['disagreeing_layers'])} layers"
        if c["layers_without_weight"]:
            named = len(set(c["layers_without_weight"]))
            total = c["header_layers"] if c["header"] else c["layer_tensors"]
            carrier = "header" if c["header"] else "metadata"
            example = c["layers_without_weight"][0]
            which = (f"none of the {carrier}'s {total} layer names (e.g. {example!r}) is a weight in this file"
                     if named == total else
                     f"{named} of the {carrier}'s {total} layer names (e.g. {example!r}) name no weight in this file")
            verdict = (f"{which}, so ComfyUI applies that metadata to nothing and loads those weights' stored codes "
                       "unscaled (a key prefix that does not match?)")
            if c["disagreeing_layers"]:
                verdict += f"; the carriers DISAGREE on {len(c['disagreeing_layers'])} layers"
        say(f"metadata: header {'yes' if c['header'] else 'no'} ({c['header_layers']} layers), "
            f"per-layer tensors {c['layer_tensors']}; {verdict}")
        for layer in c["disagreeing_layers"][:20]:
            say(f"  disagrees: {layer}")
    elif legacy:
        say(f"quantized layers: in a legacy layout, none in the current one: {legacy}; 'cq migrate "
            f"{shlex.quote(str(file))} -o NEW.safetensors' rewrites it in the layout ComfyUI loads")
    else:
        say("quantized layers: none")
    if info["unscaled_float8"]:
        say(f"plain FP8 weights (no scale, no layer metadata): {len(info['unscaled_float8'])} layers; ComfyUI casts "
            "their stored values to the compute dtype (scale 1), and 'cq convert' decodes them so")
        for layer, dtype in list(info["unscaled_float8"].items())[:20]:
            say(f"  {layer}: {dtype}")
    if info["contract_problems"]:
        say(f"not as ComfyUI's loader takes them: {len(info['contract_problems'])} layers")
    for layer, sentences in list(info["contract_problems"].items())[:20]:
        for sentence in sentences:
            say(f"  {layer}: {sentence}")
    if info["unlabelled_layers"]:
        say(f"quantized layers without metadata: {info['unlabelled_layers']} "
            f"({', '.join(f'{k}: {v}' for k, v in info['unlabelled_formats'].items())}); ComfyUI uses "
            "their codes as plain weights, 'cq migrate' writes the metadata")
        for layer, found in list(info["unlabelled"].items())[:20]:
            say(f"  {layer}: {found['message']}")
    if info["calibration"] is None:
        for line in recipe_lines(info["recipe"]):
            say(line)


def recipe_toml(file: Path, record: dict[str, Any] | None) -> str:
    """The recipe of ``record`` as TOML; a file without one is an error naming it."""
    if record is None:
        raise CqError(f"{file}: records no cq recipe (it was made by another tool or an older cq).")
    if "error" in record:
        raise CqError(record["error"])
    return Recipe.from_mapping(record["recipe"], str(file)).to_toml()


def recipe_lines(record: dict[str, Any] | None) -> list[str]:
    """The recipe section of ``cq inspect``."""
    if record is None:
        return ["recipe: none recorded (made by another tool or an older cq)"]
    if "error" in record:
        return [f"recipe: unreadable ({record['error']})"]
    versions = ", ".join(f"{k} {v}" for k, v in record["versions"].items())
    presets = ", ".join(f"{k or '(whole file)'}: {v}" for k, v in record.get("presets", {}).items()) or "none"
    lines = [f"recipe (made with {versions}; presets applied: {presets}; "
             f"source header sha256 {record['source_header_sha256'][:16]}...):"]
    toml = Recipe.from_mapping(record["recipe"], "recipe").to_toml()
    lines += ["  " + line if line else "" for line in toml.rstrip().splitlines()]
    lines.append("  (save it with 'cq inspect FILE --recipe > recipe.toml'; repeat it with "
                 "'cq convert NEW_INPUT --recipe-from FILE')")
    return lines


@app.command(cls=CqCommand)
def demo(
    keep: Annotated[
        Optional[Path], typer.Option("--keep", help="Write the demo files to this folder and keep them.")
    ] = None,
) -> None:
    """Build a small synthetic transformer and convert it with every installed format."""
    registry = get_registry()
    result = run_demo(keep, registry=registry)
    say(f"demo model: {len(result.reports[0].tensors) if result.reports else 0} tensors, "
        f"{human_bytes(result.source_bytes)} bf16 (synthetic, with outlier channels)")
    rows = [
        (r.format, "yes" if registry.format(r.format).comfy_loadable else "no", len(r.quantized),
         human_bytes(r.output_bytes), db(r.mean_sqnr_db),
         db(min((t.sqnr_db for t in r.quantized if t.sqnr_db is not None), default=None)), f"{r.seconds:.2f}")
        for r in result.reports
    ]
    typer.echo(table(("format", "ComfyUI", "layers", "output", "mean SQNR dB", "worst dB", "time s"), rows,
                     "llrrrrr"))
    say("SQNR: weight signal-to-quantization-noise, measured from each stored layer as ComfyUI decodes it.")
    if keep:
        say(f"files kept in {keep}")


from cq_core.cli.models import models_app  # noqa: E402 (sub-app, registered beside the commands)

app.add_typer(models_app, name="models")


from cq_core.cli.meta import meta_app, migrate  # noqa: E402 (sub-app and command, registered beside the others)

app.add_typer(meta_app, name="meta")
app.command(cls=CqCommand)(migrate)


#: Termination signals received (click turns the KeyboardInterrupt into a plain 130 on the way out).
_received: list[int] = []


def _raise_interrupt(signum, frame):
    """SIGTERM or SIGHUP (a closed terminal): cleaned up like Ctrl-C, exit status 128 + the signal."""
    _received.append(signum)
    raise KeyboardInterrupt


def _interrupted_status() -> int:
    return 128 + _received[-1] if _received else 130


def main(argv: list[str] | None = None) -> None:
    """Console entry point: one clear line and a non-zero exit for every known failure."""
    debug = os.environ.get("CQ_DEBUG") == "1"
    args = list(sys.argv[1:] if argv is None else argv)
    if "--debug" in args:
        args.remove("--debug")
        debug = True
    return_large_buffers_to_the_system()
    for name in ("SIGTERM", "SIGHUP"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), _raise_interrupt)
    # A shell may start us with SIGINT ignored (background jobs); Ctrl-C must still clean up.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    report_broken_plugins(lambda broken: say(f"warning: {broken.sentence()}.", err=True))
    for name in unknown_disabled_plugins():
        say(f"warning: {DISABLE_ENV} names {name!r}, which is not an installed plugin; "
            "'cq plugins' lists their names.", err=True)
    try:
        code = app(args=args, prog_name="cq", standalone_mode=False)
    except CqError as exc:
        if debug:
            raise
        say(f"cq: error: {without_python_advice(str(exc))}", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        say("cq: interrupted; no output was written.", err=True)
        sys.exit(_interrupted_status())
    except typer.Abort:  # end of input at a prompt
        sys.exit(130)
    except ClickException as exc:  # usage errors: an unknown option or command, a bad value
        if debug:
            raise
        say(f"cq: error: {click_error_line(exc)}", err=True)
        sys.exit(exc.exit_code)
    if code == 130:  # click turns KeyboardInterrupt into Abort, returned as 130 here
        say("cq: interrupted; no output was written.", err=True)
        code = _interrupted_status()
    if isinstance(code, int) and code:
        sys.exit(code)


if __name__ == "__main__":
    main()
