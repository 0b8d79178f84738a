"""What a conversion did: per tensor and in total."""

from __future__ import annotations

import math
import resource
import sys
from dataclasses import asdict, dataclass, field
from typing import Any

from cq_core.numerics.metrics import sqnr_json


@dataclass
class TensorResult:
    """One input tensor's line in the report: what happened to it, why, and how well."""

    name: str
    action: str
    reason: str
    shape: tuple[int, ...]
    #: the input dtype's torch name (``bfloat16``)
    dtype: str
    format: str | None = None
    sqnr_db: float | None = None
    seconds: float = 0.0
    note: str | None = None

    @classmethod
    def planned(cls, item: Any) -> TensorResult:
        """The line for a plan entry (:class:`cq_core.engine.plan.TensorPlan`) before its work ran."""
        return cls(item.name, item.action, item.reason, tuple(item.shape), str(item.dtype).removeprefix("torch."),
                   item.format.name if item.format is not None else None)


@dataclass
class Report:
    input: str
    output: str | None
    format: str
    optimizer: str
    preset: str | None = None
    preset_reason: str | None = None
    #: the input's layout when it was converted to ComfyUI's (e.g. "diffusers-flux: ..."), else None
    layout: str | None = None
    #: every component found ({"prefix", "preset", "reason"}), the main model first
    components: list[dict[str, str]] = field(default_factory=list)
    dry_run: bool = False
    #: a dry run: the output it would write (the index, for a sharded one); None otherwise
    would_write: str | None = None
    #: the recipe record written to the output (:class:`cq_core.engine.recipe.RecipeRecord`)
    recipe: dict[str, Any] = field(default_factory=dict)
    tensors: list[TensorResult] = field(default_factory=list)
    #: the input's bytes on disk, header included (every shard)
    input_bytes: int = 0
    #: the output's bytes on disk, header included: measured after writing (every shard); in a dry
    #: run predicted as one file (each extra shard of a sharded output adds its own header)
    output_bytes: int = 0
    quantized_params: int = 0
    total_params: int = 0
    seconds: float = 0.0
    peak_rss_bytes: int = 0
    #: what a size budget chose (:class:`cq_core.engine.budget.BudgetResult` as JSON), else None
    budget: dict[str, Any] | None = None
    #: sentences the user should read that do not stop the run (the CLI prints them on stderr)
    warnings: list[str] = field(default_factory=list)

    @property
    def quantized(self) -> list[TensorResult]:
        return [t for t in self.tensors if t.action == "quantize"]

    @property
    def mparams_per_second(self) -> float:
        return self.total_params / self.seconds / 1e6 if self.seconds else 0.0

    @property
    def mean_sqnr_db(self) -> float | None:
        values = [t.sqnr_db for t in self.quantized if t.sqnr_db is not None and math.isfinite(t.sqnr_db)]
        return sum(values) / len(values) if values else None

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        for tensor in data["tensors"]:
            tensor["shape"] = list(tensor["shape"])
            tensor.update(sqnr_json(tensor["sqnr_db"]))  # JSON has no inf: null and "exact"
        data["mparams_per_second"] = self.mparams_per_second
        data["mean_sqnr_db"] = self.mean_sqnr_db
        return data


def peak_rss_bytes() -> int:
    """This process's peak resident set size so far."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024
