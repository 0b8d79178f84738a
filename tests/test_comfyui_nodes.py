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

#: The node pack ComfyUI imports: the repository's root, as cloned into custom_nodes/.
NODE_PACK = Path(__file__).resolve().parents[1]
RANK = 32  # below every tiny layer's K (128 to 4096): the bounded form is what gets tested


def load_node_pack():
    """The node pack as ComfyUI loads a folder in custom_nodes (``nodes.py`` ``load_custom_node``:
    the folder's path, dots replaced, as the module name)."""
    name = str(NODE_PACK).replace(".", "_x_")
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, NODE_PACK / "__init__.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def quantize(node, model_file, fmt="nvfp4", preset="auto", optimizer="rtn", calibration="none", overwrite=False,
             **optional):
    """The Quantize node's function as ComfyUI calls it (widgets by name); returns (report, ui text)."""
    result = node.quantize(model_file=model_file, format=fmt, preset=preset, optimizer=optimizer,
                           calibration=calibration, overwrite=overwrite, **optional)
    (report,) = result["result"]
    assert result["ui"]["text"] == [report]
    return report


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
        report = quantize(quantize_node, f"diffusion_models/tiny_{family}.safetensors", "nvfp4", "auto", optimizer,
                          calibration)
        assert "layers quantized to nvfp4" in report
        name = f"tiny_{family}_nvfp4{'' if optimizer == 'rtn' else '_' + optimizer}.safetensors"
        assert f"wrote {models_dir / 'diffusion_models' / name}" in report
        if optimizer == "gptq":
            assert "measured on the calibration statistics it was fitted to (in-sample)" in report
        patcher, log = load_diffusion_model(models_dir / "diffusion_models" / name)
        assert log.problems() == []
        errors[optimizer] = held_out_error(reference, patcher, family)
    assert progress[-1][0] == progress[-1][1] > 1
    print(f"\n{family}: held-out relative output error, nvfp4: rtn {errors['rtn']:.4f}, gptq with "
          f"sampled statistics (rank {RANK}) {errors['gptq']:.4f}")
    assert errors["gptq"] < errors["rtn"]


def test_the_node_pack_is_a_registry_package(comfyui):
    """ComfyUI's own parser of a node pack's pyproject (``comfy_config``, which ``nodes.py`` runs on
    every pack folder) reads the clone root's [tool.comfy] fields; the pack exports its nodes and
    its frontend folder."""
    from comfy_config import config_parser

    config = config_parser.extract_node_configuration(str(NODE_PACK))
    assert config.project.name == "cq-core"  # the Registry's node id: the pack root's [project].name
    assert config.tool_comfy.publisher_id == "cq" and config.tool_comfy.display_name
    assert config.tool_comfy.web is None  # the frontend comes through WEB_DIRECTORY, registered once
    assert config.project.supported_os == [] and config.project.license.text == "Apache-2.0"
    pack = load_node_pack()
    assert set(pack.NODE_DISPLAY_NAME_MAPPINGS.values()) == {"Capture calibration (cq)", "Quantize model (cq)"}
    assert (Path(pack.WEB_DIRECTORY) / "cq_report.js").is_file()
    for cls in pack.NODE_CLASS_MAPPINGS.values():
        assert cls.CATEGORY == "cq" and callable(getattr(cls, cls.FUNCTION)) and "required" in cls.INPUT_TYPES()


def test_the_pack_requirements_install_this_clone_and_leave_torch_alone():
    """The root requirements.txt is what ComfyUI-Manager runs one line per ``pip install`` from the
    pack's folder: every line is one local path of this clone, cq-core first, and no torch (a pin
    would replace ComfyUI's own CUDA build)."""
    lines = [line.strip() for line in (NODE_PACK / "requirements.txt").read_text().splitlines()]
    lines = [line for line in lines if line and not line.startswith("#")]
    assert lines[0] == "." and all(line.startswith("./plugins/") for line in lines[1:])
    assert all((NODE_PACK / line / "pyproject.toml").is_file() for line in lines)
    assert "./plugins/cq_comfyui" in lines and not any("torch" in line for line in lines)


def test_a_checkout_imported_as_a_package_imports_each_module_once(tmp_path):
    """pytest names a checkout whose folder is an identifier a package (its root holds ComfyUI's
    __init__.py and tests/__init__.py): ``<folder>.tests.conftest`` must be ``tests.conftest``."""
    import subprocess

    link = tmp_path / "cqcheckout"
    link.symlink_to(NODE_PACK, target_is_directory=True)
    code = ("import sys; sys.path[:0] = [sys.argv[1], sys.argv[2]]; import cqcheckout.tests.families as a, "
            "tests.families as b; assert a is b and a.__name__ == 'tests.families' and a.__spec__.name == a.__name__; "
            "import cqcheckout; assert not hasattr(cqcheckout, 'NODE_CLASS_MAPPINGS')")
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path), str(NODE_PACK)], capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr


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
    """examples/comfyui/*.json: every link joins outputs and inputs of one type ('*' takes any), the
    cq nodes' widget values follow their INPUT_TYPES (names the registry knows), FLUX.1-dev samples at
    cfg 1 (one branch per step, as it runs), and the muted Quantize node runs after the sampler."""
    import json

    from cq_comfyui.nodes import NODE_CLASS_MAPPINGS

    from cq_core import get_registry

    (path,) = (NODE_PACK / "examples" / "comfyui").glob("*.json")
    workflow = json.loads(path.read_text())
    nodes = {n["id"]: n for n in workflow["nodes"]}
    for link_id, source, source_slot, target, target_slot, kind in workflow["links"]:
        assert nodes[source]["outputs"][source_slot]["type"] == kind
        assert nodes[target]["inputs"][target_slot]["type"] in (kind, "*")
        assert link_id in nodes[source]["outputs"][source_slot]["links"]
        assert nodes[target]["inputs"][target_slot]["link"] == link_id
    by_type = {n["type"]: n for n in nodes.values()}
    assert {"CqCaptureCalibration", "CqQuantizeModel", "KSampler", "UNETLoader"} <= set(by_type)
    assert by_type["KSampler"]["widgets_values"][3] == 1.0
    registry = get_registry()
    for node in nodes.values():
        if node["type"] not in NODE_CLASS_MAPPINGS:
            continue
        declared = NODE_CLASS_MAPPINGS[node["type"]].INPUT_TYPES()
        specs = {**declared["required"], **declared.get("optional", {})}
        widgets = [name for name, spec in specs.items() if spec[0] not in ("MODEL", "*")]
        values = dict(zip(widgets, node["widgets_values"], strict=True))
        if node["type"] == "CqCaptureCalibration":
            assert values["rank"] == 512
        if node["type"] == "CqQuantizeModel":
            assert values["format"] in registry.formats and values["optimizer"] in registry.optimizers
            assert values["model_file"].split("/")[0] == "diffusion_models" and node["mode"] == 2
            (after,) = node["inputs"]
            assert after["name"] == "after_sampling" and nodes[next(
                l[1] for l in workflow["links"] if l[0] == after["link"])]["type"] == "KSampler"


def test_the_flux_sizes_in_the_benchmark_are_comfyuis_flux_dev(comfyui):
    """bench/minilm_sketch.py sizes FLUX.1-dev's statistics from a list of (layer, K): it must be
    the Linear layers of ComfyUI's own FLUX class at FLUX.1-dev's config (built on the meta device)."""
    from comfy.ldm.flux.model import Flux

    spec = importlib.util.spec_from_file_location("minilm_sketch", NODE_PACK / "bench" / "minilm_sketch.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    model = Flux(image_model="flux", in_channels=64, out_channels=64, vec_in_dim=768, context_in_dim=4096,
                 hidden_size=3072, mlp_ratio=4.0, num_heads=24, depth=19, depth_single_blocks=38,
                 axes_dim=[16, 56, 56], theta=10000, patch_size=1, qkv_bias=True, guidance_embed=True,
                 txt_ids_dims=[], operations=comfyui.ops.manual_cast, dtype=torch.bfloat16, device="meta")
    linears = sorted((n, m.in_features) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear))
    assert linears == sorted(bench.flux_dev_linear_inputs())


# --- the Quantize node as a ComfyUI user meets it (in-process ComfyUI 0.30.0) -------------------


@pytest.fixture
def tiny_flux(comfyui, models_dir):
    """``diffusion_models/tiny_flux.safetensors``, a tiny FLUX.1-dev built with ComfyUI's classes."""
    return write_checkpoint(models_dir / "diffusion_models" / "tiny_flux.safetensors", tiny(comfyui, FLUX_CONFIG, "Flux"))


@pytest.fixture
def nodes():
    pack = load_node_pack()
    return pack.NODE_CLASS_MAPPINGS["CqCaptureCalibration"](), pack.NODE_CLASS_MAPPINGS["CqQuantizeModel"]()


def captured(comfyui, nodes, source, name="tiny_flux", runs=1, seed=1):
    """Statistics of ``runs`` sampling runs of ``source`` through the capture node, as ``name``."""
    reference, _ = load_diffusion_model(source)
    (model,) = nodes[0].capture(reference, name, RANK, "model device")
    for run in range(runs):
        sample(comfyui, model, "flux", seed=seed + run)
    return reference


def test_the_node_offers_what_this_comfyui_loads_and_only_source_files(comfyui, models_dir, tiny_flux, nodes):
    """Formats: cq's, less those ComfyUI 0.30.0's ``comfy.quant_ops.QUANT_ALGOS`` lacks; files: only
    .safetensors sources (no .ckpt, no quantized output); presets: none for VAEs or vision models."""
    import comfy.quant_ops

    from cq_core import get_registry

    declared = nodes[1].INPUT_TYPES()
    formats = declared["required"]["format"][0]
    assert formats == sorted(set(get_registry().formats) & set(comfy.quant_ops.QUANT_ALGOS))
    assert "int8_blockwise" not in formats and "asym_w4a8_int8" not in formats and "nvfp4" in formats
    (models_dir / "checkpoints" / "old.ckpt").write_bytes(b"\x80\x02pickle")
    quantize(nodes[1], "diffusion_models/tiny_flux.safetensors", "float8_e4m3fn")
    files = nodes[1].INPUT_TYPES()["required"]["model_file"][0]
    assert files == ["diffusion_models/tiny_flux.safetensors"]
    presets = declared["required"]["preset"][0]
    assert presets[:2] == ["auto", "none"] and "flux" in presets and "vae" not in presets and "sam3" not in presets
    assert all(spec[1].get("tooltip") for part in ("required", "optional") for spec in declared[part].values())


def bad(nodes, **widgets):
    """The Quantize node's error for these widgets (with defaults for the others)."""
    args = dict(model_file="diffusion_models/tiny_flux.safetensors", fmt="nvfp4")
    args.update(widgets)
    with pytest.raises(Exception) as caught:
        quantize(nodes[1], **args)
    return str(caught.value)


def test_bad_widgets_get_one_sentence_in_the_nodes_words_and_no_file(comfyui, models_dir, tiny_flux, nodes):
    folder = models_dir / "diffusion_models"
    assert "cq reads .safetensors files only" in bad(nodes, model_file="checkpoints/old.ckpt")
    assert "is not in ComfyUI's" in bad(nodes, model_file="loras/x.safetensors")
    message = bad(nodes, optimizer="gptq")
    assert "optimizer 'gptq' needs calibration statistics: choose a file in 'calibration'" in message
    assert "target_size '12 apples' is not a size like 12GB" in bad(nodes, target_size="12 apples")
    assert "gpu 'blackwell' chooses formats for a size budget: set target_size" in bad(nodes, gpu="blackwell")
    assert "is not below" in bad(nodes, target_size="1GB")
    assert "bits_per_weight 32 is not below diffusion_models/tiny_flux.safetensors's 16." in bad(nodes, bits_per_weight=32.0)
    assert "both set the size budget" in bad(nodes, target_size="10KB", bits_per_weight=4.0)
    assert "calibration 'missing.safetensors' is not in models/cq_calibration" in bad(nodes, calibration="missing.safetensors")
    assert sorted(p.name for p in folder.iterdir()) == ["tiny_flux.safetensors"]
    quantize(nodes[1], "diffusion_models/tiny_flux.safetensors", "nvfp4")
    assert quantize(nodes[1], "diffusion_models/tiny_flux.safetensors", "nvfp4").startswith(
        "tiny_flux_nvfp4.safetensors is up to date")  # its own file, same inputs: nothing to do
    (folder / "tiny_flux_nvfp4.safetensors").write_bytes(tiny_flux.read_bytes())  # someone else's file now
    assert "tiny_flux_nvfp4.safetensors already exists in diffusion_models; turn on 'overwrite'" in bad(nodes)
    write_checkpoint(folder / "norms.safetensors", {"norm.weight": torch.ones(8), "proj.bias": torch.zeros(4)})
    message = bad(nodes, model_file="diffusion_models/norms.safetensors", fmt="float8_e4m3fn")
    assert message == ("nothing in diffusion_models/norms.safetensors would be quantized to float8_e4m3fn "
                       "(it holds no 2-D weight); no file written.")
    assert not (folder / "norms_float8_e4m3fn.safetensors").exists()
    with pytest.raises(Exception, match="calibration_name is empty"):
        nodes[0].capture(None, "  ", RANK, "cpu")
    with pytest.raises(Exception, match="must name a file inside"):
        nodes[0].capture(None, "../escape", RANK, "cpu")


def test_statistics_of_another_model_are_refused_before_sampling_and_before_quantizing(comfyui, models_dir,
                                                                                     tiny_flux, nodes):
    from safetensors.torch import save_file

    stats = models_dir / "cq_calibration"
    stats.mkdir(exist_ok=True)
    save_file({"double_blocks.0.img_attn.qkv.absmax": torch.ones(7)}, str(stats / "other.safetensors"))
    reference, _ = load_diffusion_model(tiny_flux)
    with pytest.raises(Exception, match=r"other.safetensors holds statistics of another model \(layer "
                                        r"'double_blocks.0.img_attn.qkv' has 7 input features there, 128 here\)"):
        nodes[0].capture(reference, "other", RANK, "model device")
    message = bad(nodes, optimizer="gptq", calibration="other.safetensors")
    assert "calibration 'other.safetensors' holds statistics of another model" in message
    assert not (models_dir / "diffusion_models" / "tiny_flux_nvfp4_gptq.safetensors").exists()


def test_the_report_shows_every_warning(comfyui, models_dir, tiny_flux, nodes):
    captured(comfyui, nodes, tiny_flux)
    report = quantize(nodes[1], "diffusion_models/tiny_flux.safetensors", "float8_e4m3fn", preset="wan",
                      calibration="tiny_flux.safetensors")
    lines = report.splitlines()
    assert lines[0].startswith("warning: optimizer rtn does not use the calibration statistics")
    assert lines[1].startswith("warning: preset wan was chosen, but diffusion_models/tiny_flux.safetensors looks "
                               "like flux (") and lines[1].endswith("'auto' would use flux.")
    assert "2.04 MB -> 1.04 MB" in report and "preset: wan (chosen in 'preset')" in report and "--" not in report


def test_a_size_budget_fits_and_says_what_it_chose(comfyui, models_dir, tiny_flux, nodes):
    size = tiny_flux.stat().st_size
    target = f"{int(size * 0.6) // 1000}KB"
    report = quantize(nodes[1], "diffusion_models/tiny_flux.safetensors", "nvfp4", target_size=target,
                      gpu="blackwell")
    out = models_dir / "diffusion_models" / f"tiny_flux_{target}-blackwell.safetensors"
    assert out.stat().st_size <= int(target[:-2]) * 1000
    assert f"size budget {int(target[:-2]) / 1000:.2f} MB" in report or f"size budget {int(target[:-2]):.2f} KB" in report
    assert "chose per layer among float8_e4m3fn, mxfp8, nvfp4, bf16 (what ComfyUI runs natively on blackwell)" in report
    patcher, log = load_diffusion_model(out)
    assert log.problems() == []
    quantize(nodes[1], "diffusion_models/tiny_flux.safetensors", "float8_e4m3fn", bits_per_weight=10.0)
    assert (models_dir / "diffusion_models" / "tiny_flux_10bpw.safetensors").is_file()


def test_the_node_runs_again_when_its_files_change_and_never_reports_a_stale_file(comfyui, models_dir, tiny_flux,
                                                                                  nodes):
    """``IS_CHANGED`` (asked once per queued prompt, before it runs): the same token while the
    statistics, the source and the output are those of the last run; a new one otherwise."""
    node = nodes[1]
    widgets = dict(model_file="diffusion_models/tiny_flux.safetensors", format="nvfp4", preset="auto",
                   optimizer="gptq", calibration="tiny_flux.safetensors", overwrite=True)
    out = models_dir / "diffusion_models" / "tiny_flux_nvfp4_gptq.safetensors"
    reference = captured(comfyui, nodes, tiny_flux, runs=2)
    first = node.IS_CHANGED(**widgets)
    quantize(node, "diffusion_models/tiny_flux.safetensors", "nvfp4", optimizer="gptq",
             calibration="tiny_flux.safetensors", overwrite=True)
    written = out.stat().st_mtime_ns
    assert node.IS_CHANGED(**widgets) == first  # queued again, nothing changed: ComfyUI reuses the result
    again = quantize(node, "diffusion_models/tiny_flux.safetensors", "nvfp4", optimizer="gptq",
                     calibration="tiny_flux.safetensors", overwrite=True)
    assert again.startswith("tiny_flux_nvfp4_gptq.safetensors is up to date") and out.stat().st_mtime_ns == written

    (model,) = nodes[0].capture(reference, "tiny_flux", RANK, "model device")
    sample(comfyui, model, "flux", seed=7)  # the statistics change
    second = node.IS_CHANGED(**widgets)
    assert second != first
    quantize(node, "diffusion_models/tiny_flux.safetensors", "nvfp4", optimizer="gptq",
             calibration="tiny_flux.safetensors", overwrite=True)
    assert out.stat().st_mtime_ns != written
    assert node.IS_CHANGED(**widgets) == second

    out.unlink()  # the output deleted: run again, write it again
    third = node.IS_CHANGED(**widgets)
    assert third not in (first, second)
    quantize(node, "diffusion_models/tiny_flux.safetensors", "nvfp4", optimizer="gptq",
             calibration="tiny_flux.safetensors", overwrite=False)
    assert out.is_file() and node.IS_CHANGED(**widgets) == third
    assert node.IS_CHANGED(**{**widgets, "target_size": "12 apples"}) != node.IS_CHANGED(**{**widgets, "target_size": "12 apples"})  # NaN: a bad widget always runs, and says why


def test_comfyuis_cpu_flag_and_gpu_memory(comfyui, models_dir, tiny_flux, nodes, monkeypatch):
    """Under ``--cpu`` the node quantizes on the CPU; with a CUDA device it quantizes there after
    ComfyUI unloads its models (``unload_all_models``, ``soft_empty_cache``)."""
    import comfy.cli_args
    import comfy.model_management

    from cq_comfyui import nodes as node_module
    from cq_comfyui import running_comfyui

    calls, devices = [], []
    monkeypatch.setattr(comfy.model_management, "get_torch_device", lambda: torch.device("cuda", 0))
    monkeypatch.setattr(comfy.model_management, "unload_all_models", lambda: calls.append("unload"))
    monkeypatch.setattr(comfy.model_management, "soft_empty_cache", lambda force=False: calls.append("empty"))
    real_convert = node_module.convert

    def convert(*args, device=None, **kwargs):
        devices.append(device)
        return real_convert(*args, device="cpu", **kwargs)  # this machine has no CUDA device

    monkeypatch.setattr(node_module, "convert", convert)
    monkeypatch.setattr(comfy.cli_args.args, "cpu", True)
    quantize(nodes[1], "diffusion_models/tiny_flux.safetensors", "float8_e4m3fn")
    assert devices[-1] == "cpu" and calls == []
    monkeypatch.setattr(comfy.cli_args.args, "cpu", False)
    assert running_comfyui.quantize_device() == "cuda:0"
    quantize(nodes[1], "diffusion_models/tiny_flux.safetensors", "float8_e5m2")
    assert devices[-1] == "cuda:0" and calls == ["unload", "empty"]


@pytest.mark.slow
def test_cq_calibrate_comfyui_runs_on_a_cpu_only_torch(comfyui, tmp_path):
    """A fresh process, as a user runs it: ComfyUI picks its device on import, and without being
    told to use the CPU it fails on a CPU-only torch ("Torch not compiled with CUDA enabled")."""
    import os
    import subprocess

    from tests.comfyui_server import stub_folder

    source = write_checkpoint(tmp_path / "tiny_flux.safetensors", tiny(comfyui, FLUX_CONFIG, "Flux"))
    env = {**os.environ, "PYTHONPATH": str(stub_folder(tmp_path / "stubs"))}

    def calibrate(*extra):
        return subprocess.run(
            [sys.executable, "-m", "cq_core", "calibrate", str(source), "--comfyui", str(comfyui_root()), "-o",
             str(tmp_path / "stats.safetensors"), "--runs", "1", "--steps", "1", "--latent-size", "8x8",
             "--rank", str(RANK), "--overwrite", *extra], capture_output=True, text=True, env=env, timeout=300)

    result = calibrate()
    assert result.returncode == 0, result.stderr[-3000:]
    assert "wrote statistics of 23 Linear layers" in result.stdout
    assert CalibrationFile(tmp_path / "stats.safetensors").rows["double_blocks.0.img_attn.qkv"] > 0
    if not torch.cuda.is_available():
        result = calibrate("--device", "cuda")
        assert result.returncode == 2 and "--device cuda: this torch" in result.stderr and "no CUDA device" in result.stderr
    result = calibrate("--device", "tpu")
    assert result.returncode == 2 and "--device 'tpu' must be auto, cpu, cuda or cuda:N." in result.stderr
