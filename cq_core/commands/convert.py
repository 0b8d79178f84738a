"""Runs a plan: read -> optimize -> encode -> write, one tensor at a time."""

from __future__ import annotations

import copy
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from cq_core.commands.calibrate import CalibrationFile
from cq_core.engine.budget import (
    HIGH_PRECISION,
    BudgetResult,
    allowed_format_names,
    candidate_table,
    capacity_bytes,
    choose_formats,
    impossible_budget,
    measure_errors,
)
from cq_core.engine.pipeline import (
    TensorReader,
    check_threads,
    resolve_device,
    run_pipelined,
    run_sequential,
    synchronize,
    to_host,
)
from cq_core.engine.plan import (
    DROP,
    KEEP,
    QUANTIZE,
    Component,
    InstanceCache,
    Plan,
    Rules,
    TensorPlan,
    plan_tensors,
)
from cq_core.engine.activations import ActivationSettings, optimize_for_compute_path, unused_settings
from cq_core.engine.recipe import Recipe, RecipeRecord, resolve_recipe
from cq_core.engine.report import Report, TensorResult, peak_rss_bytes
from cq_core.errors import CqError, UsageError
from cq_core.io.outputs import check_not_inputs, check_output_name
from cq_core.io.safetensors_io import SafetensorsFile, write_safetensors
from cq_core.io.shards import (
    ShardedSource,
    ShardLayout,
    default_output,
    index_path_for,
    is_sharded_input,
    open_source,
    source_files,
    split_groups,
    tensor_location,
    write_shard_set,
)
from cq_core.io.sizes import parse_size
from cq_core.numerics.metrics import sqnr_db, weight_error_energy
from cq_core.plugin.executors import ExecutionSettings, Executor, PortableTensor, TensorLocation
from cq_core.plugin.layouts import NativeLayoutSource, describe_layout, to_native_layout
from cq_core.plugin.manager import Registry, get_registry
from cq_core.plugin.types import Format, MetadataWriter, OptimizeContext, Optimizer

CPU = torch.device("cpu")
#: The pipeline never holds less than this in flight, so small tensors still overlap.
MIN_BUDGET_BYTES = 64 << 20


def default_output_path(input_path: Path, format_name: str) -> Path:
    """``model.safetensors`` -> ``model-float8_e4m3fn.safetensors`` next to it."""
    stem = input_path.name.removesuffix(".safetensors")
    return input_path.with_name(f"{stem}-{format_name}.safetensors")


NONFINITE_KEEP_REASON = "contains NaN or Inf; kept in high precision (--nonfinite keep)"


def is_finite(weight: torch.Tensor) -> bool:
    low, high = torch.aminmax(weight)  # one pass, no copy; NaN propagates
    return bool(torch.isfinite(low) and torch.isfinite(high))


def check_finite(name: str, weight: torch.Tensor, origin: str | None = None) -> None:
    """NaN or Inf in a weight would poison its scale: refuse, naming the tensor and, when known,
    the file (``origin``) it was read from."""
    if not is_finite(weight):
        where = f"{origin}: tensor" if origin else "Tensor"
        raise CqError(
            f"{where} {name!r} contains NaN or Inf values; fix the source checkpoint, or pass "
            "--nonfinite keep to keep such tensors in high precision."
        )


def check_finite_decode(item: TensorPlan, weight: torch.Tensor) -> None:
    """The core's guarantee, whatever the format: no layer is written that decodes to NaN/Inf.

    Called when the measurement (which decodes every layer) found a non-finite
    decode of a finite weight: a format bug or a weight beyond what the format
    can hold; either way the layer is refused by name, nothing is written.
    """
    amax = float(weight.abs().amax()) if weight.numel() else 0.0
    raise CqError(
        f"Tensor {item.name!r} would decode to NaN or Inf in format {item.format.name!r} (its largest "
        f"magnitude is {amax:.4g}); keep it in high precision with --layer '{_regex_literal(item.name)}=skip' "
        "or choose another format for it."
    )


def _regex_literal(name: str) -> str:
    import re

    return "^" + re.escape(name) + "$"


def non_finite_tensors(plan: Plan, source) -> dict[str, str]:
    """Scan every tensor the plan would quantize; those with NaN/Inf, with the reason to keep them."""
    return {
        item.name: NONFINITE_KEEP_REASON
        for item in plan.items
        if item.action == QUANTIZE and not is_finite(source.read(item.name))
    }


def resolve_components(registry: Registry, source: SafetensorsFile, model: str | None) -> tuple[list[Component], str]:
    """The checkpoint's components with their presets, and why.

    ``model``: None auto-detects every component (see ``cq_detect_model``);
    a preset name replaces the preset of the main (first detected) model
    component, or covers the whole file when none is detected, and leaves the
    other components (text encoders, VAE) to detection; ``"none"`` turns the
    model presets off. A component whose preset keeps everything (a VAE)
    stays protected in every case: quantizing it is never right.
    """
    chosen = registry.model_filter(model) if model not in (None, "none") else None
    detections = registry.detect_components(list(source.tensors), dict(source.metadata))
    components = [Component(d.prefix, registry.model_filter(d.preset), f"detected: {d.reason}") for d in detections]
    if model == "none":
        return [c for c in components if c.preset.keep_all], "no preset (--model none)"
    if chosen is not None:
        reason = f"chosen with --model {model}"
        main = next((i for i, c in enumerate(components) if not c.preset.keep_all), None)
        if main is None:
            return [Component("", chosen, reason), *components], reason
        components[main] = Component(components[main].prefix, chosen, reason)
        return components, reason
    if not any(not c.preset.keep_all for c in components):
        return components, "no preset detected"
    return components, components[0].reason


def build_plan(
    source: SafetensorsFile,
    registry: Registry,
    fmt: Format,
    writer: MetadataWriter,
    *,
    exclude: Sequence[str] = (),
    model: str | None = None,
    rules: Rules | None = None,
    instances: InstanceCache | None = None,
    candidates: Sequence[Format | None] = (),
    choices: Mapping[str, tuple[Format | None, str]] | None = None,
    activation: ActivationSettings | None = None,
) -> Plan:
    components, reason = resolve_components(registry, source, model)
    return plan_tensors(
        source, fmt, writer, exclude=exclude, components=components, preset_reason=reason, rules=rules,
        instances=instances or InstanceCache(registry, fmt),
        shape_reads=registry.shape_read_layers(list(source.tensors), dict(source.metadata)),
        candidates=candidates, choices=choices,
        activation=activation,
    )


def convert(
    input: str | os.PathLike,
    output: str | os.PathLike | None = None,
    *,
    recipe: Recipe | None = None,
    format: str | None = None,
    format_options: Mapping[str, Any] | None = None,
    optimizer: str | None = None,
    optimizer_options: Mapping[str, Any] | None = None,
    exclude: Sequence[str] = (),
    model: str | None = None,
    layer: Sequence[str] = (),
    layer_config: str | os.PathLike | None = None,
    fallback: str | None = None,
    heuristic: bool = False,
    full_precision_mm: bool = False,
    metadata_writer: str | None = None,
    nonfinite: str | None = None,
    target_size: str | int | None = None,
    bits_per_weight: float | None = None,
    formats: str | Sequence[str] | None = None,
    gpu: str | None = None,
    embeddings: str | None = None,
    input_scale: str | None = None,
    awq: bool = False,
    calibration: str | os.PathLike | None = None,
    dry_run: bool = False,
    overwrite: bool = False,
    measure: bool = True,
    progress: bool | Callable[[int, int], None] = False,
    registry: Registry | None = None,
    device: str | torch.device | None = None,
    threads: int | None = None,
    max_shard_size: str | int | None = None,
    single_file: bool = False,
    pipelined: bool = True,
    executor: str | None = None,
    executor_options: Mapping[str, Any] | None = None,
    quiet: bool = False,
) -> Report:
    """Convert ``input`` to a quantized checkpoint as ``recipe`` says; returns the report.

    ``recipe`` (:class:`cq_core.engine.recipe.Recipe`) decides the bytes; the
    keywords from ``format`` to ``nonfinite`` are conveniences that build one
    (``model`` is the preset) or, beside ``recipe``, override its fields as
    the CLI's flags do (:meth:`Recipe.override`). The output's ``__metadata__``
    records the recipe, the versions used and a hash of the input's header
    (``cq inspect`` shows them); ``report.recipe`` holds the same record.

    With ``dry_run`` nothing is read but the header and nothing is written;
    the report lists each tensor's planned action and reason. A size budget
    (``target_size`` bytes or ``"10GB"``, or ``bits_per_weight``; ``formats`` or
    ``gpu`` the allowed formats; :mod:`cq_core.engine.budget`) chooses each
    free layer's format by measurement, so it reads the weights even in a dry
    run; ``report.budget`` says what it chose, the size predicted and achieved. ``measure``
    decodes every quantized layer to report its weight SQNR. ``progress``:
    True shows a progress bar on stderr; a callable is called as
    ``progress(done, total)`` after each tensor is written (a UI's own bar).

    Per-layer choices (see :mod:`cq_core.engine.plan` for their precedence):
    ``layer_config`` (a TOML/JSON file of regex -> format, options or skip),
    ``layer`` (``"REGEX=FORMAT"`` strings), ``fallback`` (a format for layers
    kept by an exclude or the preset, or refused by their format),
    ``heuristic`` (skip layers too small to gain) and ``full_precision_mm``
    (``full_precision_matrix_mult`` in every quantized layer's JSON).
    ``embeddings`` (``"int8"``: token-embedding tables of text encoders in row-wise
    INT8, which ComfyUI's ``Embedding`` modules load; ``"none"`` keeps them even where a
    preset would quantize them).

    Speed and scale (never part of the recipe: they do not change the bytes):
    ``device`` (``auto``: CUDA when available, ``cpu``,
    ``cuda[:N]``), ``threads`` (CPU threads for the tensor work), and
    ``pipelined`` (overlap reading, work and writing; False runs them one
    after another, with byte-identical output), ``executor`` (where the
    per-tensor work runs: ``local``, the default, or one a plugin registers,
    e.g. ``ray``; ``cq_register_executors``) with its ``executor_options``;
    ``quiet`` (``-q``) asks the executor to keep what it starts from printing.
    ``calibration``: a file from
    ``cq calibrate``; each layer's statistics reach the optimizer as
    ``OptimizeContext.stats`` (the recipe records its SHA-256; a recipe that
    names one needs a statistics file). ``input_scale="calibrated"`` and ``awq`` (recipe
    fields) add a calibrated ``input_scale`` and an AWQ ``pre_quant_scale`` to the layers whose
    format takes them, chosen on each layer's activation sample (:mod:`cq_core.engine.activations`);
    both need ``calibration``. ``nonfinite``: ``"error"`` refuses a weight
    holding NaN/Inf, ``"keep"`` keeps it in high precision (one extra read).
    Whatever ``nonfinite`` says, a finite weight whose stored layer would
    decode to NaN/Inf (a magnitude beyond what its format can hold) is an
    error naming the tensor, found by the measuring pass; the formats
    themselves are written so that it does not happen, ``measure`` or not.
    ``input`` may be a
    ``*.safetensors.index.json`` or a directory of shards; the output is
    sharded when the input is (one output shard per input shard) or when
    ``max_shard_size`` is given (``"5GB"``), unless ``single_file``.
    """
    started = time.perf_counter()
    registry = registry or get_registry()
    calibration_stats = CalibrationFile(calibration) if calibration is not None else None
    recipe = resolve_recipe(
        recipe, calibration,
        format=format, format_options=format_options, optimizer=optimizer, optimizer_options=optimizer_options,
        exclude=exclude, model=model, layer=layer, layer_config=layer_config, fallback=fallback,
        heuristic=heuristic, full_precision_mm=full_precision_mm, metadata_writer=metadata_writer,
        nonfinite=nonfinite, target_size=target_size, bits_per_weight=bits_per_weight, formats=formats, gpu=gpu,
        embeddings=embeddings, input_scale=input_scale, awq=awq,
    )
    recipe.validate(registry)
    activation = recipe.activation_settings()
    fmt = registry.format(recipe.format)(**dict(recipe.format_options))
    opt: Optimizer = registry.optimizer(recipe.optimizer)(**dict(recipe.optimizer_options))
    writer = registry.metadata_writer(recipe.metadata_writer)()
    runner: Executor = registry.executor("local" if executor is None else executor)(**dict(executor_options or {}))
    # Recorded with every option resolved, defaults included: a later default cannot change it.
    recipe = replace(recipe, format_options=dict(fmt.opts), optimizer_options=dict(opt.opts))
    nonfinite = recipe.nonfinite
    model = recipe.preset
    exclude = recipe.exclude

    input_path = Path(input)
    torch_device = resolve_device(device) if runner.in_process else None
    threads = check_threads(threads)
    shard_bytes = parse_size(max_shard_size) if max_shard_size is not None else None
    if single_file and shard_bytes is not None:
        raise UsageError("--single-file and --max-shard-size contradict each other; pass one of them.")
    sharded_output = shard_bytes is not None or (is_sharded_input(input_path) and not single_file)
    if output is None:
        output_path = (
            default_output(input_path, fmt.name, sharded_output)
            if sharded_output or is_sharded_input(input_path)
            else default_output_path(input_path, fmt.name)
        )
    else:
        if os.fspath(output) == "":
            raise UsageError("-o '' names no file; name the file to write, or leave -o out.")
        if os.fspath(output).endswith(("/", os.sep)):
            raise UsageError(f"-o {os.fspath(output)}: names a folder; name the file to write in it "
                             f"(e.g. {Path(output) / default_output_path(input_path, fmt.name).name}).")
        if Path(output).is_dir():  # a sharded output would otherwise be named after it, beside it
            raise CqError(f"{output}: is a directory; name a file to write.")
        output_path = index_path_for(Path(output)) if sharded_output else Path(output)
    if not dry_run:
        check_output_name(output_path, overwrite)

    with open_source(input_path) as raw_source:
        # Every file read; no file written (or removed) may be one of them, whatever its name.
        inputs = [*source_files(raw_source), *([Path(calibration)] if calibration is not None else [])]
        if not dry_run:
            check_not_inputs([output_path], inputs)
        source = to_native_layout(raw_source, registry)
        rules = recipe.rules()
        instances = InstanceCache(registry, fmt, opt)
        allowed = budget_candidates(recipe, registry, instances)

        records: list[RecipeRecord] = []  # one per plan made; the last one is the plan's

        def make_plan(choices: Mapping[str, tuple[Format | None, str]] | None = None) -> Plan:
            plan = build_plan(
                source, registry, fmt, writer, exclude=exclude, model=model, rules=rules, instances=instances,
                candidates=allowed, choices=choices, activation=activation,
            )
            record = RecipeRecord(
                recipe,
                registry.versions_of(plan_uses(plan, writer, source)),
                source.header_sha256,
                {c.prefix: c.preset.name for c in plan.components},
            )
            plan.metadata.update(record.header_entry())
            records.append(record)
            return plan

        plan = make_plan()
        if nonfinite == "keep" and (not dry_run or recipe.has_budget):
            # One extra read of the quantized tensors, so the header can be planned without them.
            rules.keep = non_finite_tensors(plan, source)
            if rules.keep:
                plan = make_plan()
        budget = None
        if recipe.has_budget:
            plan, budget = fit_budget(plan, recipe, source, writer, make_plan, calibration_stats, torch_device, allowed,
                                      progress=progress is True)
        record = records[-1]
        unused_warning = check_activation_settings_used(plan, activation)
        if calibration_stats is not None:
            check_calibration_matches(calibration_stats, plan)
        else:
            check_calibration_needed(plan, opt, activation)
        report = Report(
            input=str(input_path),
            output=None if dry_run else str(output_path),
            format=fmt.name,
            optimizer=opt.name,
            preset=plan.preset.name if plan.preset and not plan.preset.keep_all else None,
            preset_reason=plan.preset_reason,
            layout=describe_layout(source),
            components=[c.to_json() for c in plan.components],
            dry_run=dry_run,
            recipe=record.to_json(),
            input_bytes=source.file_size,
            budget=budget.to_json() if budget is not None else None,
            warnings=[unused_warning] if unused_warning else [],
        )
        for item in plan.items:
            report.total_params += _numel(item.shape)
            if item.action == QUANTIZE:
                report.quantized_params += _numel(item.shape)
        shards = shard_layouts(plan, source, writer, shard_bytes) if sharded_output else None
        # The output's bytes on disk, every shard's header included: what a dry run predicts and a
        # run writes (from the layout, not the path: the folder may be swapped while it runs).
        report.output_bytes = plan.file_bytes if shards is None else sum(s.file_bytes for s in shards)
        if dry_run:
            report.tensors = [
                TensorResult(i.name, i.action, i.reason, i.shape, _dtype(i.dtype), i.format and i.format.name)
                for i in plan.items
            ]
        else:
            settings = ExecutionSettings(
                device=None if device is None else str(device), threads=threads, pipelined=pipelined,
                quiet=quiet,
            )
            try:
                runner.start(settings)  # before the output exists: a refusal leaves nothing behind
                _execute(
                    plan, source, output_path, opt, writer, report, overwrite, measure, progress,
                    device=torch_device, shards=shards, calibration=calibration_stats,
                    inputs=inputs, runner=runner, settings=settings,
                )
            finally:
                runner.stop()
            if budget is not None:
                report.budget["achieved_bytes"] = report.output_bytes
    report.seconds = time.perf_counter() - started
    report.peak_rss_bytes = peak_rss_bytes()
    return report


def budget_candidates(recipe: Recipe, registry: Registry, instances: InstanceCache) -> list[Format | None]:
    """The formats a size budget chooses among (None: high precision), built once; empty without a budget."""
    if not recipe.has_budget:
        return []
    names = allowed_format_names(recipe.formats, recipe.gpu, recipe.format, list(registry.formats))
    return [None if name == HIGH_PRECISION else instances.format(name) for name in names]


def fit_budget(
    plan: Plan,
    recipe: Recipe,
    source: SafetensorsFile | ShardedSource,
    writer: MetadataWriter,
    finish: Callable[[Mapping[str, tuple[Format | None, str]]], Plan],
    calibration: CalibrationFile | None,
    device: torch.device,
    allowed: Sequence[Format | None],
    progress: bool = False,
) -> tuple[Plan, BudgetResult]:
    """Choose each free layer's format for the recipe's size budget (see :mod:`cq_core.engine.budget`);
    ``finish(choices)`` makes the plan with those choices, its metadata complete; ``progress``
    shows a bar on stderr while the candidates' errors are measured.

    Fails before reading any weight when even the smallest choice exceeds the budget, and on
    the first free weight with NaN or Inf (:func:`check_finite`; ``--nonfinite keep`` has kept
    those out of the budget already). With ``calibration``, every free layer needs its
    statistics (the errors use ``tr(E H Eᵀ)``).
    """
    flag = "--target-size" if recipe.target_size is not None else f"--bits-per-weight {recipe.bits_per_weight:g} ="
    parameters = sum(_numel(info.shape) for info in source.tensors.values())
    target = capacity_bytes(recipe.target_size, recipe.bits_per_weight, parameters)
    formats = list(dict.fromkeys(HIGH_PRECISION if fmt is None else fmt.name for fmt in allowed))
    table = candidate_table(plan, writer, recipe.full_precision_mm)
    smallest = finish({
        layer.item.name: (min(layer.candidates, key=lambda c: c.nbytes).format, "smallest")
        for layer in table.layers
    }).file_bytes
    if target < smallest:
        raise impossible_budget(flag, target, smallest, formats)
    if calibration is not None:
        missing = [layer.item.name for layer in table.layers
                   if layer.item.name.removesuffix(".weight") not in calibration]
        if missing:
            raise UsageError(
                f"--calibration {calibration.path}: has no statistics for layer {missing[0].removesuffix('.weight')!r}, "
                "which the size budget chooses a format for; capture every Linear layer, or fix it with --layer."
            )

        def hessian_of(layer: str) -> torch.Tensor | None:
            return calibration.get(layer)["H"]
    else:
        def hessian_of(layer: str) -> torch.Tensor | None:
            return None

    def read(item: TensorPlan) -> torch.Tensor:
        tensor = _read_tensor(source, reader, item)
        location = tensor_location_of(source, item)
        check_finite(item.name, tensor, None if location is None else str(location.path))
        return tensor

    reader = TensorReader()
    measured = sum(1 for layer in table.layers if any(c.format is not None for c in layer.candidates))
    bar = tqdm(total=measured, desc="cq budget: measuring", unit="layer", disable=progress is not True,
               leave=False)
    try:
        measure_errors(table, read, hessian_of=hessian_of, device=device, progress=lambda: bar.update(1))
    finally:
        bar.close()
        reader.close()
    measure = ("sqrt(|E|^2/|W|^2 x tr(E H E^T)/tr(W H W^T)) x weights x importance, H from --calibration"
               if calibration is not None else "data-free: |E|^2/|W|^2 x weights x importance")
    plan, result = choose_formats(table, target, finish, flag=flag, formats=formats, error_measure=measure)
    result.smallest_bytes = smallest
    return plan, result


def tensor_location_of(source: Any, item: TensorPlan) -> TensorLocation | None:
    """Where ``item``'s bytes lie in the input, or None when a layout converter assembles it
    from several tensors (then only ``source.read`` can produce it)."""
    if isinstance(source, NativeLayoutSource) and not source.is_identity(item.name):
        return None
    path, offset = tensor_location(source, item.name)
    return TensorLocation(Path(path).absolute(), offset, item.dtype, item.shape)


def _read_tensor(source: Any, reader: TensorReader, item: TensorPlan) -> torch.Tensor:
    """One input tensor: assembled from its parts when a layout converter fuses it, else read directly."""
    location = tensor_location_of(source, item)
    if location is None:
        return source.read(item.name)
    return reader.read(location.path, location.offset, location.dtype, location.shape)


def plan_uses(plan: Plan, writer: MetadataWriter, source: Any) -> list[tuple[str, str]]:
    """(kind, name) of every plugin object the plan uses: formats, optimizers, presets, the
    writer, the layout converter; their plugins' versions go into the recipe record."""
    uses = [("metadata writer", writer.name)]
    uses += [("model filter", c.preset.name) for c in plan.components]
    for item in plan.items:
        if item.action == QUANTIZE:
            uses.append(("format", item.format.name))
            if item.optimizer is not None:
                uses.append(("optimizer", item.optimizer.name))
    if isinstance(source, NativeLayoutSource):
        uses.append(("layout converter", source.choice.converter))
    return list(dict.fromkeys(uses))


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _dtype(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass
class ItemOutcome:
    """What the work on one tensor produced: stored tensors in write order (on the CPU) and the report line."""

    tensors: list[tuple[str, torch.Tensor]]
    result: TensorResult

    def __reduce__(self):  # for executors in other processes: float8 tensors do not unpickle
        return _outcome_from, ([(name, PortableTensor.of(t)) for name, t in self.tensors], self.result)


def _outcome_from(tensors: list[tuple[str, PortableTensor]], result: TensorResult) -> ItemOutcome:
    return ItemOutcome([(name, t.tensor()) for name, t in tensors], result)


def process_item(
    item: TensorPlan,
    tensor: torch.Tensor,
    opt: Optimizer,
    writer: MetadataWriter,
    *,
    measure: bool = True,
    device: torch.device = CPU,
    stats: Mapping[str, torch.Tensor] | None = None,
    origin: str | None = None,
) -> ItemOutcome:
    """The work on one tensor: a pure function of the tensor and its options (``origin``: the
    file it was read from, for messages).

    Nothing here touches shared state, so it may run on any thread, on any
    device, in any process. On a GPU the weight is moved there and the
    stored tensors come back through pinned memory.
    """
    tick = time.perf_counter()
    result = TensorResult(item.name, item.action, item.reason, item.shape, _dtype(item.dtype))
    if item.action == KEEP:
        return ItemOutcome([(item.name, tensor)], result)
    weight = tensor.to(device, non_blocking=True) if device.type != "cpu" else tensor
    if not measure:
        check_finite(item.name, weight, origin)
    # When measuring, the error measurement's sum of squares doubles as the NaN/Inf
    # check (one pass less per weight); nothing is written before it has passed.
    # (Energies an optimizer measured come from the same function's arithmetic.)
    fmt = item.format
    context = OptimizeContext(layer=item.layer, device=device, stats=stats, measure=measure)
    try:
        if item.activation is not None:
            optimized = optimize_for_compute_path(item.optimizer or opt, weight, fmt, context, item.activation)
        else:
            optimized = (item.optimizer or opt).optimize_layer(weight, fmt, context)
    except Exception as exc:
        if measure:
            check_finite(item.name, weight, origin)  # a NaN/Inf weight explains the failure: say so
        if isinstance(exc, CqError) and repr(item.name) not in str(exc):
            exc.args = (f"Tensor {item.name!r}: {exc}",)  # a format's refusal, named
        raise
    stored = {f"{item.layer}.{suffix}": t for suffix, t in optimized.tensors.items()}
    stored.update(writer.layer_tensors(item.layer, item.layer_config))
    for out_name, _ in item.outputs:
        if out_name not in stored:
            raise CqError(f"Format {fmt.name!r} did not produce {out_name!r} for tensor {item.name!r}.")
    if measure:
        signal, noise = optimized.energies or weight_error_energy(fmt, weight, optimized.tensors)
        if not math.isfinite(signal):  # NaN/Inf in the weight (the sums cannot overflow)
            check_finite(item.name, weight, origin)
        if not math.isfinite(noise):
            check_finite_decode(item, weight)
        result.sqnr_db = sqnr_db(signal, noise)
    host = [(out_name, to_host(stored[out_name])) for out_name, _ in item.outputs]
    synchronize(device)
    result.format = fmt.name
    result.note = optimized.note
    result.seconds = time.perf_counter() - tick
    return ItemOutcome(host, result)


@dataclass
class TensorJob:
    """One tensor's work, complete in itself (:class:`cq_core.plugin.executors.TensorJob`).

    Everything here pickles (the plan entry with its format and optimizer
    objects, the calibration file by absolute path), so an executor may run
    it in another process or on another machine that has cq and the same
    plugins installed.
    """

    item: TensorPlan
    optimizer: Optimizer
    writer: MetadataWriter
    measure: bool
    location: TensorLocation | None
    calibration: CalibrationFile | None = None

    @property
    def name(self) -> str:
        return self.item.name

    def load(self, pin: bool = False) -> torch.Tensor:
        if self.location is None:
            raise CqError(f"Tensor {self.name!r} is assembled from several tensors; only the converting process reads it.")
        reader = TensorReader(pin=pin)
        try:
            return reader.read(self.location.path, self.location.offset, self.location.dtype, self.location.shape)
        except OSError as exc:
            raise CqError(f"{self.location.path}: cannot be read here ({exc.strerror or exc}).") from None
        finally:
            reader.close()

    def statistics(self) -> dict[str, torch.Tensor] | None:
        return self.calibration.get(self.item.layer) if self.calibration is not None else None

    def run(self, tensor: torch.Tensor, device: torch.device, stats: Mapping[str, torch.Tensor] | None) -> ItemOutcome:
        return process_item(self.item, tensor, self.optimizer, self.writer, measure=self.measure, device=device,
                            stats=stats, origin=None if self.location is None else str(self.location.path))


def tensor_jobs(
    plan: Plan,
    source: SafetensorsFile | ShardedSource,
    opt: Optimizer,
    writer: MetadataWriter,
    measure: bool,
    calibration: CalibrationFile | None,
) -> list[TensorJob]:
    """A job per tensor the output holds, in write order; each knows where its bytes lie."""
    if calibration is not None:  # findable from any working directory
        calibration = copy.copy(calibration)
        calibration.path = calibration.path.absolute()
    jobs = []
    for item in plan.items:
        if item.action == DROP:
            continue
        jobs.append(TensorJob(item, opt, writer, measure, tensor_location_of(source, item), calibration))
    return jobs


class ConversionRun:
    """The jobs of one conversion and its one ordered writer (:class:`cq_core.plugin.executors.Conversion`)."""

    def __init__(
        self,
        jobs: list[TensorJob],
        source: SafetensorsFile | ShardedSource,
        settings: ExecutionSettings,
        device: torch.device | None,
        write: Callable[[TensorJob, ItemOutcome], None],
    ) -> None:
        self.jobs = jobs
        self.settings = settings
        self.device = device
        self._source = source
        self._write = write
        self._reader = TensorReader(pin=device is not None and device.type == "cuda")

    def read(self, job: TensorJob) -> torch.Tensor:
        if job.location is None:  # fused or transformed: assembled from its parts
            return self._source.read(job.name)
        return self._reader.read(job.location.path, job.location.offset, job.location.dtype, job.location.shape)

    def stream(
        self,
        work: Callable[[TensorJob, torch.Tensor | None], ItemOutcome],
        *,
        workers: int = 1,
        read: Callable[[TensorJob], torch.Tensor | None] | None = None,
    ) -> None:
        read = read or self.read
        if not self.settings.pipelined:
            run_sequential(self.jobs, read=read, work=work, write=self._write)
            return
        items = [job.item for job in self.jobs]
        run_pipelined(
            self.jobs, read=read, work=work, write=self._write,
            cost=lambda job: item_cost(job.item), freed_by_work=lambda job: input_bytes(job.item),
            budget_bytes=pipeline_budget(items, workers), workers=workers,
        )

    def close(self) -> None:
        self._reader.close()


def _execute(
    plan: Plan,
    source: SafetensorsFile | ShardedSource,
    output: Path,
    opt: Optimizer,
    writer: MetadataWriter,
    report: Report,
    overwrite: bool,
    measure: bool,
    progress: bool | Callable[[int, int], None],
    *,
    runner: Executor,
    settings: ExecutionSettings,
    device: torch.device | None = CPU,
    shards: list[ShardLayout] | None = None,
    calibration: CalibrationFile | None = None,
    inputs: Sequence[Path] = (),
) -> None:
    """Stream the plan to ``output`` (one file, or the shard set whose index is ``output``)
    through ``runner``; ``inputs``: the files read, which no output may be."""
    jobs = tensor_jobs(plan, source, opt, writer, measure, calibration)
    outcomes: dict[str, TensorResult] = {}
    bar = tqdm(total=len(jobs), desc="cq convert", unit="tensor", disable=progress is not True, leave=False)
    report_progress = progress if callable(progress) else None
    if shards is None:
        target = write_safetensors(output, plan.entries, plan.metadata, overwrite=overwrite, inputs=inputs)
    else:
        target = write_shard_set(output, shards, overwrite=overwrite, inputs=inputs)
    run = None
    try:
        with target as out:

            def write(job: TensorJob, outcome: ItemOutcome) -> None:
                for name, tensor in outcome.tensors:
                    out.write(name, tensor)
                outcomes[job.name] = outcome.result
                bar.set_postfix_str(job.name[-40:], refresh=False)
                bar.update(1)
                if report_progress is not None:
                    report_progress(len(outcomes), len(jobs))

            run = ConversionRun(jobs, source, settings, device, write)
            runner.run(run)
    finally:
        if run is not None:
            run.close()
        bar.close()
    for item in plan.items:
        report.tensors.append(
            outcomes.get(item.name) or TensorResult(item.name, item.action, item.reason, item.shape, _dtype(item.dtype))
        )


def check_calibration_matches(calibration: CalibrationFile, plan: Plan) -> None:
    """A calibration file that names none of the quantized layers was made for another model
    (or with another name prefix): say so instead of silently optimizing without it."""
    layers = [item.layer for item in plan.items if item.action == QUANTIZE]
    if layers and not any(layer in calibration for layer in layers):
        example = sorted(calibration.layers)[0]
        raise UsageError(
            f"--calibration {calibration.path}: none of its layers (e.g. {example!r}) is a quantized layer "
            f"of this checkpoint (e.g. {layers[0]!r}); capture it with the checkpoint's names (prefix)."
        )
    # A calibrated input_scale or AWQ is chosen on each layer's own statistics: one missing is named now.
    missing = next((item for item in plan.items if item.activation is not None and item.layer not in calibration), None)
    if missing is not None:
        flag = "--awq" if missing.activation.awq else "--input-scale calibrated"
        raise UsageError(
            f"--calibration {calibration.path}: has no statistics for layer {missing.layer!r}, which {flag} needs; "
            "capture every Linear layer, or keep this one in high precision with --layer."
        )


def check_activation_settings_used(plan: Plan, activation: ActivationSettings) -> str | None:
    """``--awq`` or ``--input-scale calibrated`` where no quantized layer's format stores the
    tensor it chooses would be recorded and do nothing: refuse, naming the formats. When a size
    budget chose those formats (a recipe reused on another model may choose otherwise), return
    the sentence as a warning instead; None when every setting is used."""
    used = {item.format.name: item.format for item in plan.items if item.action == QUANTIZE and item.format is not None}
    unused = unused_settings(activation, used.values())
    if not unused:
        return None
    tensor = "pre_quant_scale" if unused[0] == "--awq" else "input_scale"
    if any(item.candidates for item in plan.items):
        chosen = ", ".join(sorted(used)) or "high precision only"
        return (f"{unused[0]} does nothing in this file: the size budget chose {chosen}, and none of them stores "
                f"{tensor} for ComfyUI to read.")
    raise UsageError(
        f"{unused[0]} does nothing here: no quantized layer's format ({', '.join(sorted(used)) or 'none'}) stores "
        f"{tensor} for ComfyUI to read; drop the flag or choose a format that takes it ('cq formats')."
    )


def check_calibration_needed(plan: Plan, opt: Optimizer, activation: ActivationSettings | None = None) -> None:
    """An optimizer that needs statistics (``Optimizer.needs_calibration``) run without any
    would only round to nearest, and calibrated activation tensors have nothing to be chosen
    from: refuse, and say how to get them."""
    if activation is not None and activation.active:
        flag = "--input-scale calibrated" if activation.input_scale != "none" else "--awq"
        raise UsageError(
            f"{flag} needs --calibration FILE, which 'cq calibrate' makes "
            "(with no data at hand: 'cq calibrate --random-tokens')."
        )
    needing = sorted({
        (item.optimizer or opt).name
        for item in plan.items
        if item.action == QUANTIZE and (item.optimizer or opt).needs_calibration
    })
    if needing:
        raise UsageError(
            f"--optimizer {needing[0]} needs --calibration FILE, which 'cq calibrate' makes "
            "(with no data at hand: 'cq calibrate --random-tokens')."
        )


def input_bytes(item: TensorPlan) -> int:
    return _numel(item.shape) * item.dtype.itemsize


def output_bytes(item: TensorPlan) -> int:
    return sum(spec.nbytes for _, spec in item.outputs)


def item_cost(item: TensorPlan) -> int:
    """Bytes one item may hold at once: its input plus its stored outputs (the input goes after the work)."""
    return input_bytes(item) + output_bytes(item)


def pipeline_budget(items: Sequence[TensorPlan], workers: int = 1) -> int:
    """Room to read the next item and work on the current ones while the previous output is written.

    Two workers share the room one worker and the reader have: reading is
    the fast stage, so it waits and memory stays at three largest items.
    """
    largest = max((item_cost(item) for item in items), default=0)
    largest_output = max((output_bytes(item) for item in items), default=0)
    return max(max(2, workers) * largest + largest_output, MIN_BUDGET_BYTES)


def shard_layouts(
    plan: Plan,
    source: SafetensorsFile | ShardedSource,
    writer: MetadataWriter,
    max_shard_bytes: int | None,
) -> list[ShardLayout]:
    """Split the plan's outputs into shards: by size, or mirroring the input's shards.

    Each shard's header carries the plan's metadata, with the layer metadata
    narrowed to the layers stored in that shard.
    """
    groups = [item.outputs for item in plan.items]
    sharded = isinstance(getattr(source, "source", source), ShardedSource)
    keys = [source.shard_number(item.name) for item in plan.items] if sharded else None
    all_layers = writer.header_metadata(plan.layer_configs)
    base = {k: v for k, v in plan.metadata.items() if k not in all_layers}
    layouts = []
    for numbers in split_groups(groups, max_shard_bytes, keys):
        members = [plan.items[n] for n in numbers]
        layers = {i.layer: i.layer_config for i in members if i.action == QUANTIZE}
        entries = [entry for item in members for entry in item.outputs]
        layouts.append(ShardLayout(entries, {**base, **writer.header_metadata(layers)}))
    return layouts
