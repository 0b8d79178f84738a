"""UNets and all-in-one checkpoints, as tiny instances of ComfyUI's own classes.

The all-in-one family is a FLUX.1 checkpoint as ComfyUI's CheckpointSave
writes it: ``model.diffusion_model.*`` (``comfy.ldm.flux.model.Flux``),
``text_encoders.clip_l.transformer.*`` and ``text_encoders.t5xxl.transformer.*``
(``clip_model.CLIPTextModel``, ``t5.T5``) and ``vae.*`` (the Flux VAE:
``comfy.ldm.models.autoencoder`` Encoder/Decoder with 16 latent channels).
``load_checkpoint_guess_config`` detects the VAE from ``decoder.conv_in``: the
encoder width is hard-coded (ch 128, ch_mult 1,2,4,4, ~34M parameters, all
convolutions cq never quantizes), the decoder's width follows its
``conv_in`` (32 here: GroupNorm needs multiples of 32).

UNets: ComfyUI matches their widths exactly, so only depth shrinks: SD1.5 with
one level (``sd15_unet``); SDXL's depth is matched too (``IMPOSSIBLE``).
"""

from __future__ import annotations

import functools

import torch

from tests.families import Family, Impossible, StateDict
from tests.families.text import _clip_build, _t5_build, _t5_config

CLIP_L = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=1, vocab_size=384)
FLUX = dict(image_model="flux", in_channels=16, out_channels=16, vec_in_dim=64, context_in_dim=16,
            hidden_size=128, mlp_ratio=4.0, num_heads=1, depth=1, depth_single_blocks=1,
            axes_dim=[16, 56, 56], theta=10000, patch_size=2, qkv_bias=True, guidance_embed=True,
            txt_ids_dims=[])
VAE = dict(double_z=True, z_channels=16, resolution=256, in_channels=3, out_ch=3, ch=128, ch_mult=[1, 2, 4, 4],
           num_res_blocks=2, attn_resolutions=[], dropout=0.0)
VAE_DECODER_CH = 32


def _seeded_module(module: torch.nn.Module, seed: int, std: float = 0.05) -> StateDict:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, value in module.state_dict().items():
        noise = torch.randn(value.shape, generator=g)
        out[name] = ((1 + 0.1 * noise) if value.ndim == 1 and "norm" in name else noise * std).to(torch.bfloat16)
    return out


def _flux_vae(comfy) -> StateDict:
    from comfy.ldm.modules.diffusionmodules.model import Decoder, Encoder

    encoder = Encoder(**VAE)
    decoder = Decoder(**{**VAE, "ch": VAE_DECODER_CH})
    return {**{f"encoder.{k}": v for k, v in _seeded_module(encoder, 21).items()},
            **{f"decoder.{k}": v for k, v in _seeded_module(decoder, 22).items()}}


def _flux_all_in_one(comfy) -> StateDict:
    from comfy.ldm.flux.model import Flux

    flux = Flux(**FLUX, operations=comfy.ops.manual_cast, dtype=torch.float32)
    state = {f"model.diffusion_model.{k}": v for k, v in _seeded_module(flux, 23).items()}
    state.update({f"text_encoders.t5xxl.transformer.{k}": v for k, v in _t5_build("t5", comfy).items()})
    state.update({f"text_encoders.clip_l.transformer.{k}": v
                  for k, v in _clip_build("sd1_clip_config.json", CLIP_L, comfy).items()})
    state.update({f"vae.{k}": v for k, v in _flux_vae(comfy).items()})
    return state


def _te_options() -> dict:
    t5 = _t5_config("t5")
    return {"te_model_options": {
        "t5xxl_model_config": {k: t5[k] for k in ("d_ff", "d_kv", "d_model", "num_heads", "num_layers", "vocab_size")},
        "clip_l_model_config": dict(CLIP_L),
    }}


def _flux_checkpoint_forward(loaded, seed: int) -> torch.Tensor:
    """The diffusion model on fixed inputs, then the T5 on fixed ids: both outputs, flattened."""
    from tests.families.text import encode

    patcher, clip, _ = loaded
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 16, 8, 8, generator=g)
    context = torch.randn(1, 7, FLUX["context_in_dim"], generator=g)
    y = torch.randn(1, FLUX["vec_in_dim"], generator=g)
    with torch.no_grad():
        image = patcher.model.diffusion_model(x, torch.tensor([0.5]), context=context, y=y,
                                              guidance=torch.tensor([3.5])).float()
    t5 = clip.cond_stage_model.t5xxl
    ids = torch.randint(3, 384, (1, 12), generator=g)
    clip.load_model()
    with torch.no_grad():
        text = t5.transformer(ids, None, dtype=torch.float32)[0].float()
    return torch.cat([image.flatten(), text.flatten()])


def _identity(state: StateDict) -> StateDict:
    return state


#: SD1.5 as detect_unet_config reports it, cut to one level with one res block: ComfyUI's SD15 entry
#: matches model_channels 320 and context_dim 768 exactly, not the depth, so only depth can shrink.
SD15 = dict(use_checkpoint=False, image_size=32, out_channels=4, use_spatial_transformer=True, legacy=False,
            adm_in_channels=None, in_channels=4, model_channels=320, num_res_blocks=[1], transformer_depth=[1],
            channel_mult=[1], transformer_depth_middle=1, use_linear_in_transformer=False, context_dim=768,
            num_heads=8, num_head_channels=-1, transformer_depth_output=[1, 1], use_temporal_resblock=False,
            use_temporal_attention=False)


def _sd15_unet(comfy) -> StateDict:
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    model = UNetModel(**SD15, operations=comfy.ops.manual_cast, dtype=torch.float32)
    return _seeded_module(model, 24)


def _sd15_forward(patcher, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 4, 8, 8, generator=g)
    context = torch.randn(1, 7, SD15["context_dim"], generator=g)
    with torch.no_grad():
        return patcher.model.diffusion_model(x, torch.tensor([500.0]), context=context).float()


FAMILIES: list[Family] = [
    Family(
        name="sd15_unet",
        build=_sd15_unet,
        loader="diffusion",
        namings={"comfyui": _identity},
        forward=_sd15_forward,
        preset="sd15",
        notes="SD1.5 UNet alone (UNETLoader file), ComfyUI's own UNetModel: model_channels 320 and "
              "context_dim 768 (what ComfyUI's SD15 entry matches) with one level, one res block and one "
              "transformer block (~26M parameters, mostly convolutions). Detection reads context_dim from "
              "attn2.to_k's in_features, which a packed or padded format changes. Should get an 'sd15' "
              "preset (none yet): time and label embeddings and the detection-read layers high precision.",
    ),
    Family(
        name="flux_all_in_one",
        build=_flux_all_in_one,
        loader="checkpoint",
        namings={"comfyui": _identity},
        forward=_flux_checkpoint_forward,
        preset="flux",
        loader_options=_te_options(),
        notes="A FLUX.1 dev all-in-one checkpoint (CheckpointSave layout): diffusion model, CLIP-L, T5-XXL and "
              "the Flux VAE in one file. Expected per component: the diffusion model gets the flux preset "
              "(its detection layers in high precision), the T5 gets t5xxl's rules applied under "
              "text_encoders.t5xxl. only, CLIP-L stays high precision (ComfyUI has no quantized path for "
              "CLIP), and vae.* passes through untouched (convolutions; never removed). The forward is the "
              "diffusion model's output and the T5's last hidden state.",
    ),
]


IMPOSSIBLE: list[Impossible] = [
    Impossible("sdxl_unet", "ComfyUI's SDXL entry matches transformer_depth [0, 0, 2, 2, 10, 10] and "
               "model_channels 320 exactly: three full-width levels with 2 and 10 transformer blocks at 640 "
               "and 1280 channels (~2.5B parameters); no tiny instance detects as SDXL. The refiner (384 "
               "channels, depth [0, 0, 4, 4, 4, 4, 0, 0]) likewise."),
    Impossible("sd2_unet", "SD2.x (context_dim 1024, linear proj_in/out) shrinks like sd15_unet (only depth); "
               "not built, to keep the module fast: its Linear layers are sd15_unet's kinds."),
]
