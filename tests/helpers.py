"""The helpers every test folder shares (tests/ and plugins/<name>/tests/): small tensors and
checkpoints built here, files read with the reference safetensors reader, registries of named
plugins. Test modules import from here, never from one another.

Nothing here imports a plugin, comfy-kitchen or ComfyUI at import time, so a plugin's tests
import it in an environment that holds only cq-core and that plugin (.ci/check-plugin-isolation).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from cq_core.numerics.metrics import tensor_sqnr_db
from cq_core.plugin.manager import Registry, make_plugin_manager, set_registry

#: The repository root (the folder that holds pyproject.toml).
ROOT = Path(__file__).resolve().parent.parent

#: The plugin modules of this repository that provide formats, optimizers and presets.
PROJECT_PLUGINS = ("cq_fp8.plugin", "cq_int8.plugin", "cq_nvfp4.plugin", "cq_models.plugin")


# -- registries ---------------------------------------------------------------------------


def build_registry(*extra, plugins: tuple = PROJECT_PLUGINS) -> Registry:
    """A registry of ``plugins`` (module names) plus ``extra`` (modules or plugin objects); entry points
    are not loaded, so a test never depends on what else is installed."""
    return Registry.from_plugin_manager(
        make_plugin_manager(load_entry_points=False, extra_plugins=(*plugins, *extra))
    )


def registry_fixture(*plugins: str, skip_missing: bool = True) -> Callable:
    """An autouse ``registry`` fixture for a conftest: the process-wide registry of ``plugins`` only
    (and cq-core's built-ins), set for the API and the CLI in every test under that conftest.

    A test that also needs another plugin says so with ``@pytest.mark.needs_plugins("cq_fp8.plugin", ...)``
    (a module: ``pytestmark``); its registry holds those too. A plugin that is not installed skips the
    tests that need it (``pytest.importorskip``), unless ``skip_missing`` is false (tests/: every project
    plugin is installed, a missing one is an error)."""

    @pytest.fixture(autouse=True)
    def registry(request, monkeypatch) -> Registry:
        needed = [*plugins, *(p for mark in request.node.iter_markers("needs_plugins") for p in mark.args)]
        needed = list(dict.fromkeys(needed))
        for plugin in needed if skip_missing else ():
            pytest.importorskip(plugin, reason=f"{plugin.split('.')[0]} is not installed")
        monkeypatch.delenv("CQ_DISABLE_PLUGINS", raising=False)
        reg = build_registry(plugins=tuple(needed))
        set_registry(reg)
        yield reg
        set_registry(None)

    registry.__doc__ = f"The process-wide registry of {', '.join(plugins)} (and cq-core), in every test."
    return registry


# -- tensors ------------------------------------------------------------------------------


def gaussian(n: int, k: int, seed: int = 0) -> torch.Tensor:
    """An ``[n, k]`` float32 weight of standard normal values, reproducible from ``seed``."""
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed))


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal shapes and equal 32-bit patterns (float32 tensors): bit-exact, NaNs and signed zeros included."""
    return a.shape == b.shape and torch.equal(a.contiguous().view(torch.int32), b.contiguous().view(torch.int32))


def output_sqnr(x: torch.Tensor, weight: torch.Tensor, decoded: torch.Tensor) -> float:
    """SQNR (dB) of the layer's output ``x @ decoded.T`` against ``x @ weight.T``."""
    return tensor_sqnr_db(x @ weight.T, x @ decoded.T)


def anisotropic_layer(seed: int = 0, samples: int = 1024, n: int = 48, k: int = 128):
    """A weight ``[n, k]`` and inputs ``[samples, k]`` whose channels differ in scale by 100x and are
    correlated: exactly where output error and weight error disagree. Returns (weight, x, H = x^T x / samples)."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(n, k, generator=g)
    mixing = torch.randn(k, k, generator=g) * torch.logspace(0, -2, k)
    x = torch.randn(samples, k, generator=g) @ mixing.T
    return weight, x, x.T @ x / samples


# -- checkpoints --------------------------------------------------------------------------


def write_checkpoint(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    """Write with the reference safetensors writer, not ours."""
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


def load(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata or {}) of a file, read with the reference reader ComfyUI uses."""
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}


def small_model(dtype=torch.bfloat16, seed=0) -> dict[str, torch.Tensor]:
    """A two-layer model with the tensor kinds a real checkpoint has."""
    g = torch.Generator().manual_seed(seed)
    return {
        "embed_tokens.weight": torch.randn(64, 32, generator=g).to(dtype),
        "blocks.0.norm1.weight": torch.ones(32, dtype=dtype),
        "blocks.0.attn.qkv.weight": torch.randn(96, 32, generator=g).to(dtype),
        "blocks.0.attn.qkv.bias": torch.randn(96, generator=g).to(dtype),
        "blocks.0.mlp.fc1.weight": torch.randn(128, 32, generator=g).to(dtype),
        "blocks.0.mlp.fc2.weight": torch.randn(32, 128, generator=g).to(dtype),
        "blocks.0.conv.weight": torch.randn(8, 4, 3, 3, generator=g).to(dtype),
        "position_ids": torch.arange(16, dtype=torch.int64),
    }


def six_blocks(seed: int = 0) -> dict[str, torch.Tensor]:
    """Six bf16 blocks of a norm, a ``[96, 64]`` Linear and its bias: enough tensors to shard."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for i in range(6):
        tensors[f"blocks.{i}.norm.weight"] = torch.ones(64, dtype=torch.bfloat16)
        tensors[f"blocks.{i}.attn.weight"] = (torch.randn(96, 64, generator=g) * 0.05).to(torch.bfloat16)
        tensors[f"blocks.{i}.attn.bias"] = torch.randn(96, generator=g).to(torch.bfloat16)
    return tensors


def write_sharded(folder, tensors, shards: int = 3, stem: str = "model", index: bool = True):
    """Shards written by the reference writer, with a Hugging Face style index."""
    names = list(tensors)
    per = -(-len(names) // shards)
    weight_map = {}
    for number in range(shards):
        shard = f"{stem}-{number + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[number * per : (number + 1) * per]}
        write_checkpoint(folder / shard, part, {"format": "pt"})
        weight_map.update({n: shard for n in part})
    index_path = folder / f"{stem}.safetensors.index.json"
    if index:
        index_path.write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    return index_path


def calibration_for(model: dict[str, torch.Tensor], tmp_path, seed: int = 0):
    """Anisotropic input statistics for every 2-D Linear weight of the test checkpoint."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for key, weight in model.items():
        if key.endswith(".weight") and weight.dim() == 2 and "embed" not in key:
            k = weight.shape[1]
            x = torch.randn(256, k, generator=g) @ (torch.randn(k, k, generator=g) * torch.logspace(0, -2, k))
            tensors[f"{key.removesuffix('.weight')}.H"] = x.T @ x / 256
            tensors[f"{key.removesuffix('.weight')}.absmax"] = x.abs().amax(0)
    path = tmp_path / "calib.safetensors"
    save_file(tensors, str(path))
    return path


# -- the ComfyUI carriers (FORMATS.md) ----------------------------------------------------


def carriers(tensors, metadata) -> tuple[dict, dict]:
    """(header layers, per-layer tensor JSON) of a loaded file."""
    header = json.loads(metadata["_quantization_metadata"])
    assert header["format_version"] == "1.0"
    per_layer = {
        k.removesuffix(".comfy_quant"): json.loads(bytes(v.tolist()))
        for k, v in tensors.items()
        if k.endswith(".comfy_quant")
    }
    for k, v in tensors.items():
        if k.endswith(".comfy_quant"):
            assert v.dtype == torch.uint8 and v.dim() == 1
    return header["layers"], per_layer


def rewrite_metadata(path: Path, out: Path, *, header: dict | None, tensors: dict | None) -> Path:
    """A copy of ``path`` whose carriers say what the test wants (None: leave it out)."""
    stored, metadata = load(path)
    stored = {k: v for k, v in stored.items() if not k.endswith(".comfy_quant")}
    for layer, config in (tensors or {}).items():
        stored[f"{layer}.comfy_quant"] = torch.tensor(list(json.dumps(config).encode()), dtype=torch.uint8)
    metadata.pop("_quantization_metadata", None)
    if header is not None:
        metadata["_quantization_metadata"] = json.dumps({"format_version": "1.0", "layers": header})
    return write_checkpoint(out, stored, metadata)


# -- legacy layouts (cq migrate's inputs) --------------------------------------------------

#: The shape of every legacy layer built here.
LEGACY_N, LEGACY_K = 32, 64


def fp8_codes(seed: int, dtype=torch.float8_e4m3fn, shape=(LEGACY_N, LEGACY_K)) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor FP8 codes of a random weight and their scale (amax / the dtype's max)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(*shape, generator=g)
    scale = w.abs().amax() / torch.finfo(dtype).max
    return (w / scale).to(dtype), scale


def legacy_fp8_file(path: Path, *, marker_elements: int = 0) -> dict[str, torch.Tensor]:
    """The scaled-fp8 layout: marker, F8 weights, scale_weight, scale_input only when not 1.0."""
    q1, s1 = fp8_codes(1)
    q2, s2 = fp8_codes(2)
    q3, s3 = fp8_codes(3, torch.float8_e5m2)
    tensors = {
        "scaled_fp8": torch.empty(marker_elements, dtype=torch.float8_e4m3fn),
        "blocks.0.attn.qkv.weight": q1,
        "blocks.0.attn.qkv.scale_weight": s1.reshape(()),
        "blocks.0.attn.qkv.scale_input": torch.tensor(0.5),
        "blocks.0.attn.qkv.bias": torch.randn(LEGACY_N),
        "blocks.0.mlp.fc1.weight": q2,
        "blocks.0.mlp.fc1.scale_weight": s2.reshape(1),  # some writers stored (1,)
        "blocks.0.mlp.fc2.weight": q3,
        "blocks.0.mlp.fc2.scale_weight": s3.to(torch.float16).reshape(()),
        "blocks.0.norm.weight": torch.ones(LEGACY_K, dtype=torch.bfloat16),
    }
    write_checkpoint(path, tensors)
    return tensors


# -- executors ------------------------------------------------------------------------------


def jobs_of(path, registry, fmt="float8_e4m3fn"):
    """The jobs cq would hand an executor for ``path``: round-to-nearest, no preset."""
    from cq_core.engine.execute import tensor_jobs
    from cq_core.engine.plan import build_plan
    from cq_core.io.safetensors_io import SafetensorsFile

    writer = registry.metadata_writer("comfyui")()
    with SafetensorsFile(path) as source:
        plan = build_plan(source, registry, registry.format(fmt)(), writer, model="none")
        return tensor_jobs(plan, source, registry.optimizer("rtn")(), writer, True, None)


#: ``python -c SLOW_CQ.format(root=ROOT) ARGS``: cq's CLI with an optimizer that sleeps 0.5 s a layer.
SLOW_CQ = """
import sys, time
sys.path.insert(0, {root!r})
from cq_core import hookimpl
from cq_core.plugin.manager import set_registry
from cq_core.plugin.types import OptimizeResult, Optimizer
from tests.helpers import build_registry


class Slow(Optimizer):
    name = "slow"

    def optimize(self, weight, fmt, context):
        time.sleep(0.5)
        return OptimizeResult(fmt.encode(weight))


class SlowPlugin:
    __name__ = "slow-plugin"

    @hookimpl
    def cq_register_optimizers(self, register):
        register(Slow)


set_registry(build_registry(SlowPlugin()))
from cq_core.cli.app import main
main(sys.argv[1:])
"""


# -- ComfyUI --------------------------------------------------------------------------------


def flux_forward(patcher) -> torch.Tensor:
    """The output of the ``tiny_flux`` fixture's model (loaded by ComfyUI) on fixed inputs."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 16, 8, 8, generator=g)
    context = torch.randn(1, 7, 32, generator=g)
    y = torch.randn(1, 32, generator=g)
    with torch.no_grad():
        return patcher.model.diffusion_model(x, torch.tensor([0.5]), context=context, y=y,
                                             guidance=torch.tensor([3.5])).float()


# -- hostile names (every user pattern runs in RE2) ------------------------------------------

#: Exponential for a backtracking engine: each extra 'a' of a name doubles Python re's time.
EVIL = "(a+)+$"
#: Names that drive EVIL to the worst case (a run of 'a' that fails at the end): 2**40 steps each.
HOSTILE_LAYERS = [("a" * 40 + f"_{i}") for i in range(3)]


def hostile_model() -> dict[str, torch.Tensor]:
    """One ``[32, 32]`` float32 weight per name of HOSTILE_LAYERS."""
    g = torch.Generator().manual_seed(0)
    return {f"{layer}.weight": torch.randn(32, 32, generator=g) for layer in HOSTILE_LAYERS}


def quantized_tensors(path) -> dict[str, torch.Tensor]:
    """Every tensor of the quantized layers (weights, scales, biases), by name."""
    with safe_open(str(path), "pt") as f:
        layers = json.loads(f.metadata()["_quantization_metadata"])["layers"]
        return {k: f.get_tensor(k) for k in f.keys() if k.rpartition(".")[0] in layers}
