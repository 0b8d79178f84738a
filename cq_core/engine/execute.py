"""The per-tensor work of a conversion and the executor protocol's implementation (the runner).

A :class:`TensorJob` per tensor to write, in file order, each complete in itself; a
:class:`ConversionRun` that an executor (``cq_register_executors``) drives, holding the one
ordered writer; :func:`execute_plan`, which streams a plan to its output through an executor.
The work on one tensor (:func:`process_item`) is a pure function of the tensor, its options
and its calibration statistics, so it runs the same on threads here, on a GPU or on a cluster.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from cq_core.engine.activations import optimize_for_compute_path
from cq_core.engine.checks import check_finite, check_finite_decode
from cq_core.engine.pipeline import TensorReader, run_pipelined, run_sequential, synchronize, to_host
from cq_core.engine.plan import DROP, KEEP, Plan, TensorPlan
from cq_core.engine.report import Report, TensorResult
from cq_core.builtin.rtn import RoundToNearest
from cq_core.errors import CqError, printable
from cq_core.io.calibration_file import CalibrationFile
from cq_core.io.safetensors_io import TensorLocation, write_safetensors
from cq_core.io.shards import ShardLayout, write_shard_set
from cq_core.io.source import Source
from cq_core.numerics.metrics import sqnr_db, weight_error_energy
from cq_core.numerics.second_moment import features_of
from cq_core.plugin.executors import ExecutionSettings, Executor, PortableTensor
from cq_core.plugin.types import MetadataWriter, OptimizeContext, Optimizer

CPU = torch.device("cpu")
#: The pipeline never holds less than this in flight, so small tensors still overlap.


#: The pipeline never holds less than this in flight, so small tensors still overlap.
MIN_BUDGET_BYTES = 64 << 20


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
    calibration_rows: int | None = None,
) -> ItemOutcome:
    """The work on one tensor: a pure function of the tensor and its options (``origin``: the
    file it was read from, for messages; ``calibration_rows``: the input rows behind ``stats``,
    where the calibration file records them).

    Nothing here touches shared state, so it may run on any thread, on any
    device, in any process. On a GPU the weight is moved there and the
    stored tensors come back through pinned memory.
    """
    tick = time.perf_counter()
    result = TensorResult.planned(item)
    if item.action == KEEP:  # in its planned dtype (a decoded quantized weight comes as float32)
        return ItemOutcome([(item.name, tensor if tensor.dtype == item.dtype else tensor.to(item.dtype))], result)
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
    optimizer = item.optimizer or opt
    k = weight.shape[-1]
    if (calibration_rows is not None and calibration_rows < k and stats is not None
            and features_of(stats) is not None and not isinstance(optimizer, RoundToNearest) and result.note):
        # H of r < K rows has rank r: an optimizer fits the error into its null space, so the gain it
        # measures on those rows overstates what other inputs see.
        result.note += (f" (H from {calibration_rows} calibration rows for {k} inputs: fewer rows than inputs "
                        "overfit them, so other inputs gain less; capture more rows)")
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
        if self.calibration is None:
            return None
        shape = self.item.shape
        return self.calibration.get(self.item.layer, features=shape[-1] if len(shape) == 2 else None)

    def run(self, tensor: torch.Tensor, device: torch.device, stats: Mapping[str, torch.Tensor] | None) -> ItemOutcome:
        rows = None
        if self.calibration is not None and self.calibration.rows is not None:
            name = self.calibration.resolve(self.item.layer)
            rows = self.calibration.rows.get(name) if name is not None else None
        return process_item(self.item, tensor, self.optimizer, self.writer, measure=self.measure, device=device,
                            stats=stats, origin=None if self.location is None else str(self.location.path),
                            calibration_rows=rows if isinstance(rows, int) else None)


def tensor_jobs(
    plan: Plan,
    source: Source,
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
        jobs.append(TensorJob(item, opt, writer, measure, source.location(item.name), calibration))
    return jobs


class ConversionRun:
    """The jobs of one conversion and its one ordered writer (:class:`cq_core.plugin.executors.Conversion`)."""

    def __init__(
        self,
        jobs: list[TensorJob],
        source: Source,
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


def execute_plan(
    plan: Plan,
    source: Source,
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
                bar.set_postfix_str(printable(job.name)[-40:], refresh=False)
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
            outcomes.get(item.name) or TensorResult.planned(item)
        )


def input_bytes(item: TensorPlan) -> int:
    return math.prod(item.shape) * item.dtype.itemsize


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
