"""The ComfyUI node pack (plugins/cq_comfyui) and ``cq calibrate --comfyui``, run with the vendored
ComfyUI on the CPU: tiny FLUX and WAN models built with ComfyUI's classes, ComfyUI's own sampler
through the capture node, conversion with the statistics, and ComfyUI loading the result."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from cq_core.io.calibration_file import CalibrationFile
from tests.cli_runner import run_cq
from tests.comfyui import comfyui_root, load_diffusion_model
from tests.conftest import write_checkpoint
from tests.families._dit import tiny
from tests.families.image import FLUX_CONFIG
from tests.families.video import WAN_CONFIG

NODE_PACK = Path(__file__).resolve().parents[1] / "plugins" / "cq_comfyui"
RANK = 32  # below every tiny layer's K (128 to 4096): the bounded form is what gets tested


def load_node_pack():
    """The node pack as ComfyUI loads a folder in custom_nodes (``nodes.py`` ``load_custom_node``)."""
    name = str(NODE_PACK).replace(".", "_x_")
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, NODE_PACK / "__init__.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


# The two families: ComfyUI's config, its detection name, latent shape, conditioning, model call.
def _flux_cond(g, batch=1):
    return [[torch.randn(batch, 7, 32, generator=g), {"pooled_output": torch.randn(batch, 32, generator=g),
                                                       "guidance": 3.5}]]


def _wan_cond(g, batch=1):
    return [[torch.randn(batch, 7, 4096, generator=g), {}]]


def _flux_call(dm, x, t, g):
    context, y = torch.randn(x.shape[0], 7, 32, generator=g), torch.randn(x.shape[0], 32, generator=g)
    return dm(x, t, context=context, y=y, guidance=torch.full((x.shape[0],), 3.5))


def _wan_call(dm, x, t, g):
    return dm(x, t, torch.randn(x.shape[0], 7, 4096, generator=g))


FAMILIES = {
    "flux": (FLUX_CONFIG, "Flux", (1, 16, 8, 8), _flux_cond, _flux_call),
    "wan": (WAN_CONFIG, "WAN21_T2V", (1, 16, 2, 8, 8), _wan_cond, _wan_call),
}


@pytest.fixture
def models_dir(comfyui, tmp_path, monkeypatch):
    """ComfyUI's folder_paths pointed at an empty models folder (diffusion_models and the rest)."""
    import folder_paths

    models = tmp_path / "models"
    monkeypatch.setattr(folder_paths, "models_dir", str(models))
    for folder in ("diffusion_models", "checkpoints", "text_encoders"):
        (models / folder).mkdir(parents=True)
        monkeypatch.setitem(folder_paths.folder_names_and_paths, folder, ([str(models / folder)], {".safetensors"}))
    monkeypatch.delitem(folder_paths.folder_names_and_paths, "cq_calibration", raising=False)
    monkeypatch.setattr(folder_paths, "filename_list_cache", {})
    return models


def sample(comfy, patcher, family: str, seed: int, steps: int = 3, cfg: float = 2.0):
    """ComfyUI's KSampler call (``comfy.sample.sample``), both CFG branches (cfg > 1)."""
    import comfy.sample

    _, _, shape, cond, _ = FAMILIES[family]
    g = torch.Generator().manual_seed(seed)
    latent = torch.zeros(shape)
    noise = comfy.sample.prepare_noise(latent, seed)
    return comfy.sample.sample(patcher, noise, steps, cfg, "euler", "simple", cond(g), cond(g), latent,
                               disable_pbar=True, seed=seed)


def held_out_error(reference, quantized, family: str) -> float:
    """Relative output error of the diffusion model on 8 held-out noisy latents, timesteps and prompts."""
    _, _, shape, _, call = FAMILIES[family]
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(8, *shape[1:], generator=g)
    t = torch.rand(8, generator=g)
    with torch.no_grad():
        want = call(reference.model.diffusion_model, x, t, torch.Generator().manual_seed(99)).float()
        got = call(quantized.model.diffusion_model, x, t, torch.Generator().manual_seed(99)).float()
    assert torch.isfinite(got).all()
    return float((got - want).norm() / want.norm())


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_capture_while_sampling_then_quantize_beats_round_to_nearest(comfyui, models_dir, family, monkeypatch):
    import comfy.utils

    config, expect, *_ = FAMILIES[family]
    source = write_checkpoint(models_dir / "diffusion_models" / f"tiny_{family}.safetensors", tiny(comfyui, config, expect))
    pack = load_node_pack()
    capture_node = pack.NODE_CLASS_MAPPINGS["CqCaptureCalibration"]()
    quantize_node = pack.NODE_CLASS_MAPPINGS["CqQuantizeModel"]()

    reference, _ = load_diffusion_model(source)
    (model,) = capture_node.capture(reference, f"tiny_{family}", RANK, "model device")
    assert model is not reference
    stats = models_dir / "cq_calibration" / f"tiny_{family}.safetensors"
    sample(comfyui, model, family, seed=1)
    first = CalibrationFile(stats).rows
    sample(comfyui, model, family, seed=2)  # a second queued run adds to the file
    rows = CalibrationFile(stats).rows
    assert set(rows) == set(first) and all(rows[k] == 2 * first[k] > 0 for k in rows)
    sample(comfyui, reference, family, seed=3)  # the unwrapped model records nothing
    assert CalibrationFile(stats).rows == rows

    assert f"tiny_{family}.safetensors" in quantize_node.INPUT_TYPES()["required"]["calibration"][0]
    progress = []
    monkeypatch.setattr(comfy.utils, "PROGRESS_BAR_HOOK", lambda value, total, preview, node_id=None:
                        progress.append((value, total)))
    errors = {}
    for optimizer, calibration in (("rtn", "none"), ("gptq", f"tiny_{family}.safetensors")):
        result = quantize_node.quantize(f"diffusion_models/tiny_{family}.safetensors", "nvfp4", "auto", optimizer,
                                        calibration, False)
        report, filename = result["result"]
        assert result["ui"]["text"] == [report] and "layers quantized" in report
        patcher, log = load_diffusion_model(models_dir / filename)
        assert log.problems() == []
        errors[optimizer] = held_out_error(reference, patcher, family)
    assert progress[-1][0] == progress[-1][1] > 1
    print(f"\n{family}: held-out relative output error, nvfp4: rtn {errors['rtn']:.4f}, gptq with "
          f"sampled statistics (rank {RANK}) {errors['gptq']:.4f}")
    assert errors["gptq"] < errors["rtn"]


def test_the_quantize_node_refuses_a_file_outside_the_model_folders(comfyui, models_dir):
    node = load_node_pack().NODE_CLASS_MAPPINGS["CqQuantizeModel"]()
    with pytest.raises(Exception, match="not in ComfyUI's"):
        node.quantize("diffusion_models/missing.safetensors", "nvfp4", "auto", "rtn", "none", False)
    with pytest.raises(Exception, match="must stay inside"):
        load_node_pack().cq_comfyui.nodes.calibration_path("../escape")


def test_the_node_pack_is_a_registry_package(comfyui):
    """ComfyUI's own parser of a node pack's pyproject (``comfy_config``) reads the [tool.comfy] fields."""
    from comfy_config import config_parser

    config = config_parser.extract_node_configuration(str(NODE_PACK))
    assert config.project.name == "cq-nodes"
    assert config.tool_comfy.publisher_id and config.tool_comfy.display_name
    assert any(d.startswith("cq-core") for d in config.project.dependencies)
    pack = load_node_pack()
    assert set(pack.NODE_DISPLAY_NAME_MAPPINGS.values()) == {"Capture calibration (cq)", "Quantize model (cq)"}
    for cls in pack.NODE_CLASS_MAPPINGS.values():
        assert cls.CATEGORY == "cq" and callable(getattr(cls, cls.FUNCTION)) and "required" in cls.INPUT_TYPES()


def test_cq_calibrate_drives_a_comfyui_model_without_the_ui(comfyui, tmp_path, capsys):
    source = write_checkpoint(tmp_path / "tiny_wan.safetensors", tiny(comfyui, WAN_CONFIG, "WAN21_T2V"))
    stats = tmp_path / "stats.safetensors"
    result = run_cq(capsys, "calibrate", source, "--comfyui", comfyui_root(), "-o", stats, "--runs", "2",
                    "--steps", "2", "--latent-size", "8x8", "--rank", str(RANK))
    assert result.code == 0, result.err
    calib = CalibrationFile(stats)
    assert "blocks.0.ffn.0" in calib and calib.get("blocks.0.ffn.0")["H_lowrank"].shape == (RANK, 128)
    assert calib.get("text_embedding.0")["H_diag"].shape == (4096,)
    out = tmp_path / "wan-nvfp4.safetensors"
    result = run_cq(capsys, "convert", source, "-o", out, "-f", "nvfp4", "--optimizer", "gptq",
                    "--calibration", stats)
    assert result.code == 0, result.err
    patcher, log = load_diffusion_model(out)
    assert log.problems() == []


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "x:y"], "--comfyui takes a CHECKPOINT"),
        (["--latent-size", "8by8"], "HEIGHTxWIDTH"),
        (["--runs", "0"], "at least 1"),
    ],
)
def test_cq_calibrate_comfyui_bad_input(comfyui, tmp_path, capsys, args, message):
    source = write_checkpoint(tmp_path / "m.safetensors", {"w": torch.zeros(2)})
    result = run_cq(capsys, "calibrate", source, "--comfyui", comfyui_root(), "-o", tmp_path / "s.safetensors", *args)
    assert result.code == 2 and message in result.err
    assert not (tmp_path / "s.safetensors").exists()


def test_the_example_workflow_wires_the_nodes_as_they_are_declared():
    """examples/comfyui/*.json: every link joins outputs and inputs of one type, and the cq nodes'
    widget values follow their INPUT_TYPES (names the registry knows)."""
    import json

    from cq_comfyui.nodes import NODE_CLASS_MAPPINGS

    from cq_core import get_registry

    (path,) = (NODE_PACK.parents[1] / "examples" / "comfyui").glob("*.json")
    workflow = json.loads(path.read_text())
    nodes = {n["id"]: n for n in workflow["nodes"]}
    for link_id, source, source_slot, target, target_slot, kind in workflow["links"]:
        assert nodes[source]["outputs"][source_slot]["type"] == kind == nodes[target]["inputs"][target_slot]["type"]
        assert link_id in nodes[source]["outputs"][source_slot]["links"]
        assert nodes[target]["inputs"][target_slot]["link"] == link_id
    types = [n["type"] for n in nodes.values()]
    assert {"CqCaptureCalibration", "CqQuantizeModel", "KSampler", "UNETLoader"} <= set(types)
    registry = get_registry()
    for node in nodes.values():
        if node["type"] not in NODE_CLASS_MAPPINGS:
            continue
        declared = NODE_CLASS_MAPPINGS[node["type"]].INPUT_TYPES()["required"]
        widgets = [name for name, spec in declared.items() if spec[0] not in ("MODEL",)]
        values = dict(zip(widgets, node["widgets_values"], strict=True))
        if node["type"] == "CqQuantizeModel":
            assert values["format"] in registry.formats and values["optimizer"] in registry.optimizers
            assert values["model_file"].split("/")[0] == "diffusion_models"


def test_the_flux_sizes_in_the_benchmark_are_comfyuis_flux_dev(comfyui):
    """bench/minilm_sketch.py sizes FLUX.1-dev's statistics from a list of (layer, K): it must be
    the Linear layers of ComfyUI's own FLUX class at FLUX.1-dev's config (built on the meta device)."""
    from comfy.ldm.flux.model import Flux

    spec = importlib.util.spec_from_file_location("minilm_sketch", NODE_PACK.parents[1] / "bench" / "minilm_sketch.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    model = Flux(image_model="flux", in_channels=64, out_channels=64, vec_in_dim=768, context_in_dim=4096,
                 hidden_size=3072, mlp_ratio=4.0, num_heads=24, depth=19, depth_single_blocks=38,
                 axes_dim=[16, 56, 56], theta=10000, patch_size=1, qkv_bias=True, guidance_embed=True,
                 txt_ids_dims=[], operations=comfyui.ops.manual_cast, dtype=torch.bfloat16, device="meta")
    linears = sorted((n, m.in_features) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear))
    assert linears == sorted(bench.flux_dev_linear_inputs())
