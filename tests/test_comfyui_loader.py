"""cq's output through ComfyUI's own loader (tests/comfyui.py): a tiny FLUX built with ComfyUI's class."""

from __future__ import annotations

import pytest
import torch

import cq_core
from tests.comfyui import load_diffusion_model
from tests.conftest import write_checkpoint

STOCK_FORMATS = ("float8_e4m3fn", "float8_e5m2", "int8_tensorwise", "nvfp4", "mxfp8", "convrot_w4a4")


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


# convrot_w4a4 halves dim 1 and has no shape guard yet: without the flux preset (which keeps img_in,
# now that FLUX is detected in ComfyUI's own naming) ComfyUI detects in_channels 8 (issue 15).
@pytest.mark.parametrize("fmt", [*STOCK_FORMATS, pytest.param(
    "convrot_w4a4/none", marks=pytest.mark.xfail(strict=True, reason="no shape guard"))])
def test_tiny_flux_loads_in_comfyui_with_the_source_config(tmp_path, tiny_flux, fmt):
    reference, _ = load_diffusion_model(tiny_flux)
    fmt, _, model = fmt.partition("/")
    out = tmp_path / f"flux-{fmt}.safetensors"
    cq_core.convert(tiny_flux, out, format=fmt, model=model or None)
    patcher, log = load_diffusion_model(out)
    assert patcher.model.model_config.unet_config == reference.model.model_config.unet_config
    assert log.problems() == []
    want, got = _forward(reference), _forward(patcher)
    assert torch.isfinite(got).all()
    rel = (got - want).norm() / want.norm()
    assert rel < 0.5, f"{fmt}: relative output error {rel:.3f}"
