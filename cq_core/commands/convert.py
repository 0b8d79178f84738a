"""``cq convert`` and :func:`cq_core.convert`: one conversion, told as its steps.

resolve (the recipe and the run settings) -> open (the input, under ComfyUI's names) ->
plan (every tensor's fate, from the header alone) -> budget (each free layer's format, when a
size is asked for) -> check (before anything is written) -> execute (stream the plan through
an executor) -> report. Each step's logic lives in its own module of :mod:`cq_core.engine`;
this function only puts them in order.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from cq_core.engine.activations import ActivationSettings
from cq_core.engine.budget import (
    all_high_precision_warning,
    budget_candidates,
    fit_budget,
    sharded_over_budget_warning,
)
from cq_core.engine.checks import (
    check_activation_settings_used,
    check_calibration_matches,
    check_calibration_needed,
    comfyui_load_check,
    non_finite_tensors,
    nothing_quantized_warning,
    reads_statistics,
    unmatched_pattern_warnings,
    unread_statistics_warning,
)
from cq_core.engine.execute import execute_plan
from cq_core.engine.fields import keyword_targets
from cq_core.engine.native_layout import describe_layout, to_native_layout
from cq_core.engine.pipeline import check_threads, resolve_device
from cq_core.engine.plan import QUANTIZE, InstanceCache, Plan, build_plan, plan_uses, quantized_marker, shard_layouts
from cq_core.engine.quantized_source import decode_quantized
from cq_core.engine.recipe import Recipe, RecipeRecord, resolve_recipe, unknown_keyword
from cq_core.engine.report import Report, TensorResult, peak_rss_bytes
from cq_core.engine.rules import compile_patterns
from cq_core.engine.run import RunSettings
from cq_core.errors import UsageError
from cq_core.io.calibration_file import CalibrationFile
from cq_core.io.outputs import check_not_inputs, check_output_name
from cq_core.io.shards import is_sharded_input, open_source, output_path_for
from cq_core.io.source import Source
from cq_core.plugin.manager import Registry, resolve_registry
from cq_core.plugin.types import Format, MetadataWriter


def convert(
    input: str | os.PathLike,
    output: str | os.PathLike | None = None,
    *,
    recipe: Recipe | None = None,
    run: RunSettings | None = None,
    calibration: str | os.PathLike | None = None,
    registry: Registry | None = None,
    **options: Any,
) -> Report:
    """Convert ``input`` to a quantized checkpoint as ``recipe`` says; returns the :class:`Report`.

    ``input``: a ``.safetensors`` file, a ``*.safetensors.index.json`` or a folder of shards.
    ``output``: the file to write (default: ``INPUT-FORMAT.safetensors`` beside the input);
    the output is sharded when the input is (one output shard per input shard) or with
    ``max_shard_size``, unless ``single_file``. ``recipe`` (:class:`cq_core.Recipe`) decides
    the bytes; ``run`` (:class:`cq_core.engine.run.RunSettings`) how the conversion runs
    (dry run, overwrite, device, threads, shards, executor, progress), never the bytes.
    ``calibration``: a statistics file from ``cq calibrate`` (each layer's statistics reach
    the optimizer as ``OptimizeContext.stats``; the recipe records the file's SHA-256).
    ``registry``: the plugins to use (default: the installed ones, :func:`cq_core.get_registry`).

    ``options``: recipe fields (``format="nvfp4"``, ``optimizer="gptq"``, ``exclude=...``;
    with ``recipe``, they override its fields as the CLI's flags do, :meth:`Recipe.override`),
    the flags' own keywords (``model`` for the preset, ``layer`` for ``"REGEX=FORMAT"`` strings,
    ``layer_config`` for a rules file), or run settings (``dry_run=True``, ``device="cpu"``,
    over ``run``'s). An unknown name is a :class:`UsageError` naming the closest known one.

    The output's ``__metadata__`` records the recipe, the versions used and a hash of the
    input's header (``report.recipe`` holds the same record); the report lists each tensor's
    action and reason, each quantized layer's weight SQNR measured from the stored tensors,
    and every warning (:attr:`Report.warnings`). A dry run reads only the header (a size
    budget reads the weights to measure them) and writes nothing. Whatever ``nonfinite``
    says, a finite weight whose stored layer would decode to NaN/Inf is an error naming the
    tensor, and nothing is written. Raises :class:`cq_core.CqError` (bad input) or
    :class:`cq_core.UsageError` (a request that cannot work) with one sentence.
    """
    started = time.perf_counter()
    registry = resolve_registry(registry)
    recipe_options, run = split_options(options, run)
    format_given = recipe_options.get("format") is not None or (isinstance(recipe, Recipe) and recipe.format is not None)
    recipe = resolve_recipe(recipe, calibration, registry, **recipe_options)
    calibration_stats = CalibrationFile(calibration) if calibration is not None else None
    activation = recipe.activation_settings()
    fmt = registry.format(recipe.format)(**dict(recipe.format_options))
    opt = registry.optimizer(recipe.optimizer)(**dict(recipe.optimizer_options))
    writer = registry.metadata_writer(recipe.metadata_writer)()
    runner = registry.executor("local" if run.executor is None else run.executor)(**dict(run.executor_options))
    options_given = bool(recipe.format_options)
    # Recorded with every option resolved, defaults included: a later default cannot change it.
    recipe = replace(recipe, format_options=dict(fmt.opts), optimizer_options=dict(opt.opts))
    # A budget choosing among --formats or --gpu's formats does not record a --format nobody gave:
    # it would claim a format the budget may not have chosen for any layer.
    recorded = recipe
    if recipe.has_budget and (recipe.formats or recipe.gpu) and not format_given:
        recorded = replace(recipe, format=None, format_options=recipe.format_options if options_given else {})
    device = resolve_device(run.device) if runner.in_process else None
    check_threads(run.threads)

    input_path = Path(input)
    if run.single_file and run.max_shard_size is not None:
        raise UsageError("--single-file and --max-shard-size contradict each other; pass one of them.")
    sharded = run.max_shard_size is not None or (is_sharded_input(input_path) and not run.single_file)
    output_path = output_path_for(input_path, output, budget_label(recipe) or fmt.name, sharded)
    if not run.dry_run:
        check_output_name(output_path, run.overwrite)

    with open_source(input_path) as raw_source:
        # Every file read; no file written (or removed) may be one of them, whatever its name.
        inputs = [*raw_source.files(), *([Path(calibration)] if calibration is not None else [])]
        if not run.dry_run:
            check_not_inputs([output_path], inputs)
        source, warnings = raw_source, []
        if quantized_marker(raw_source) is not None:  # an FP8 release, say: decode it, quantize it again
            source = decode_quantized(raw_source, registry)
            warnings.append(source.describe())
        source = to_native_layout(source, registry.layout_converters.values())
        plan, budget = make_plan(source, recipe, registry, fmt, opt, writer, activation, calibration_stats, device,
                                 run, recorded=recorded)
        warnings += comfyui_load_check(plan, recipe.comfyui_version)
        warnings += unmatched_pattern_warnings(plan, recipe.rules().layers, compile_patterns(recipe.exclude, "--exclude"))
        unused = check_activation_settings_used(plan, activation)
        warnings += [unused] if unused else []
        if calibration_stats is not None:
            check_calibration_matches(calibration_stats, plan)
            if not reads_statistics(plan, opt, activation, recipe.has_budget):
                # Recorded, a later --recipe-from would ask for a file nothing reads.
                warnings.append(unread_statistics_warning(calibration, opt))
                plan.record = replace(plan.record, recipe=replace(plan.record.recipe, calibration=None))
                plan.metadata.update(plan.record.header_entry())
        else:
            check_calibration_needed(plan, opt, activation)
        report = start_report(plan, source, input_path, fmt, opt, run, output_path, warnings, budget)
        shards = shard_layouts(plan, source, writer, run.max_shard_size) if sharded else None
        # The output's bytes on disk, every shard's header included: what a dry run predicts and a
        # run writes (from the layout, not the path: the folder may be swapped while it runs).
        report.output_bytes = plan.file_bytes if shards is None else sum(s.file_bytes for s in shards)
        if run.dry_run:
            report.tensors = [TensorResult.planned(item) for item in plan.items]
        else:
            settings = run.execution()
            try:
                runner.start(settings)  # before the output exists: a refusal leaves nothing behind
                execute_plan(
                    plan, source, output_path, opt, writer, report, run.overwrite, run.measure, run.progress,
                    device=device, shards=shards, calibration=calibration_stats, inputs=inputs, runner=runner,
                    settings=settings,
                )
            finally:
                runner.stop()
            if budget is not None:
                report.budget["achieved_bytes"] = report.output_bytes
    nothing = all_high_precision_warning(report) or nothing_quantized_warning(report)
    report.warnings += [w for w in (nothing, sharded_over_budget_warning(report)) if w]
    report.seconds = time.perf_counter() - started
    report.peak_rss_bytes = peak_rss_bytes()
    return report


def split_options(options: Mapping[str, Any], run: RunSettings | None) -> tuple[dict[str, Any], RunSettings]:
    """``convert()``'s keywords as (recipe keywords, the run settings with the rest applied over
    ``run``); an unknown name is a :class:`UsageError` naming the closest known one."""
    recipe_keywords = keyword_targets(Recipe)
    run_keywords = keyword_targets(RunSettings)
    recipe_options, run_options = {}, {}
    for name, value in options.items():
        if name in recipe_keywords:
            recipe_options[name] = value
        elif name in run_keywords:
            run_options[name] = value
        else:
            raise unknown_keyword(name, [*recipe_keywords, *run_keywords])
    run = run if run is not None else RunSettings()
    if not isinstance(run, RunSettings):
        raise UsageError(f"run must be a cq_core.RunSettings, not {type(run).__name__}.")
    return recipe_options, replace(run, **run_options) if run_options else run


def budget_label(recipe: Recipe) -> str | None:
    """What a size budget's default output name says instead of a format (it chooses several):
    ``6bpw`` for ``--bits-per-weight 6``, ``10GB`` for ``--target-size 10GB``; None without a budget."""
    if recipe.bits_per_weight is not None:
        return f"{recipe.bits_per_weight:g}bpw"
    if recipe.target_size is not None:
        size = recipe.target_size
        unit, scale = next(((u, f) for u, f in (("TB", 10**12), ("GB", 10**9), ("MB", 10**6), ("KB", 10**3))
                            if size >= f), ("B", 1))
        return f"{size / scale:.4g}{unit}"
    return None


def make_plan(
    source: Source,
    recipe: Recipe,
    registry: Registry,
    fmt: Format,
    opt: Any,
    writer: MetadataWriter,
    activation: ActivationSettings,
    calibration: CalibrationFile | None,
    device: Any,
    run: RunSettings,
    *,
    recorded: Recipe | None = None,
) -> tuple[Plan, Any]:
    """The plan, its metadata complete (the recipe record included), and the size budget's
    result (None without a budget). ``--nonfinite keep`` reads the quantized weights once
    more to keep those with NaN/Inf out of it; a budget reads every free weight to measure it."""
    rules = recipe.rules()
    instances = InstanceCache(registry, fmt, opt)
    allowed = (budget_candidates(recipe.formats, recipe.gpu, recipe.format, registry.formats, instances,
                                 comfyui_version=recipe.comfyui_version)
               if recipe.has_budget else [])

    def finish(choices: Mapping[str, tuple[Format | None, str]] | None = None) -> Plan:
        plan = build_plan(
            source, registry, fmt, writer, exclude=recipe.exclude, model=recipe.preset, rules=rules,
            instances=instances, candidates=allowed, choices=choices, activation=activation,
        )
        record = RecipeRecord(
            recorded or recipe, registry.versions_of(plan_uses(plan, writer, source)), source.header_sha256,
            {c.prefix: c.preset.name for c in plan.components},
        )
        plan.metadata.update(record.header_entry())
        plan.record = record
        return plan

    plan = finish()
    if recipe.nonfinite == "keep" and (not run.dry_run or recipe.has_budget):
        # One extra read of the quantized tensors, so the header can be planned without them.
        rules.keep = non_finite_tensors(plan, source)
        if rules.keep:
            plan = finish()
    if not recipe.has_budget:
        return plan, None
    return fit_budget(plan, source, writer, finish, calibration, device, allowed, target_size=recipe.target_size,
                      bits_per_weight=recipe.bits_per_weight, full_precision_mm=recipe.full_precision_mm,
                      progress=run.progress is True)


def start_report(plan: Plan, source: Source, input_path: Path, fmt: Format, opt: Any, run: RunSettings,
                 output: Path, warnings: list[str], budget: Any) -> Report:
    """The report before any tensor is written: the plan's totals, the recipe record, the
    warnings found so far."""
    report = Report(
        input=str(input_path),
        output=None if run.dry_run else str(output),
        format=fmt.name,
        optimizer=opt.name,
        preset=plan.preset.name if plan.preset and not plan.preset.keep_all else None,
        preset_reason=plan.preset_reason,
        layout=describe_layout(source),
        components=[c.to_json() for c in plan.components],
        dry_run=run.dry_run,
        would_write=str(output) if run.dry_run else None,
        recipe=plan.record.to_json(),
        input_bytes=source.file_size,
        budget=budget.to_json() if budget is not None else None,
        warnings=list(warnings),
    )
    for item in plan.items:
        params = 1
        for dim in item.shape:
            params *= dim
        report.total_params += params
        if item.action == QUANTIZE:
            report.quantized_params += params
    return report
