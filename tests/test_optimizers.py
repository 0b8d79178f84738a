"""Rounding optimizers: they beat round-to-nearest where it matters, never lose to it,
and what they store decodes in comfy-kitchen exactly like cq's own decode."""

from __future__ import annotations

import pytest
import torch

from cq_core.builtin.rounding_objective import Objective, never_worse
from cq_core.errors import CqError, UsageError
from cq_core.numerics.metrics import tensor_sqnr_db
from cq_core.plugin.types import OptimizeContext
from tests.comfy import comfy_decode
from tests.helpers import anisotropic_layer, output_sqnr

N, K = 48, 128


FORMATS = ["float8_e4m3fn", "int8_tensorwise", "nvfp4", "mxfp8"]


@pytest.mark.parametrize("format_name", FORMATS)
@pytest.mark.parametrize("optimizer_name", ["gptq", "learned"])
def test_calibrated_optimizers_beat_rtn_on_output_error(registry, format_name, optimizer_name):
    weight, x, h = anisotropic_layer()
    fmt = registry.format(format_name)()
    rtn = comfy_decode(format_name, fmt.encode(weight), weight.shape)
    result = registry.optimizer(optimizer_name)().optimize(weight, fmt, OptimizeContext("layer", stats={"H": h}))
    comfy = comfy_decode(format_name, result.tensors, weight.shape)

    assert torch.equal(comfy, fmt.decode(result.tensors))
    gain = output_sqnr(x, weight, comfy) - output_sqnr(x, weight, rtn)
    assert gain > 2.0, (gain, result.note)
    assert result.note.startswith(f"{optimizer_name} won: output error +")


def test_gptq_trades_weight_error_for_output_error(registry):
    # QUALITY.md: the output gain comes at a small weight-SQNR cost; a gain in both would be suspicious.
    weight, x, h = anisotropic_layer(seed=1)
    fmt = registry.format("float8_e4m3fn")()
    result = registry.optimizer("gptq")().optimize(weight, fmt, OptimizeContext("layer", stats={"H": h}))
    rtn = fmt.decode(fmt.encode(weight))
    assert tensor_sqnr_db(weight, fmt.decode(result.tensors)) < tensor_sqnr_db(weight, rtn)
    assert output_sqnr(x, weight, fmt.decode(result.tensors)) > output_sqnr(x, weight, rtn) + 3


def test_gptq_refits_block_scales_to_compensated_columns(registry):
    # Block scales chosen from the error-compensated columns (when each block comes up)
    # beat scales fixed from the original weight, on output error, decoded by comfy-kitchen.
    weight, x, h = anisotropic_layer(seed=3)
    fmt = registry.format("nvfp4")()
    sqnr = {}
    for refit in (False, True):
        optimizer = registry.optimizer("gptq")(refit_scales=refit)
        result = optimizer.optimize(weight, fmt, OptimizeContext("l", stats={"H": h}))
        comfy = comfy_decode("nvfp4", result.tensors, weight.shape)
        assert torch.equal(comfy, fmt.decode(result.tensors))
        sqnr[refit] = output_sqnr(x, weight, comfy)
    assert sqnr[True] > sqnr[False] + 0.2, sqnr


@pytest.mark.parametrize("format_name", FORMATS)
def test_data_free_learned_never_loses_its_objective_and_decodes_like_comfy(registry, format_name):
    weight, _, _ = anisotropic_layer(seed=2)
    fmt = registry.format(format_name)()
    result = registry.optimizer("learned")(steps=30).optimize(weight, fmt, OptimizeContext("layer"))
    assert torch.equal(comfy_decode(format_name, result.tensors, weight.shape), fmt.decode(result.tensors))
    assert result.note.startswith("learned won: data-free") or "kept round-to-nearest" in result.note
    # Scales stay the format's own: only the rounding changed, so the weight error stays close to RTN's.
    rtn_db = tensor_sqnr_db(weight, fmt.decode(fmt.encode(weight)))
    assert tensor_sqnr_db(weight, fmt.decode(result.tensors)) > rtn_db - 1.0


def test_fallback_keeps_rtn_when_the_candidate_is_worse(registry):
    weight, _, h = anisotropic_layer(seed=3)
    fmt = registry.format("float8_e4m3fn")()
    scales = fmt.compute_scales(weight)
    below, above = fmt.grid_neighbours(weight, scales)
    nearest = fmt.to_grid(weight, scales)
    worse = torch.where(nearest == below, above, below)  # every element on its far neighbour
    candidate = fmt.pack(worse, scales)

    result = never_worse("test", fmt, weight, Objective("output error", hessian=h, diag=torch.zeros(K)),
                         candidate, OptimizeContext("layer"))
    assert all(torch.equal(result.tensors[k], v) for k, v in fmt.encode(weight).items())
    assert result.note.startswith("test lost (-")
    assert "kept round-to-nearest" in result.note


def test_fallback_triggers_when_calibration_says_the_inputs_are_always_zero(registry):
    # H = 0: the output error is zero whatever the rounding, so no optimizer can win.
    weight, _, _ = anisotropic_layer(seed=4)
    fmt = registry.format("int8_tensorwise")()
    for name in ("gptq", "learned"):
        result = registry.optimizer(name)().optimize(weight, fmt, OptimizeContext("layer", stats={"H": torch.zeros(K, K)}))
        assert "kept round-to-nearest" in result.note, result.note
        assert all(torch.equal(result.tensors[k], v) for k, v in fmt.encode(weight).items())


def test_gptq_without_calibration_keeps_rtn_and_says_why(registry):
    weight, _, _ = anisotropic_layer()
    fmt = registry.format("float8_e4m3fn")()
    result = registry.optimizer("gptq")().optimize(weight, fmt, OptimizeContext("layer"))
    assert result.note == "gptq: kept round-to-nearest (no calibration statistics)"
    assert torch.equal(result.tensors["weight"].view(torch.uint8), fmt.encode(weight)["weight"].view(torch.uint8))


def test_optimizers_are_deterministic(registry):
    weight, _, h = anisotropic_layer(seed=5)
    fmt = registry.format("nvfp4")()
    for stats in (None, {"H": h}):
        runs = [registry.optimizer("learned")(steps=15).optimize(weight, fmt, OptimizeContext("l", stats=stats))
                for _ in range(2)]
        assert all(torch.equal(runs[0].tensors[k], runs[1].tensors[k]) for k in runs[0].tensors)


def test_bad_calibration_statistics_name_the_layer(registry):
    weight, _, h = anisotropic_layer()
    fmt = registry.format("float8_e4m3fn")()
    gptq = registry.optimizer("gptq")()
    with pytest.raises(CqError, match="'blocks.3.fc'.*64 x 64|'blocks.3.fc'.*\\(64, 64\\)"):
        gptq.optimize(weight, fmt, OptimizeContext("blocks.3.fc", stats={"H": torch.eye(64)}))
    bad = h.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(CqError, match="'blocks.3.fc'.*NaN"):
        gptq.optimize(weight, fmt, OptimizeContext("blocks.3.fc", stats={"H": bad}))


def test_default_grid_neighbours_bracket_with_adjacent_grid_values(registry):
    # FP8 uses Format's generic default (to_grid probes only): neighbours must be adjacent codes.
    fmt = registry.format("float8_e4m3fn")()
    weight = torch.randn(64, 96, generator=torch.Generator().manual_seed(6)) * 3
    scales = fmt.compute_scales(weight)
    below, above = fmt.grid_neighbours(weight, scales)
    nearest = fmt.to_grid(weight, scales)
    resolved = below != above
    assert resolved.float().mean() > 0.9
    assert bool(((below <= weight) & (weight <= above))[resolved].all())
    assert bool(((nearest == below) | (nearest == above)).all())
    codes = lambda v: (v / scales["weight_scale"]).to(torch.float8_e4m3fn).float()  # noqa: E731
    # No representable value strictly between the two: the midpoint rounds to one of them.
    mid = fmt.to_grid((below + above) / 2, scales)
    assert bool(((mid == below) | (mid == above)).all())
    assert bool((codes(below) <= codes(above)).all())


def test_rtn_output_scales_weigh_each_column_by_its_output_cost_and_win_where_it_varies(registry):
    # Inputs whose channels differ by four orders of magnitude in power: within one nvfp4
    # block some columns cost far more output error than others, so diag(H)-weighted block
    # scales beat the weight-error ones on tr(E H E^T); mxfp8's e4m3 grid is the same at every
    # scale, so there they tie and rtn is kept.
    g = torch.Generator().manual_seed(1)
    w = torch.randn(64, 256, generator=g) * 0.02
    power = torch.rand(256, generator=g) ** 4 * 100 + 0.01
    x = torch.randn(4000, 256, generator=g) * power.sqrt()
    h = x.T @ x / 4000
    context = OptimizeContext(layer="a", stats={"H": h})
    plain = registry.optimizer("rtn")()
    output = registry.optimizer("rtn")(scales="output")
    nvfp4 = registry.format("nvfp4")()
    result = output.optimize(w, nvfp4, context)
    assert "won" in result.note
    error = lambda tensors: float(((nvfp4.decode(tensors) - w) @ h * (nvfp4.decode(tensors) - w)).sum())  # noqa: E731
    assert error(result.tensors) < error(plain.optimize(w, nvfp4, context).tensors) * 0.8
    mxfp8 = registry.format("mxfp8")()
    kept = output.optimize(w, mxfp8, context)
    assert "kept round-to-nearest" in kept.note
    assert torch.equal(kept.tensors["weight_scale"], mxfp8.encode(w)["weight_scale"])
    # without statistics it is plain rtn
    assert torch.equal(output.optimize(w, nvfp4, OptimizeContext(layer="a")).tensors["weight"], nvfp4.encode(w)["weight"])


@pytest.mark.parametrize(("optimizer", "option", "says"), [
    ("learned", "lr=-1", "must be greater than 0"),
    ("learned", "weight_decay=-1", "must be at least 0"),
    ("learned", "top_weight=-5", "must be at least 0"),
    ("learned", "steps=-5", "must be at least 0"),
    ("learned", "h_rank=-3", "must be greater than 0"),
    ("learned", "max_rank=0", "must be greater than 0"),
    ("gptq", "damp=-1", "must be at least 0"),
    ("gptq", "block_size=-4", "must be greater than 0"),
])
def test_an_optimizer_option_out_of_its_range_is_one_sentence(registry, optimizer, option, says):
    # These reached torch as tracebacks (Invalid learning rate, negative dimension, math domain error)
    # or ran silently with a negative count.
    name, value = option.split("=")
    with pytest.raises(UsageError, match=f"Option '{name}' of optimizer '{optimizer}' {says}"):
        registry.optimizer(optimizer)(**{name: value})
