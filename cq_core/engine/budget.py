"""A size budget: choose each layer's format by measurement so the output fits a size.

``cq convert --target-size 10GB`` (or ``--bits-per-weight 5.5``) gives every
layer that the global ``--format`` would decide (no ``--layer`` rule,
``--exclude``, preset or ``--heur`` fixed it) a choice among the allowed
formats (``--formats``, or the formats stock ComfyUI runs natively on
``--gpu``: the formats whose ``native_gpus`` name it), high precision included, and picks the
choice with the least total predicted error whose output fits the size.
What the rules fix is charged to the budget as it is.

Three steps, each with one home here:

1. **Candidate table** (:func:`candidate_table`): per free layer, each allowed
   format that accepts it (the plan's own refusal rules, shape guard
   included) and its output bytes, known from the shape alone
   (``Format.stored_specs`` plus the metadata writer's tensors) before any
   data is read. The smallest reachable size is known here too, so an
   impossible budget fails before any weight is read.
2. **Candidate errors** (:func:`measure_errors`): every free weight is read
   once, streamed through :func:`cq_core.engine.pipeline.run_pipelined`
   (memory bounded like a conversion), and encoded once per candidate with
   round-to-nearest (``Format.encode``). RTN rather than the recipe's
   optimizer: it costs one encode per candidate instead of one optimization,
   and an optimizer never ends worse than RTN (it falls back to it), so each
   predicted error bounds the written one from above. The optimizer then
   runs on the chosen format only, when the file is written. The error of a
   candidate (:func:`error_energies`, :func:`predicted_error`) is its relative
   error times the layer's importance: ``r · N K · √depth · role``. Data-free,
   ``r = ‖E‖²/‖W‖²`` (``E = decode(encode(W)) - W``); with calibration
   statistics (``H = E[x xᵀ]`` of the layer's input, from ``cq calibrate``)
   ``r`` is the geometric mean of that and the relative output error
   ``tr(E H Eᵀ)/tr(W H Wᵀ)``. ``N K`` is the weight count, ``depth`` the
   layer's relative depth in its stack (:func:`depth_weights`), ``role``
   :data:`QUERY_KEY_WEIGHT` for an attention query or key projection, 1
   otherwise (:func:`importance_weights`). Of the measures compared on
   all-MiniLM-L6-v2 it predicted the embedding error about best (Spearman
   0.925 data-free, 0.931 with calibration statistics; the output error
   alone, ``tr(E H Eᵀ)``, 0.50; docs/budget.md).
3. **Exact multiple-choice knapsack** (:func:`solve_knapsack`): minimise the
   sum of the chosen candidates' errors subject to the sum of their bytes
   being at most the capacity. Solved exactly by dynamic programming over
   the Pareto frontier of partial solutions (sizes in whole bytes, so nothing
   is rounded, unlike a DP over a discretised size axis, which would either
   lose exactness or need an array as long as the budget in bytes), pruned
   by a Lagrangian bound: for any λ >= 0 the remaining layers add at least
   ``Σ min_k (e_k + λ s_k) - λ · (room left)``, and a state whose bound
   exceeds a known feasible solution's error cannot be optimal. λ is the
   optimum of the Lagrangian dual (found by bisection), which also yields
   that feasible solution. Exactness is tested against brute force.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from tqdm import tqdm

from cq_core.engine.checks import check_finite
from cq_core.engine.pipeline import TensorReader, read_tensor, run_pipelined
from cq_core.engine.plan import InstanceCache, Plan, TensorPlan, quantized_outputs
from cq_core.errors import UsageError
from cq_core.io.calibration_file import CalibrationFile, not_positive_semidefinite
from cq_core.numerics.second_moment import dense_second_moment, features_of
from cq_core.engine.report import Report
from cq_core.io.sizes import exact_bytes, human_bytes
from cq_core.io.source import Source
from cq_core.numerics.metrics import rows_per_chunk
from cq_core.plugin.comfyui_versions import comfyui_loads, not_loaded_reason
from cq_core.plugin.types import Format, MetadataWriter

#: The ``--formats`` name for "keep this layer in high precision" (as the source stores it:
#: bf16 for most checkpoints; an fp32 or fp16 source keeps its own dtype).
HIGH_PRECISION = "bf16"

#: ``--gpu``: the GPU families a size budget knows. Which formats each runs natively is the
#: formats' own word (:attr:`cq_core.plugin.types.Format.native_gpus`).
GPU_CHOICES = ("blackwell", "hopper", "ada", "older")


# ---------------------------------------------------------------------------
# The budget and the allowed formats
# ---------------------------------------------------------------------------


def capacity_bytes(target_bytes: int | None, bits_per_weight: float | None, parameters: int) -> int:
    """The size budget in bytes: ``target_bytes``, or ``bits_per_weight`` times the input's
    ``parameters`` (every tensor's elements) / 8."""
    if target_bytes is not None:
        return int(target_bytes)
    return int(math.floor(float(bits_per_weight) * parameters / 8))


def allowed_format_names(formats: Sequence[str], gpu: str | None, default_format: str,
                         installed: Mapping[str, type[Format]], comfyui_version: str | None = None) -> tuple[str, ...]:
    """The names a budget chooses among: ``formats`` as given; else the ``installed`` formats
    (name -> class, in registration order) whose ``native_gpus`` name ``gpu`` and that
    ComfyUI ``comfyui_version`` loads (any release, when None), and high precision; else the
    global format and high precision."""
    if formats:
        return tuple(dict.fromkeys(formats))
    if gpu is not None:
        return (*(name for name, cls in installed.items() if gpu in cls.native_gpus
                  and (comfyui_version is None or comfyui_loads(cls, comfyui_version))), HIGH_PRECISION)
    return (default_format, HIGH_PRECISION)


# ---------------------------------------------------------------------------
# The candidate table
# ---------------------------------------------------------------------------


@dataclass
class Candidate:
    """One way to store one layer: ``format`` (None: high precision), its output ``nbytes``,
    and its predicted ``error`` (set by :func:`measure_errors`)."""

    format: Format | None
    nbytes: int
    error: float = math.nan

    @property
    def name(self) -> str:
        return HIGH_PRECISION if self.format is None else self.format.name


@dataclass
class BudgetLayer:
    item: TensorPlan
    candidates: list[Candidate]
    #: the layer's importance (:func:`importance_weights`), which weighs its relative error
    importance: float = 1.0


@dataclass
class BudgetTable:
    """The free layers with their candidates, and the bytes the rest of the plan fixes."""

    layers: list[BudgetLayer]
    #: bytes of every output tensor that is not a free layer's
    fixed_bytes: int

    @property
    def smallest_bytes(self) -> int:
        return self.fixed_bytes + sum(min(c.nbytes for c in layer.candidates) for layer in self.layers)


def candidate_table(plan: Plan, writer: MetadataWriter, full_precision_mm: bool = False) -> BudgetTable:
    """Every free layer of ``plan`` (one with :attr:`TensorPlan.candidates`) and the output bytes
    of each candidate, from shapes alone."""
    layers: list[BudgetLayer] = []
    fixed = 0
    for item in plan.items:
        if not item.candidates:
            fixed += sum(spec.nbytes for _, spec in item.outputs)
            continue
        layer = item.name.removesuffix(".weight")
        candidates = []
        for fmt in item.candidates:
            if fmt is None:
                nbytes = math.prod(item.shape) * item.dtype.itemsize
            else:
                _, outputs = quantized_outputs(layer, fmt, item.shape, writer, full_precision_mm)
                nbytes = sum(spec.nbytes for _, spec in outputs)
            candidates.append(Candidate(fmt, nbytes))
        layers.append(BudgetLayer(item, candidates))
    importance = importance_weights([item.name for item in plan.items])
    for budget_layer in layers:
        budget_layer.importance = importance[budget_layer.item.name]
    return BudgetTable(layers, fixed)


_BLOCK_INDEX = re.compile(r"\.(\d+)\.")


def depth_weights(names: Sequence[str]) -> dict[str, float]:
    """Each tensor name's relative depth in its stack of blocks: ``(i + 1) / n`` for the i-th of
    n blocks sharing the name before its first numeric component (``blocks.3.attn`` in
    ``blocks.0..7``: 0.5), 1.0 for a name without one. Errors made deeper in a stack reach
    the output through fewer later blocks to dilute them (measured on all-MiniLM-L6-v2:
    docs/budget.md)."""
    found = {name: _BLOCK_INDEX.search(name) for name in names}
    counts: dict[str, int] = {}
    for match in found.values():
        if match is not None:
            family = match.string[: match.start()]
            counts[family] = max(counts.get(family, 0), int(match.group(1)) + 1)
    return {
        name: 1.0 if match is None else (int(match.group(1)) + 1) / counts[match.string[: match.start()]]
        for name, match in found.items()
    }


#: The last name component of an attention query or key projection, across the families cq
#: knows: BERT (``query``, ``key``), LLaMA/Qwen/Gemma/CLIP (``q_proj``, ``k_proj``), T5 and WAN
#: (``q``, ``k``), diffusers and ComfyUI's LTX/Qwen-Image (``to_q``, ``to_k``, ``add_q_proj``,
#: ``add_k_proj``), Mistral's native names (``wq``, ``wk``). A fused ``qkv`` is not one.
_QUERY_KEY = re.compile(r"(?:^|\.)(?:query|key|q|k|q_proj|k_proj|to_q|to_k|add_q_proj|add_k_proj|wq|wk)\.weight$")
#: A query or key projection's importance relative to another layer of its size and depth: its
#: error moves only the attention weights, through a softmax, while a value, output or MLP
#: projection's error is added to what the layer passes on. Measured on all-MiniLM-L6-v2: query
#: and key layers alone in nvfp4 cost 0.04-0.47x (median 0.17x) the embedding error of the value
#: layer of the same block; every weight from 0.1 to 0.5 kept the budget above every baseline
#: there (docs/budget.md).
QUERY_KEY_WEIGHT = 0.3


def is_query_key_projection(name: str) -> bool:
    """Whether the tensor ``name`` (``....weight``) is an attention query or key projection."""
    return _QUERY_KEY.search(name) is not None


def importance_weights(names: Sequence[str]) -> dict[str, float]:
    """Each tensor name's importance for the budget's predicted error: ``√depth``
    (:func:`depth_weights`) times :data:`QUERY_KEY_WEIGHT` for a query or key projection
    (:func:`is_query_key_projection`), 1 otherwise. The square root of the depth ranked
    all-MiniLM-L6-v2's layers better than the depth itself (docs/budget.md)."""
    depths = depth_weights(names)
    return {
        name: math.sqrt(depths[name]) * (QUERY_KEY_WEIGHT if is_query_key_projection(name) else 1.0)
        for name in names
    }


# ---------------------------------------------------------------------------
# Candidate errors
# ---------------------------------------------------------------------------

@dataclass(frozen=True)
class ErrorEnergies:
    """One candidate's error energies, summed over the (N, K) weight in float64.

    ``noise = ‖E‖²`` and ``signal = ‖W‖²`` (``E = decode - W``); with calibration statistics
    (``H``, (K, K), ``E[x xᵀ]`` of the layer's input) also the output energies per token
    ``output_noise = tr(E H Eᵀ) = E‖E x‖²`` and ``output_signal = tr(W H Wᵀ)``, else None.
    """

    noise: float
    signal: float
    output_noise: float | None = None
    output_signal: float | None = None

    @staticmethod
    def _ratio(noise: float, signal: float) -> float:
        if signal <= 0.0:
            return 0.0 if noise == 0.0 else math.inf
        return noise / signal

    @property
    def relative(self) -> float:
        """``‖E‖²/‖W‖²``: 1/SQNR of the weight."""
        return self._ratio(self.noise, self.signal)

    @property
    def output_relative(self) -> float | None:
        """``tr(E H Eᵀ)/tr(W H Wᵀ)``: 1/SQNR of the layer's output; None without ``H``."""
        return None if self.output_noise is None else self._ratio(self.output_noise, self.output_signal)


def error_energies(
    weight: torch.Tensor, decoded_rows: Callable[[int, int], torch.Tensor], hessian: torch.Tensor | None = None,
) -> ErrorEnergies:
    """The :class:`ErrorEnergies` of one stored layer, walking the (N, K) ``weight`` in row chunks.

    ``decoded_rows(start, stop)`` gives float32 rows of the decode (``Format.row_decoder``);
    ``hessian`` is H, (K, K) float32, or None (data-free).
    """
    signal = noise = output_signal = output_noise = 0.0
    step = rows_per_chunk(tuple(weight.shape))
    h = hessian.to(weight.device, torch.float32) if hessian is not None else None
    for start in range(0, weight.shape[0], step):
        stop = min(start + step, weight.shape[0])
        ref = weight[start:stop].float()
        error = decoded_rows(start, stop).to(ref.device).float() - ref
        signal += float(ref.double().square().sum())
        noise += float(error.double().square().sum())
        if h is not None:
            output_signal += float(((ref @ h) * ref).double().sum())
            output_noise += float(((error @ h) * error).double().sum())
    if h is None:
        return ErrorEnergies(noise, signal)
    return ErrorEnergies(noise, signal, output_noise, output_signal)


def predicted_error(energies: ErrorEnergies, weights: int, importance: float = 1.0) -> float:
    """A candidate's predicted error, the quantity the knapsack sums: ``r · weights · importance``.

    ``r`` is the relative weight error ``‖E‖²/‖W‖²``, or with calibration statistics the
    geometric mean of that and the relative output error ``tr(E H Eᵀ)/tr(W H Wᵀ)``;
    ``weights`` is ``N K``; ``importance`` comes from :func:`importance_weights`. The geometric
    mean rather than the output error alone: on all-MiniLM-L6-v2 the relative output error of
    a layer reading a few very large input channels (the FFN's second layer) was 2-21x below its
    relative weight error while its embedding error was not; a budget on the output error alone
    kept layers in bf16 by putting those in nvfp4, 1.2 dB below uniform fp8 at fp8's size
    (docs/budget.md). Units: none (a relative energy times a count).
    """
    relative = energies.relative
    output_relative = energies.output_relative
    if output_relative is not None:
        relative = math.sqrt(relative * output_relative) if math.isfinite(relative * output_relative) else math.inf
    return relative * weights * importance


def candidate_errors(
    weight: torch.Tensor, candidates: Sequence[Candidate], hessian: torch.Tensor | None = None,
    importance: float = 1.0, *, layer: str = "?",
) -> list[float]:
    """Each candidate's :func:`predicted_error` after one round-to-nearest encode (high precision: 0).
    Raises :class:`CqError` naming ``layer`` when ``hessian`` gives a negative output error (an H
    that is not positive semi-definite, which :func:`~cq_core.io.calibration_file.check_statistics`
    could not see from its O(K²) tests)."""
    shape = tuple(weight.shape)
    errors = []
    for candidate in candidates:
        if candidate.format is None:
            errors.append(0.0)
            continue
        stored = candidate.format.encode(weight)
        energies = error_energies(weight, candidate.format.row_decoder(stored, shape), hessian)
        if hessian is not None and min(energies.output_noise, energies.output_signal) < 0:
            raise not_positive_semidefinite(layer)
        errors.append(predicted_error(energies, weight.numel(), importance))
        del stored
    return errors


def measure_errors(
    table: BudgetTable,
    read: Callable[[TensorPlan], torch.Tensor],
    *,
    hessian_of: Callable[[str, int], torch.Tensor | None] = lambda layer, features: None,
    device: torch.device | None = None,
    progress: Callable[[], None] | None = None,
) -> None:
    """Fill every candidate's ``error``: each free weight read once, through the pipeline
    (reading the next weight while this one is encoded; at most about three weights in memory)."""
    layers = [layer for layer in table.layers if any(c.format is not None for c in layer.candidates)]
    if not layers:
        for layer in table.layers:
            for candidate in layer.candidates:
                candidate.error = 0.0
        return

    def work(layer: BudgetLayer, tensor: torch.Tensor) -> list[float]:
        weight = tensor.to(device) if device is not None and device.type != "cpu" else tensor
        name = layer.item.name.removesuffix(".weight")
        hessian = hessian_of(name, weight.shape[-1])
        return candidate_errors(weight, layer.candidates, hessian, layer.importance, layer=name)

    def write(layer: BudgetLayer, errors: list[float]) -> None:
        for candidate, error in zip(layer.candidates, errors, strict=True):
            candidate.error = error
        if progress is not None:
            progress()

    def cost(layer: BudgetLayer) -> int:
        return math.prod(layer.item.shape) * (layer.item.dtype.itemsize + 8)  # the weight, a float32 decode

    run_pipelined(
        layers, read=lambda layer: read(layer.item), work=work, write=write, cost=cost,
        budget_bytes=max(3 * max(cost(layer) for layer in layers), 64 << 20),
    )
    for layer in table.layers:
        for candidate in layer.candidates:
            if candidate.format is None:
                candidate.error = 0.0


# ---------------------------------------------------------------------------
# The exact multiple-choice knapsack
# ---------------------------------------------------------------------------


def _lagrangian(sizes: list[np.ndarray], errors: list[np.ndarray], capacity: int) -> tuple[float, list[int] | None]:
    """The Lagrangian dual's optimum λ (bisection on its subgradient), and the feasible
    choice that the smallest-size side of it picks (None when even that does not fit)."""

    def pick(lam: float) -> tuple[list[int], int]:
        choice = [int(np.lexsort((s, e + lam * s))[0]) for s, e in zip(sizes, errors, strict=True)]
        return choice, sum(int(s[k]) for s, k in zip(sizes, choice, strict=True))

    choice, used = pick(0.0)
    if used <= capacity:
        return 0.0, choice
    low, high = 0.0, 1.0
    for _ in range(200):  # grow until the relaxed choice fits
        choice, used = pick(high)
        if used <= capacity:
            break
        low, high = high, high * 4.0
    else:
        return high, None
    feasible = choice
    for _ in range(100):
        mid = (low + high) / 2
        choice, used = pick(mid)
        if used <= capacity:
            high, feasible = mid, choice
        else:
            low = mid
        if high - low <= 1e-12 * high:
            break
    return high, feasible


def solve_knapsack(
    sizes: Sequence[Sequence[int]], errors: Sequence[Sequence[float]], capacity: int
) -> list[int] | None:
    """Exactly one candidate per class, total size <= ``capacity``, least total error.

    ``sizes[i][k]`` (whole bytes) and ``errors[i][k]`` (>= 0) of candidate k of class i.
    Returns the index chosen in each class, or None when no choice fits. Among
    choices of equal total error the smaller total size wins. See the module
    docstring for the method (Pareto-frontier DP with Lagrangian pruning).
    """
    n = len(sizes)
    if n == 0:
        return [] if capacity >= 0 else None
    size_arrays = [np.asarray(s, dtype=np.int64) for s in sizes]
    error_arrays = [np.asarray(e, dtype=np.float64) for e in errors]
    if sum(int(s.min()) for s in size_arrays) > capacity:
        return None
    lam, feasible = _lagrangian(size_arrays, error_arrays, capacity)
    upper = math.inf
    if feasible is not None:
        upper = float(sum(e[k] for e, k in zip(error_arrays, feasible, strict=True)))
    tolerance = 1e-9 * abs(upper) + 1e-300 if math.isfinite(upper) else math.inf
    # Suffix sums: smallest size still to come, and the Lagrangian bound of the rest.
    min_rest = np.zeros(n + 1, dtype=np.int64)
    bound_rest = np.zeros(n + 1, dtype=np.float64)
    for i in range(n - 1, -1, -1):
        min_rest[i] = min_rest[i + 1] + size_arrays[i].min()
        bound_rest[i] = bound_rest[i + 1] + float((error_arrays[i] + lam * size_arrays[i]).min())

    frontier_size = np.zeros(1, dtype=np.int64)
    frontier_error = np.zeros(1, dtype=np.float64)
    steps: list[tuple[np.ndarray, np.ndarray]] = []
    for i in range(n):
        s, e = size_arrays[i], error_arrays[i]
        count = len(frontier_size)
        new_size = (frontier_size[None, :] + s[:, None]).ravel()
        new_error = (frontier_error[None, :] + e[:, None]).ravel()
        parent = np.tile(np.arange(count, dtype=np.int64), len(s))
        choice = np.repeat(np.arange(len(s), dtype=np.int64), count)
        keep = new_size + min_rest[i + 1] <= capacity
        if math.isfinite(upper):
            bound = new_error + bound_rest[i + 1] - lam * (capacity - new_size).astype(np.float64)
            keep &= bound <= upper + tolerance
        new_size, new_error, parent, choice = new_size[keep], new_error[keep], parent[keep], choice[keep]
        order = np.lexsort((new_error, new_size))
        new_size, new_error, parent, choice = new_size[order], new_error[order], parent[order], choice[order]
        # Pareto frontier: each kept state has strictly less error than every smaller one.
        best_before = np.concatenate(([math.inf], np.minimum.accumulate(new_error)[:-1]))
        keep = new_error < best_before
        frontier_size, frontier_error = new_size[keep], new_error[keep]
        steps.append((parent[keep], choice[keep]))
        if len(frontier_size) == 0:
            return None  # pruning never removes the optimum: nothing fits
    index = int(np.argmin(frontier_error))  # the frontier's errors fall with size: the last
    chosen = [0] * n
    for i in range(n - 1, -1, -1):
        parent, choice = steps[i]
        chosen[i] = int(choice[index])
        index = int(parent[index])
    return chosen


# ---------------------------------------------------------------------------
# Fitting a plan
# ---------------------------------------------------------------------------


@dataclass
class BudgetResult:
    """What a budget decided: shown by ``--dry-run`` and the report (``report.budget``)."""

    target_bytes: int
    predicted_bytes: int
    smallest_bytes: int
    predicted_error: float
    formats: tuple[str, ...]
    error_measure: str
    choices: dict[str, str]
    achieved_bytes: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "target_bytes": self.target_bytes, "predicted_bytes": self.predicted_bytes,
            "achieved_bytes": self.achieved_bytes, "smallest_bytes": self.smallest_bytes,
            "predicted_error": self.predicted_error, "formats": list(self.formats),
            "error_measure": self.error_measure, "choices": dict(self.choices),
        }


def impossible_budget(flag: str, target: int, smallest: int, formats: Sequence[str]) -> UsageError:
    return UsageError(
        f"{flag} {exact_bytes(target)} is below the smallest size the allowed formats "
        f"({', '.join(formats)}) reach: {exact_bytes(smallest)}."
    )


def choose_formats(
    table: BudgetTable,
    target: int,
    finish: Callable[[Mapping[str, tuple[Format | None, str]]], Plan],
    *,
    flag: str,
    formats: Sequence[str],
    error_measure: str,
) -> tuple[Plan, BudgetResult]:
    """Solve the knapsack for ``target`` bytes of output file and build the plan with the
    choice (``finish(choices)``: the plan, its metadata complete). The header's size depends
    a little on the choice (each layer's JSON): when the file would exceed ``target``, the
    capacity shrinks by the excess and the knapsack is solved again."""
    sizes = [[c.nbytes for c in layer.candidates] for layer in table.layers]
    errors = [[c.error for c in layer.candidates] for layer in table.layers]
    header = 0
    for _attempt in range(8):
        capacity = target - table.fixed_bytes - header
        picked = solve_knapsack(sizes, errors, capacity)
        if picked is None:
            smallest_choice = [int(np.argmin(s)) for s in sizes]
            plan = finish(_choices(table, smallest_choice))
            raise impossible_budget(flag, target, plan.file_bytes, formats)
        plan = finish(_choices(table, picked))
        total = plan.file_bytes
        if total <= target:
            result = BudgetResult(
                target, total, table.smallest_bytes + header, float(sum(e[k] for e, k in zip(errors, picked, strict=True))), tuple(formats),
                error_measure, {layer.item.name: layer.candidates[k].name
                                for layer, k in zip(table.layers, picked, strict=True)},
            )
            return plan, result
        header = total - (table.fixed_bytes + sum(s[k] for s, k in zip(sizes, picked, strict=True)))
    raise AssertionError("the header size did not settle")  # pragma: no cover (it shrinks monotonically)


def _choices(table: BudgetTable, picked: Sequence[int]) -> dict[str, tuple[Format | None, str]]:
    choices = {}
    for layer, k in zip(table.layers, picked, strict=True):
        candidate = layer.candidates[k]
        others = ", ".join(c.name for c in layer.candidates if c is not candidate)
        why = f"size budget: {candidate.name} (predicted error {candidate.error:.3g}; also allowed: {others or 'none'})"
        choices[layer.item.name] = (candidate.format, why)
    return choices


# ---------------------------------------------------------------------------
# Fitting a plan to the budget
# ---------------------------------------------------------------------------


def budget_candidates(formats: Sequence[str], gpu: str | None, default_format: str,
                      installed: Mapping[str, type[Format]], instances: InstanceCache,
                      comfyui_version: str | None = None) -> list[Format | None]:
    """The formats a size budget chooses among (None: high precision), each built once
    (:func:`allowed_format_names` says which). Raises :class:`UsageError` when ``formats``
    names one that ComfyUI ``comfyui_version`` does not load."""
    names = allowed_format_names(formats, gpu, default_format, installed, comfyui_version)
    if gpu is not None and not formats and comfyui_version is not None and names == (HIGH_PRECISION,):
        native = [cls for cls in installed.values() if gpu in cls.native_gpus]
        if native:
            reasons = "; ".join(not_loaded_reason(cls, comfyui_version) or cls.name for cls in native)
            raise UsageError(f"--comfyui-version {comfyui_version} loads none of the formats --gpu {gpu} runs "
                             f"natively ({reasons}): the budget would have only bf16 to choose.")
    allowed = [None if name == HIGH_PRECISION else instances.format(name) for name in names]
    for fmt in allowed if comfyui_version is not None and formats else ():
        reason = None if fmt is None else not_loaded_reason(fmt, comfyui_version)
        if reason is not None:
            raise UsageError(f"--formats names {fmt.name!r}, but {reason} (--comfyui-version); leave it out.")
    return allowed


def fit_budget(
    plan: Plan,
    source: Source,
    writer: MetadataWriter,
    finish: Callable[[Mapping[str, tuple[Format | None, str]]], Plan],
    calibration: CalibrationFile | None,
    device: torch.device,
    allowed: Sequence[Format | None],
    *,
    target_size: int | None,
    bits_per_weight: float | None,
    full_precision_mm: bool = False,
    progress: bool = False,
) -> tuple[Plan, BudgetResult]:
    """Choose each free layer's format for the size budget ``target_size`` bytes or
    ``bits_per_weight`` (the recipe's fields);
    ``finish(choices)`` makes the plan with those choices, its metadata complete; ``progress``
    shows a bar on stderr while the candidates' errors are measured.

    Fails before reading any weight when even the smallest choice exceeds the budget, and on
    the first free weight with NaN or Inf (:func:`check_finite`; ``--nonfinite keep`` has kept
    those out of the budget already). With ``calibration``, every free layer needs its
    statistics (the errors use ``tr(E H Eᵀ)``).
    """
    flag = "--target-size" if target_size is not None else f"--bits-per-weight {bits_per_weight:g} ="
    parameters = sum(math.prod(info.shape) for info in source.tensors.values())
    target = capacity_bytes(target_size, bits_per_weight, parameters)
    formats = list(dict.fromkeys(HIGH_PRECISION if fmt is None else fmt.name for fmt in allowed))
    table = candidate_table(plan, writer, full_precision_mm)
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

        def hessian_of(layer: str, features: int) -> torch.Tensor | None:
            stats = calibration.get(layer, features=features)
            if features_of(stats) is None:
                raise UsageError(f"--calibration {calibration.path}: has no H for layer {layer!r} (only "
                                 f"{', '.join(sorted(stats))}), which the size budget's error measure needs.")
            return dense_second_moment(stats)
    else:
        def hessian_of(layer: str, features: int) -> torch.Tensor | None:
            return None

    def read(item: TensorPlan) -> torch.Tensor:
        tensor = read_tensor(source, reader, item.name)
        location = source.location(item.name)
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


def all_high_precision_warning(report: Report) -> str | None:
    """A budget that holds every layer it chooses for in high precision quantizes nothing: say
    why and what would change it; None otherwise."""
    budget = report.budget
    if budget is None or report.quantized or not budget["choices"] or set(budget["choices"].values()) != {HIGH_PRECISION}:
        return None
    was, holds = ("would be", "would hold") if report.dry_run else ("was", "holds")
    advice = ("a smaller target makes it quantize" if set(budget["formats"]) - {HIGH_PRECISION}
              else f"--formats allows only {HIGH_PRECISION}: add a format to quantize to")
    return (f"the size budget ({human_bytes(budget['target_bytes'])}) holds every layer it chooses for in "
            f"{HIGH_PRECISION}, so none {was} quantized and the output {holds} the input's tensors unchanged; "
            f"{advice}.")


def sharded_over_budget_warning(report: Report) -> str | None:
    """A sharded output over the budget's target (each extra shard repeats the metadata the
    budget counted once); None otherwise."""
    budget = report.budget
    if budget is None or report.output_bytes <= budget["target_bytes"]:
        return None
    over = report.output_bytes - budget["target_bytes"]
    return (f"the sharded output {'would be' if report.dry_run else 'is'} {over} bytes over the size budget: the "
            "budget counts one file's header and each extra shard repeats the metadata; --single-file or fewer "
            "shards (a larger --max-shard-size) keep it within.")
