"""cq's output through ComfyUI's own loader (tests/comfyui.py): a tiny FLUX built with ComfyUI's class.

Run by each ComfyUI release the tests have (0.30.0; 0.33.0 under ``--also-comfyui 0.33.0``):
every format some release loads, through that release's loader, and a format the release
does not load (asym_w4a8_int8 on 0.30.0) refused by it, naming the format.
"""

from __future__ import annotations

import pytest
import torch

import cq_core
from tests.comfyui import load_diffusion_model
from tests.conftest import write_checkpoint
from tests.matrix import MATRIX_FORMATS, judge_loads


@pytest.fixture(scope="module")
def tiny_flux(comfyui, tmp_path_factory):
    """A FLUX.1 with ComfyUI's own class and key names, hidden size 128, one block of each kind."""
    from comfy.ldm.flux.model import Flux

    torch.manual_seed(0)
    model = Flux(image_model="flux", in_channels=16, out_channels=16, vec_in_dim=32, context_in_dim=32,
                 hidden_size=128, mlp_ratio=4.0, num_heads=1, depth=1, depth_single_blocks=1,
                 axes_dim=[16, 56, 56], theta=10000, patch_size=2, qkv_bias=True, guidance_embed=True,
                 txt_ids_dims=[], operations=comfyui.ops.manual_cast, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.05)
    state = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}
    return write_checkpoint(tmp_path_factory.mktemp("flux") / "flux.safetensors", state)


def _forward(patcher) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 16, 8, 8, generator=g)
    context = torch.randn(1, 7, 32, generator=g)
    y = torch.randn(1, 32, generator=g)
    with torch.no_grad():
        return patcher.model.diffusion_model(x, torch.tensor([0.5]), context=context, y=y,
                                             guidance=torch.tensor([3.5])).float()


# model="none": no preset, so the shape guard alone keeps img_in and friends for the formats
# that change a stored shape (convrot_w4a4 used to load with in_channels 8, issue 15).
@pytest.mark.parametrize("model", [None, "none"])
@pytest.mark.parametrize("fmt", [f for f in MATRIX_FORMATS if judge_loads(f)])
def test_tiny_flux_loads_in_comfyui_with_the_source_config(tmp_path, tiny_flux, fmt, model):
    reference, _ = load_diffusion_model(tiny_flux)
    out = tmp_path / f"flux-{fmt}.safetensors"
    cq_core.convert(tiny_flux, out, format=fmt, model=model)
    patcher, log = load_diffusion_model(out)
    assert patcher.model.model_config.unet_config == reference.model.model_config.unet_config
    assert log.problems() == []
    want, got = _forward(reference), _forward(patcher)
    assert torch.isfinite(got).all()
    rel = (got - want).norm() / want.norm()
    assert rel < 0.5, f"{fmt}: relative output error {rel:.3f}"


@pytest.mark.parametrize("fmt", [f for f in MATRIX_FORMATS if not judge_loads(f)] or
                         [pytest.param(None, marks=pytest.mark.skip(reason="this ComfyUI loads every format"))])
def test_a_format_this_comfyui_does_not_load_is_refused_naming_it(tmp_path, tiny_flux, fmt):
    """ComfyUI before a format's ``comfyui_since`` (0.30.0 for asym_w4a8_int8) raises on the layer's
    format: ``comfy/ops.py`` looks it up in ``QUANT_ALGOS`` (KeyError). A refusal, not a wrong model."""
    out = tmp_path / f"flux-{fmt}.safetensors"
    cq_core.convert(tiny_flux, out, format=fmt)
    with pytest.raises(KeyError, match=fmt):
        load_diffusion_model(out)


def test_a_prefixed_file_loads_like_the_bare_one(tmp_path, tiny_flux):
    """``model.diffusion_model.`` keys: the header names the prefixed layers (they must equal the file's
    keys), ComfyUI strips the prefix and loads the same quantized model; the only noise is its own
    re-created comfy_quant keys, which LoadLog.problems() knows (tests/comfyui.py)."""
    from safetensors.torch import load_file

    from tests.comfyui import _recreated_comfy_quant

    prefixed = write_checkpoint(tmp_path / "prefixed.safetensors",
                                {f"model.diffusion_model.{k}": v for k, v in load_file(tiny_flux).items()})
    for fmt in ("float8_e4m3fn", "nvfp4"):
        bare, pre = tmp_path / f"bare-{fmt}.safetensors", tmp_path / f"pre-{fmt}.safetensors"
        cq_core.convert(tiny_flux, bare, format=fmt)
        cq_core.convert(prefixed, pre, format=fmt)
        (want, _), (got, log) = load_diffusion_model(bare), load_diffusion_model(pre)
        assert log.problems() == []
        assert any(_recreated_comfy_quant(line) for line in log.unexpected)
        assert torch.equal(_forward(want), _forward(got))


def test_the_import_stubs_look_like_bare_modules(comfyui):
    """ComfyUI's unused torchvision/torchaudio are import-only stubs; other code probing modules for
    ``__file__`` (hypothesis does, in the same session) must not get a placeholder class."""
    import sys

    for name in ("torchvision", "torchaudio"):
        module = sys.modules.get(name)
        if module is not None:
            assert getattr(module, "__file__", None) is None or isinstance(module.__file__, str)
            assert isinstance(module.Anything, type)


def test_a_size_budget_output_mixing_formats_loads_in_comfyui(tmp_path, tiny_flux):
    """The budget writes nvfp4, fp8 and bf16 layers side by side; ComfyUI builds the same model from them."""
    reference, _ = load_diffusion_model(tiny_flux)
    sizes = {}
    for fmt in ("nvfp4", "float8_e4m3fn"):
        cq_core.convert(tiny_flux, tmp_path / f"{fmt}.safetensors", format=fmt)
        sizes[fmt] = (tmp_path / f"{fmt}.safetensors").stat().st_size
    out = tmp_path / "budget.safetensors"
    report = cq_core.convert(tiny_flux, out, format="nvfp4", target_size=(sizes["nvfp4"] + sizes["float8_e4m3fn"]) // 2,
                             formats="nvfp4,float8_e4m3fn,bf16")
    assert {"nvfp4", "float8_e4m3fn"} <= set(report.budget["choices"].values())
    patcher, log = load_diffusion_model(out)
    assert patcher.model.model_config.unet_config == reference.model.model_config.unet_config
    assert log.problems() == []
    want, got = _forward(reference), _forward(patcher)
    assert torch.isfinite(got).all() and (got - want).norm() / want.norm() < 0.5
