"""The node pack in a running ComfyUI 0.30.0, as a user meets it: ComfyUI's own ``main.py`` on the
CPU (127.0.0.1 only), this checkout as ``custom_nodes/cq`` (tests/comfyui_server.py), driven over
its HTTP API and websocket, then through the stock frontend in a headless Chromium.

A tiny FLUX.1-dev built with ComfyUI's classes (tests/families) is the model; its conditioning
comes from ComfyUI's own ``LoadTrainingDataset`` node (the files ``SaveTrainingDataset`` writes),
so no text encoder is needed. Everything runs in one server, started once for the module
(about 10 s), in the order of the tests. ``python -m pytest tests/test_comfyui_server.py -s``
prints the measured times and the held-out errors (docs/comfyui_nodes.md).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch

from cq_core.io.calibration_file import CalibrationFile
from tests.comfyui_server import PACK_NAME, REPOSITORY, ComfyUIServer, install_pack
from tests.conftest import write_checkpoint
from tests.families._dit import tiny
from tests.families.image import FLUX_CONFIG

pytestmark = pytest.mark.slow

SOURCE = "tiny_flux.safetensors"
STATS = "tiny_flux"
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
#: Flags that run Chromium headless here; the resolver rule keeps the page from reaching any
#: host but this machine (the stock frontend asks api.comfy.org for release notes).
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1600,1000", "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1")

MEASURED: dict[str, object] = {}


def save_dataset(folder: Path, seed: int, samples: int) -> None:
    """A dataset as ComfyUI's ``SaveTrainingDataset`` writes it: empty 8x8 FLUX latents and
    random T5/CLIP-width conditioning (tiny FLUX: 32 wide), FLUX guidance 3.5."""
    g = torch.Generator().manual_seed(seed)
    folder.mkdir(parents=True)
    latents = [{"samples": torch.zeros(1, 16, 8, 8)} for _ in range(samples)]
    conditioning = [[[torch.randn(1, 7, 32, generator=g), {"pooled_output": torch.randn(1, 32, generator=g),
                                                            "guidance": 3.5}]] for _ in range(samples)]
    torch.save({"latents": latents, "conditioning": conditioning}, folder / "shard_0000.pkl")
    (folder / "metadata.json").write_text(json.dumps({"num_samples": samples, "num_shards": 1, "shard_size": samples}))


@pytest.fixture(scope="module")
def server(comfyui, tmp_path_factory):
    started = time.perf_counter()
    base = tmp_path_factory.mktemp("comfyui")
    install_pack(base / "custom_nodes")
    models = base / "models"
    (models / "diffusion_models").mkdir(parents=True)
    (models / "checkpoints").mkdir(parents=True)
    write_checkpoint(models / "diffusion_models" / SOURCE, tiny(comfyui, FLUX_CONFIG, "Flux"))
    (models / "checkpoints" / "old.ckpt").write_bytes(b"\x80\x02not a safetensors file")
    save_dataset(base / "datasets" / "calibration", seed=1, samples=2)
    save_dataset(base / "datasets" / "held_out", seed=2, samples=4)
    with ComfyUIServer(base) as running:
        MEASURED["server start s"] = round(running.started_in, 1)
        yield running
    MEASURED["module wall s"] = round(time.perf_counter() - started, 1)
    print("\nComfyUI server test, measured:\n" + "\n".join(f"  {k}: {v}" for k, v in MEASURED.items()))


def quantize_node(fmt="nvfp4", optimizer="rtn", calibration="none", overwrite=False, **optional):
    return {"class_type": "CqQuantizeModel", "inputs": {
        "model_file": f"diffusion_models/{SOURCE}", "format": fmt, "preset": "auto", "optimizer": optimizer,
        "calibration": calibration, "overwrite": overwrite, **optional}}


def sampling(model: list, dataset: str, seed: int, steps: int, prefix: str, cfg: float = 1.0) -> dict:
    """ComfyUI's own nodes: the dataset's conditioning and latents into a KSampler (negative: the
    conditioning zeroed, unused at cfg 1 as FLUX.1-dev runs), the result saved as a latent file."""
    return {
        "data": {"class_type": "LoadTrainingDataset", "inputs": {"folder_name": dataset}},
        "negative": {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ["data", 1]}},
        "sampler": {"class_type": "KSampler", "inputs": {
            "model": model, "seed": seed, "steps": steps, "cfg": cfg, "sampler_name": "euler", "scheduler": "simple",
            "positive": ["data", 1], "negative": ["negative", 0], "latent_image": ["data", 0], "denoise": 1.0}},
        "save": {"class_type": "SaveLatent", "inputs": {"samples": ["sampler", 0], "filename_prefix": prefix}},
    }


def loader(name: str) -> dict:
    return {"class_type": "UNETLoader", "inputs": {"unet_name": name, "weight_dtype": "default"}}


def capture_prompt(seed: int) -> dict:
    return {"load": loader(SOURCE),
            "capture": {"class_type": "CqCaptureCalibration", "inputs": {
                "model": ["load", 0], "calibration_name": STATS, "rank": 32, "accumulate_on": "model device"}},
            **sampling(["capture", 0], "calibration", seed, steps=2, prefix=f"capture_{seed}")}


def latents(server: ComfyUIServer, run) -> torch.Tensor:
    """The latents the run's SaveLatent node wrote, stacked in order."""
    from safetensors.torch import load_file

    files = run.ui("save")["latents"]
    return torch.cat([load_file(str(server.base / "output" / f["subfolder"] / f["filename"]))["latent_tensor"]
                      for f in files])


def one_step(server: ComfyUIServer, model_file: str, tag: str) -> torch.Tensor:
    """One sampling step of ``model_file`` (loaded by UNETLoader) on the held-out conditioning."""
    run = server.run({"load": loader(model_file), **sampling(["load", 0], "held_out", 5, steps=1, prefix=tag)})
    assert run.ok, run.error or run.history
    out = latents(server, run)
    assert out.shape == (4, 16, 8, 8) and torch.isfinite(out).all()
    return out


def relative(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).norm() / want.norm())


def stamp(path: Path):
    st = path.stat()
    return st.st_mtime_ns, st.st_ino


def test_object_info_lists_the_nodes_as_this_comfyui_loads_them(server, comfyui):
    import comfy.quant_ops

    from cq_core import get_registry

    log = server.log()
    pack = server.base / "custom_nodes" / PACK_NAME
    assert f"seconds: {pack}" in log and f"(IMPORT FAILED): {pack}" not in log
    info = server.get("/object_info")
    assert info["CqCaptureCalibration"]["display_name"] == "Capture calibration (cq)"
    quantize = info["CqQuantizeModel"]
    assert quantize["display_name"] == "Quantize model (cq)" and quantize["category"] == "cq"
    required = quantize["input"]["required"]
    offered = required["format"][0]
    assert offered == sorted(set(get_registry().formats) & set(comfy.quant_ops.QUANT_ALGOS))
    assert "int8_blockwise" not in offered and "asym_w4a8_int8" not in offered
    assert required["model_file"][0] == [f"diffusion_models/{SOURCE}"]  # no .ckpt
    assert "vae" not in required["preset"][0]
    assert quantize["output"] == ["STRING"]
    script = server.get(f"/extensions/{PACK_NAME}/cq_report.js")
    assert b"registerExtension" in script and b"CqQuantizeModel" in script


def test_every_offered_format_quantizes_loads_and_samples(server):
    formats = server.get("/object_info/CqQuantizeModel")["CqQuantizeModel"]["input"]["required"]["format"][0]
    run = server.run({f"q_{fmt}": quantize_node(fmt) for fmt in formats})
    assert run.ok, run.error
    seconds = run.node_seconds()
    MEASURED["Quantize node s per format (tiny FLUX, 2.0 MB)"] = {fmt: round(seconds[f"q_{fmt}"], 2) for fmt in formats}
    progress = {d["node"] for d in run.of_type("progress")}
    assert {f"q_{fmt}" for fmt in formats} <= progress  # ComfyUI's progress bar, over the websocket
    for fmt in formats:
        (report,) = run.ui(f"q_{fmt}")["text"]
        assert f"layers quantized to {fmt}" in report
    reference = one_step(server, SOURCE, "source")
    errors = {}
    for fmt in formats:
        errors[fmt] = round(relative(one_step(server, f"tiny_flux_{fmt}.safetensors", fmt), reference), 4)
    MEASURED["one step, held out, relative latent difference vs source (rtn)"] = errors
    assert all(0 < e < 0.5 for e in errors.values())


def test_capture_then_gptq_reruns_exactly_when_its_files_change(server):
    stats = server.base / "models" / "cq_calibration" / f"{STATS}.safetensors"
    assert server.run(capture_prompt(1)).ok
    first = CalibrationFile(stats).rows
    assert server.run(capture_prompt(2)).ok  # a second queued prompt adds to the file
    rows = CalibrationFile(stats).rows
    assert rows and all(rows[k] == 2 * first[k] > 0 for k in rows)

    quant = {"q": quantize_node("nvfp4", "gptq", f"{STATS}.safetensors")}
    out = server.base / "models" / "diffusion_models" / "tiny_flux_nvfp4_gptq.safetensors"
    run = server.run(quant)
    assert run.ok and "q" in run.executed_nodes, run.error
    (report,) = run.ui("q")["text"]
    assert "measured on the calibration statistics it was fitted to (in-sample)" in report
    written = stamp(out)
    again = server.run(quant)  # queued again, nothing changed: ComfyUI reuses the result
    assert again.ok and "q" in again.cached_nodes and "q" not in again.executed_nodes and stamp(out) == written

    assert server.run(capture_prompt(3)).ok  # the statistics change: the node runs again ...
    refused = server.run(quant)
    assert refused.error["node_id"] == "q" and "tiny_flux_nvfp4_gptq.safetensors already exists in " \
        "diffusion_models; turn on 'overwrite' to replace it." in refused.error["exception_message"]
    quant["q"]["inputs"]["overwrite"] = True
    run = server.run(quant)  # ... and writes a new file
    assert run.ok and "q" in run.executed_nodes and stamp(out) != written
    written = stamp(out)
    out.unlink()  # the output deleted: the node runs again and writes it again
    run = server.run(quant)
    assert run.ok and "q" in run.executed_nodes and out.is_file() and stamp(out) != written

    # In the same prompt, after the sampler (linked to after_sampling): it runs after that
    # sampling run, with its statistics; queued again unchanged, nothing runs twice.
    both = {**capture_prompt(4), "q": quantize_node("nvfp4", "gptq", f"{STATS}.safetensors", True,
                                                    after_sampling=["sampler", 0])}
    before = CalibrationFile(stats).rows
    run = server.run(both)
    assert run.ok, run.error
    order = run.executed_nodes
    assert order.index("sampler") < order.index("q")
    assert all(CalibrationFile(stats).rows[k] > before[k] for k in before)
    again = server.run(both)
    assert again.ok and "q" not in again.executed_nodes and "sampler" not in again.executed_nodes


def test_held_out_gain_of_gptq_and_learned_over_rtn_through_the_node(server):
    """Statistics from the calibration prompts (the runs above); errors on other prompts."""
    run = server.run({"rtn": quantize_node("nvfp4"),
                      "learned": quantize_node("nvfp4", "learned", f"{STATS}.safetensors", True),
                      "gptq": quantize_node("nvfp4", "gptq", f"{STATS}.safetensors", True)})
    assert run.ok, run.error
    reference = one_step(server, SOURCE, "source_held_out")
    errors = {name: relative(one_step(server, f"tiny_flux_nvfp4{suffix}.safetensors", name), reference)
              for name, suffix in (("rtn", ""), ("gptq", "_gptq"), ("learned", "_learned"))}
    MEASURED["nvfp4, one step, held out, relative latent difference"] = {k: round(v, 4) for k, v in errors.items()}
    assert errors["gptq"] < errors["rtn"] and errors["learned"] < errors["rtn"]


def test_bad_inputs_get_the_nodes_words(server):
    from safetensors.torch import save_file

    cases = {
        "needs calibration": ({"q": quantize_node("nvfp4", "gptq")},
                              "optimizer 'gptq' needs calibration statistics: choose a file in 'calibration'"),
        "bad size": ({"q": quantize_node("nvfp4", target_size="12 apples")},
                     "target_size '12 apples' is not a size like 12GB, 500MB or 2GiB."),
    }
    save_file({"double_blocks.0.img_attn.qkv.absmax": torch.ones(7)},
              str(server.base / "models" / "cq_calibration" / "other.safetensors"))
    other = capture_prompt(9)
    other["capture"]["inputs"]["calibration_name"] = "other"
    cases["another model"] = (other, "other.safetensors holds statistics of another model (layer "
                                     "'double_blocks.0.img_attn.qkv' has 7 input features there, 128 here)")
    for name, (prompt, message) in cases.items():
        run = server.run(prompt)
        assert run.error is not None, name
        assert message in run.error["exception_message"] and "--" not in run.error["exception_message"], name
    status, answer = server.post("/prompt", {"prompt": {"q": quantize_node("int8_blockwise")}})
    assert status == 400 and "int8_blockwise" in json.dumps(answer)  # not offered: ComfyUI's own validation


def chromium():
    """A headless Chromium through chromedriver (Debian's chromium, chromium-driver), or a skip."""
    if not (os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)):
        message = "chromium and chromium-driver are not installed (apt-get install chromium chromium-driver)"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(message)
        pytest.skip(message)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    return webdriver, Service


def test_the_stock_frontend_renders_the_example_and_shows_the_report(server, tmp_path):
    webdriver, Service = chromium()
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    workflow = json.loads((REPOSITORY / "examples" / "comfyui" / "flux_calibrate_and_quantize.json").read_text())
    # A first visit opens the template browser over the canvas; a user who has been here has closed it.
    assert server.post("/settings/Comfy.TutorialCompleted", True)[0] == 200
    started = time.perf_counter()
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        driver.set_script_timeout(120)
        driver.get(server.url)
        deadline = time.monotonic() + 90
        while not driver.execute_script("return !!(window.comfyAPI?.app?.app?.graph "
                                        "&& window.LiteGraph?.registered_node_types?.CqQuantizeModel)"):
            assert time.monotonic() < deadline, "the frontend did not load cq's nodes"
            time.sleep(0.25)
        nodes = driver.execute_async_script("""
            const done = arguments[arguments.length - 1], app = window.comfyAPI.app.app;
            app.loadGraphData(arguments[0]).then(() => done(app.graph.nodes.map(n => ({
                type: n.type, registered: !!LiteGraph.registered_node_types[n.type], errors: !!n.has_errors,
                title: n.title, widgets: (n.widgets || []).map(w => [w.name, w.value]), mode: n.mode}))))
              .catch(e => done(String(e)));""", workflow)
        assert isinstance(nodes, list), nodes
        assert all(n["registered"] for n in nodes), [n["type"] for n in nodes if not n["registered"]]
        cq = {n["type"]: n for n in nodes if n["type"].startswith("Cq")}
        assert set(cq) == {"CqCaptureCalibration", "CqQuantizeModel"}
        assert not any(n["errors"] for n in cq.values())
        assert dict(cq["CqCaptureCalibration"]["widgets"]) == {"calibration_name": "flux1-dev", "rank": 512,
                                                               "accumulate_on": "model device"}
        widgets = dict(cq["CqQuantizeModel"]["widgets"])
        assert [w for w, _ in cq["CqQuantizeModel"]["widgets"]] == [
            "model_file", "format", "preset", "optimizer", "calibration", "overwrite", "target_size",
            "bits_per_weight", "gpu", "cq_report"]
        assert widgets["format"] == "nvfp4" and widgets["optimizer"] == "gptq" and cq["CqQuantizeModel"]["mode"] == 2
        assert "Missing Node Types" not in driver.execute_script("return document.body.innerText")
        driver.save_screenshot(str(tmp_path / "example_workflow.png"))

        # The report on the node: a Quantize node queued from the page itself.
        report = driver.execute_async_script("""
            const done = arguments[arguments.length - 1], app = window.comfyAPI.app.app;
            (async () => {
              app.graph.clear();
              const node = LiteGraph.createNode("CqQuantizeModel");
              node.pos = [200, 100];
              app.graph.add(node);
              const widget = name => node.widgets.find(w => w.name === name);
              widget("model_file").value = arguments[0];
              widget("format").value = "float8_e4m3fn";
              widget("overwrite").value = true;
              await app.queuePrompt(0, 1);
              for (let i = 0; i < 400; i++) {
                if (widget("cq_report").value) return done(widget("cq_report").value);
                await new Promise(resolve => setTimeout(resolve, 250));
              }
              done(null);
            })().catch(e => done("error: " + e));""", f"diffusion_models/{SOURCE}")
        assert report and "layers quantized to float8_e4m3fn" in report, report
        time.sleep(0.5)
        driver.save_screenshot(str(tmp_path / "report_on_the_node.png"))
    finally:
        driver.quit()
    MEASURED["browser s"] = round(time.perf_counter() - started, 1)
    MEASURED["screenshots"] = str(tmp_path)
