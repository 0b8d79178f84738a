"""How one conversion runs, as opposed to what it writes: :class:`RunSettings`.

None of these settings changes the bytes of the output (the recipe does,
:mod:`cq_core.engine.recipe`); they decide whether anything is written, where the
work runs, how fast, how the output is split into files and what is shown.
Each setting is declared once, with its flag and help (:mod:`cq_core.engine.fields`),
and the CLI's options are made from the declarations.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from cq_core.engine.fields import Anything, Flag, Integer, Size, Switch, Table, Text, declare, field_specs, parse_key_values
from cq_core.plugin.executors import ExecutionSettings


@dataclass(frozen=True)
class RunSettings:
    """The execution settings of :func:`cq_core.convert` (``cq convert``'s flags of the same names).

    ``dry_run``: plan only; nothing is read but the header (a size budget reads the weights
    to measure them) and nothing is written. ``overwrite``: replace an existing output.
    ``measure``: decode every quantized layer to report its weight SQNR. ``progress``: True
    shows a bar on stderr; a callable is called as ``progress(done, total)`` after each
    tensor is written. ``quiet``: the executor keeps what it starts from printing.
    ``device``: ``auto`` (None: the same), ``cpu``, ``cuda`` or ``cuda:N``. ``threads``: CPU
    threads for the tensor work (None: all cores). ``max_shard_size``: bytes, or a size like
    ``"5GB"``: write shards of at most that size and an index. ``single_file``: one file even
    for a sharded input. ``pipelined``: overlap reading, work and writing (False runs them one
    after another; the bytes are the same). ``executor``: where the per-tensor work runs
    (``local`` when None, or one a plugin registers, e.g. ``ray``) with ``executor_options``.
    """

    dry_run: bool = declare(
        False, Switch(), "--dry-run",
        help="Print what would happen to each tensor and why, and the predicted size; read no data (except "
             "with a size budget, which measures each layer's error).")
    overwrite: bool = declare(False, Switch(), "--overwrite", help="Replace an existing output file.")
    measure: bool = declare(
        True, Switch(), Flag(("--no-measure",), invert=True),
        help="Skip decoding each layer to report its SQNR (faster; cq verify can do it later).")
    progress: bool | Callable[[int, int], None] = declare(False, Anything())
    quiet: bool = declare(
        False, Switch(), "-q", "--quiet", help="No progress bar and no tables: one summary line (and errors).")
    device: str | None = declare(
        None, Text(optional=True), "--device",
        help="Where tensors are quantized: auto (CUDA when available), cpu, cuda[:N]. [default: auto]")
    threads: int | None = declare(
        None, Integer(), "--threads", help="CPU threads for the tensor work. Default: all cores.")
    max_shard_size: int | None = declare(
        None, Size(), "--max-shard-size", help="Write shards of at most this size (e.g. 5GB) plus an index.")
    single_file: bool = declare(
        False, Switch(), "--single-file", help="Write one file even when the input is sharded.")
    pipelined: bool = declare(True, Switch())
    executor: str | None = declare(
        None, Text(optional=True), "--executor",
        help="Where the per-tensor work runs: 'local' (threads or the CUDA device of this process) or an "
             "executor a plugin adds, e.g. 'ray' (cq_ray). Never changes the bytes. [default: local]")
    executor_options: Mapping[str, Any] = declare(
        {}, Table(), Flag(("--executor-option",), parse=lambda pairs: parse_key_values(pairs, "--executor-option")),
        help="Executor option KEY=VALUE (repeatable); 'cq executors' lists them.")

    def __post_init__(self) -> None:
        for spec in field_specs(RunSettings):
            value = getattr(self, spec.name)
            normal = spec.kind.normalise(value, spec.label_for(None))
            if normal is not value:
                object.__setattr__(self, spec.name, normal)

    def execution(self) -> ExecutionSettings:
        """What an executor is told (:class:`cq_core.plugin.executors.ExecutionSettings`)."""
        return ExecutionSettings(device=None if self.device is None else str(self.device), threads=self.threads,
                                 pipelined=self.pipelined, quiet=self.quiet)
