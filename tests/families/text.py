"""Text encoders ComfyUI's ``load_clip`` knows, as tiny instances of its own TE classes.

ComfyUI picks the encoder from a file's key names and a few shapes
(``comfy.sd.detect_te_model``), then builds it from a *fixed* config (a JSON
file in ``comfy/text_encoders/`` or a dataclass in ``llama.py``). Two things
make a tiny instance load as the real type:

* the key set and the shapes detection reads stay those of the real model
  (T5-XXL: 24 blocks and ``d_ff`` 10240 at block 23; Qwen2.5-7B: a 512-wide
  ``k_proj`` bias; Mistral-3 24B: hidden size 5120; Qwen3-4B: 2560; CLIP-G:
  32 layers); every other width is small;
* ComfyUI's own per-encoder config override, ``model_options["<name>_model_config"]``
  (``sd1_clip.SDClipModel`` merges it into the config), gives the loader
  those small widths. :attr:`Family.loader_options` carries it.

Each ``build`` instantiates ComfyUI's own module (``t5.T5``, ``llama.Llama2_``,
``clip_model.CLIPTextModel``) with the tiny config and saves its state dict,
so key names are ComfyUI's. ``forward`` runs the loaded encoder's transformer
on fixed token ids (below the tiny vocabulary) and returns the last hidden
state: the real prompt path would need the full vocabulary (a tokenizer's ids
reach 150k-260k), which would dominate the file.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from tests.families import Family, Impossible, StateDict

VOCAB = 384  # tiny vocabulary: token tables are kept in high precision by cq and read by nobody here
TOKENS = 12


# -- weights --------------------------------------------------------------------------------------

def _seeded(state: dict[str, torch.Tensor], seed: int, small: tuple[str, ...] = ()) -> StateDict:
    """Seeded weights of a calm network: 2-D weights ~ N(0, 1/fan_in) (``small`` names 0.3x that, for
    q/k so attention is not saturated), norms 1 + noise, embeddings N(0, 1); bf16 as saved."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, value in state.items():
        if not value.is_floating_point():
            out[name] = value
            continue
        noise = torch.randn(value.shape, generator=g)
        if value.ndim == 1:
            tensor = 1 + 0.1 * noise if "norm" in name else 0.1 * noise
        elif "embed" in name or name.endswith("shared.weight") or "relative_attention_bias" in name:
            tensor = noise
        else:
            tensor = noise / value.shape[1] ** 0.5
            if any(s in name for s in small):
                tensor = 0.3 * tensor
        out[name] = tensor.to(torch.bfloat16)
    return out


def _state(module: torch.nn.Module, prefix: str = "") -> dict[str, torch.Tensor]:
    return {prefix + k: v for k, v in module.state_dict().items()}


# -- T5 family --------------------------------------------------------------------------------------

def _t5_config(model_type: str) -> dict[str, Any]:
    # d_ff stays 10240: detect_te_model reads encoder.block.23...wi_1 and wants 10240 rows (T5-XXL).
    return dict(d_ff=10240, d_kv=16, d_model=16, num_heads=1, num_layers=24, vocab_size=VOCAB,
                dense_act_fn="gelu_pytorch_tanh", is_gated_act=True, model_type=model_type)


def _t5_build(model_type: str, comfy) -> StateDict:
    from comfy.text_encoders.t5 import T5

    model = T5(_t5_config(model_type), torch.float32, "cpu", comfy.ops.manual_cast)
    return _seeded(_state(model), seed=11, small=(".q.", ".k."))


def _umt5_build(comfy) -> StateDict:
    # ComfyUI's WAN tokenizer is built from the file's own spiece_model tensor, as in Comfy's umt5 files.
    return {**_t5_build("umt5", comfy), "spiece_model": _spiece_model(comfy)}


def _t5_full_release(model_type: str, state: StateDict) -> StateDict:
    """The full HF ``T5ForConditionalGeneration`` file (google/t5-v1_1-xxl, google/umt5-xxl): the
    encoder plus ``encoder.embed_tokens`` (tied copy), a decoder (one block here) and ``lm_head``."""
    cfg = _t5_config(model_type)
    d, inner, ff = cfg["d_model"], cfg["d_kv"] * cfg["num_heads"], cfg["d_ff"]
    g = torch.Generator().manual_seed(12)

    def w(n, k):
        return (torch.randn(n, k, generator=g) / k ** 0.5).to(torch.bfloat16)

    out = dict(state)
    out["encoder.embed_tokens.weight"] = state["shared.weight"].clone()
    out["decoder.embed_tokens.weight"] = state["shared.weight"].clone()
    block = "decoder.block.0.layer."
    for attn, idx in (("SelfAttention", 0), ("EncDecAttention", 1)):
        for p in "qkvo":
            out[f"{block}{idx}.{attn}.{p}.weight"] = w(inner, d) if p != "o" else w(d, inner)
        out[f"{block}{idx}.layer_norm.weight"] = torch.ones(d, dtype=torch.bfloat16)
    out[f"{block}0.SelfAttention.relative_attention_bias.weight"] = torch.randn(
        32, cfg["num_heads"], generator=g).to(torch.bfloat16)
    out[f"{block}2.DenseReluDense.wi_0.weight"] = w(ff, d)
    out[f"{block}2.DenseReluDense.wi_1.weight"] = w(ff, d)
    out[f"{block}2.DenseReluDense.wo.weight"] = w(d, ff)
    out[f"{block}2.layer_norm.weight"] = torch.ones(d, dtype=torch.bfloat16)
    out["decoder.final_layer_norm.weight"] = torch.ones(d, dtype=torch.bfloat16)
    out["lm_head.weight"] = w(cfg["vocab_size"], d)
    return out


def _t5_options(name: str, model_type: str) -> dict[str, Any]:
    cfg = _t5_config(model_type)
    return {"model_options": {f"{name}_model_config": {k: cfg[k] for k in ("d_ff", "d_kv", "d_model", "num_heads",
                                                                            "num_layers", "vocab_size")}}}


# -- Llama-type decoders (llama.Llama2_ under "model.") ----------------------------------------------

def _llama_build(config_class: str, overrides: dict[str, Any], comfy) -> StateDict:
    from comfy.text_encoders import llama

    config = getattr(llama, config_class)(**overrides)
    model = llama.Llama2_(config, device="cpu", dtype=torch.float32, ops=comfy.ops.manual_cast)
    return _seeded(_state(model, "model."), seed=13, small=("q_proj", "k_proj"))


def _spiece_model(comfy) -> torch.Tensor:
    """A SentencePiece model as the U8 tensor ``spiece_model`` that ComfyUI's Gemma files carry (its
    tokenizer is built from it at load). ComfyUI's own T5-pile model stands in for Gemma's."""
    import os

    path = os.path.join(os.path.dirname(comfy.sd1_clip.__file__), "text_encoders", "t5_pile_tokenizer",
                        "tokenizer.model")
    with open(path, "rb") as f:
        return torch.frombuffer(bytearray(f.read()), dtype=torch.uint8)


def _gemma_build(config_class: str, overrides: dict[str, Any], comfy) -> StateDict:
    return {**_llama_build(config_class, overrides, comfy), "spiece_model": _spiece_model(comfy)}


def _with_lm_head(state: StateDict) -> StateDict:
    """The HF release file: the same ``model.*`` names plus an untied ``lm_head.weight``."""
    hidden = state["model.embed_tokens.weight"].shape[1]
    g = torch.Generator().manual_seed(14)
    return {**state, "lm_head.weight": (torch.randn(VOCAB, hidden, generator=g) / hidden ** 0.5).to(torch.bfloat16)}


def _llama_family(name: str, te_name: str, config_class: str, overrides: dict[str, Any], *, clip_type: str,
                  preset: str, notes: str, release: bool = False, builder=None) -> Family:
    overrides = {"vocab_size": VOCAB, **overrides}
    namings = {"comfyui": _identity}
    if release:
        namings["release"] = _with_lm_head
    return Family(
        name=name,
        build=functools.partial(builder or _llama_build, config_class, overrides),
        loader="clip",
        namings=namings,
        forward=encode,
        preset=preset,
        clip_type=clip_type,
        loader_options={"model_options": {f"{te_name}_model_config": dict(overrides)}},
        notes=notes,
    )


# -- CLIP ---------------------------------------------------------------------------------------------

def _clip_build(config_file: str, overrides: dict[str, Any], comfy) -> StateDict:
    import json
    import os

    from comfy.clip_model import CLIPTextModel

    path = os.path.join(os.path.dirname(comfy.sd1_clip.__file__), config_file)
    with open(path) as f:
        config = {**json.load(f), **overrides}
    model = CLIPTextModel(config, torch.float32, "cpu", comfy.ops.manual_cast)
    return _seeded(_state(model), seed=15, small=("q_proj", "k_proj"))


# -- forward --------------------------------------------------------------------------------------------

def _identity(state: StateDict) -> StateDict:
    return state


def encoder_of(clip):
    """The ``SDClipModel`` inside a loaded CLIP (the one encoder a single-file load builds)."""
    import comfy.sd1_clip

    for module in clip.cond_stage_model.modules():
        if isinstance(module, comfy.sd1_clip.SDClipModel):
            return module
    raise AssertionError(f"no SDClipModel in {type(clip.cond_stage_model).__name__}")


def encode(clip, seed: int, tokens: int = TOKENS) -> torch.Tensor:
    """The encoder's transformer on fixed token ids: its last hidden state (after the final norm)."""
    ids = torch.randint(3, VOCAB, (1, tokens), generator=torch.Generator().manual_seed(seed))
    clip.load_model()
    with torch.no_grad():
        return encoder_of(clip).transformer(ids, None, dtype=torch.float32)[0].float()


# -- the families -------------------------------------------------------------------------------------

FAMILIES: list[Family] = [
    Family(
        name="t5xxl",
        build=functools.partial(_t5_build, "t5"),
        loader="clip",
        namings={"comfyui": _identity, "release": functools.partial(_t5_full_release, "t5")},
        forward=encode,
        preset="t5xxl",
        clip_type="sd3",
        loader_options=_t5_options("t5xxl", "t5"),
        notes="T5-XXL v1.1 (SD3, FLUX.1, HiDream, LTX-Video, Mochi, Chroma). 'comfyui' is the encoder-only "
              "file ComfyUI ships (t5xxl_fp16.safetensors); 'release' is google/t5-v1_1-xxl's full file with "
              "decoder.*, lm_head and the tied embed_tokens copies, which cq's t5xxl preset drops. Loaded "
              "single-file as clip_type sd3 (SD3 with T5 only); 24 blocks and d_ff 10240 are what detection reads.",
    ),
    Family(
        name="umt5xxl",
        build=_umt5_build,
        loader="clip",
        namings={"comfyui": _identity},
        forward=encode,
        preset="umt5",
        clip_type="wan",
        loader_options=_t5_options("umt5xxl", "umt5"),
        notes="UMT5-XXL (WAN 2.x): T5 with a relative-attention bias in every block. Detected by ComfyUI as "
              "T5_XXL and built as umt5 for clip_type wan. cq tells it from T5 by the per-block relative "
              "attention bias and gives it the umt5 preset (t5xxl's rules: keep norms/embeddings/biases, drop "
              "decoder and lm_head, under its own name). The file carries its SentencePiece model as the U8 tensor spiece_model "
              "(ComfyUI's WAN tokenizer is built from it), as Comfy's umt5_xxl files do. No 'release' naming: "
              "google/umt5-xxl's file has no spiece_model, so ComfyUI cannot load it at all.",
    ),
    _llama_family(
        "qwen25vl_7b", "qwen25_7b", "Qwen25_7BVLI_Config",
        # k_proj.bias of 4 KV heads x 128 = 512 is how detection tells the 7B from the 3B.
        dict(hidden_size=64, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
             num_key_value_heads=4),
        clip_type="qwen_image", preset="generic_text", release=True,
        notes="Qwen2.5-VL-7B text encoder (Qwen-Image; HunyuanImage 2.1 and LongCat with their clip types). "
              "ComfyUI always builds the 1280-wide, 32-block vision tower (hard-coded, ~630M parameters), which "
              "cannot be tiny: the tiny file holds only the language model, so both the bf16 and every "
              "quantized load report visual.* missing (counted as the reference's own). 'release': "
              "Qwen/Qwen2.5-VL-7B-Instruct adds lm_head. cq detects generic_text (docs/presets.md: the "
              "preset for Llama/Qwen/Gemma-style text encoders); whether a real file's visual.* tower should "
              "be kept is not measured here (the tiny file has none).",
    ),
    _llama_family(
        "llama31_8b", "llama", "Llama2Config",
        dict(hidden_size=64, intermediate_size=64, num_hidden_layers=1, num_attention_heads=1,
             num_key_value_heads=1),
        clip_type="hidream", preset="generic_text", release=True,
        notes="Llama 3.1 8B Instruct (HiDream's fourth encoder; HunyuanVideo's llava-llama3 has the same "
              "names but loads only as a pair with CLIP-L). Detected as LLAMA3_8 (a Llama without q_norm whose "
              "width is neither 5120 nor 3072). 'release': meta-llama's file adds lm_head. cq detects "
              "generic_text (see qwen25vl_7b).",
    ),
    _llama_family(
        "gemma2_2b", "gemma2_2b", "Gemma2_2B_Config",
        dict(hidden_size=64, intermediate_size=64, num_hidden_layers=3, num_attention_heads=1,
             num_key_value_heads=1),
        clip_type="lumina2", preset="generic_text", builder=_gemma_build,
        notes="Gemma 2 2B (Lumina Image 2.0, PixelDiT). Three layers: Lumina2's encoder reads hidden layer -2. The file carries its "
              "SentencePiece model as the U8 tensor spiece_model, as ComfyUI's Gemma files do. "
              "cq detects generic_text (embeddings and every norm kept).",
    ),
    _llama_family(
        "gemma3_4b", "gemma3_4b", "Gemma3_4B_Config",
        dict(hidden_size=64, intermediate_size=64, num_hidden_layers=3, num_attention_heads=1,
             num_key_value_heads=1),
        clip_type="lumina2", preset="generic_text", builder=_gemma_build,
        notes="Gemma 3 4B text-only (NewBie, Lumina2-type loaders): q_norm/k_norm tell it from Gemma 2. "
              "cq detects generic_text, as for Gemma 2.",
    ),
    _llama_family(
        "qwen3_4b", "qwen3_4b", "Qwen3_4BConfig",
        # hidden size 2560 with q_norm is how detection tells Qwen3-4B.
        dict(hidden_size=2560, intermediate_size=32, num_hidden_layers=3, num_attention_heads=1,
             num_key_value_heads=1),
        clip_type="lumina2", preset="generic_text",
        notes="Qwen3 4B (Z-Image; FLUX.2 klein with clip_type flux2). Hidden size 2560 is what detection "
              "reads; three layers (Z-Image reads hidden layer -2). cq detects generic_text.",
    ),
    Family(
        name="clip_l",
        build=functools.partial(_clip_build, "sd1_clip_config.json",
                                # two layers: ComfyUI's long-CLIP hook names a CLIP-L by its layer 1
                                dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=1, vocab_size=VOCAB)),
        loader="clip",
        namings={"comfyui": _identity},
        forward=functools.partial(encode, tokens=77),  # CLIP adds all 77 position embeddings
        preset="clip",
        clip_type="stable_diffusion",
        # ComfyUI's long-CLIP hook rewrites "clip_l_model_config" from the generic "model_config" key.
        loader_options={"model_options": {"model_config": dict(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=1, vocab_size=VOCAB)}},
        notes="CLIP-L text model (SD1.x; FLUX.1/SD3/HiDream's CLIP-L), two tiny layers (ComfyUI's long-CLIP "
              "hook names a CLIP-L by its layer 1). HF openai/clip-vit-large-patch14's text names equal "
              "ComfyUI's. ComfyUI 0.30's load_clip has no quantized path for CLIP (the CLIP_L/CLIP_G branches "
              "pass no quantization metadata, so SDClipModel keeps manual_cast ops): every format's scales would be "
              "'unexpected' and FP8 weights load unscaled, so cq's 'clip' preset keeps CLIP whole (like a VAE): "
              "every cell is the bf16 file again."
    ),
]


IMPOSSIBLE: list[Impossible] = [
    Impossible("clip_g", "OpenCLIP bigG (SDXL, SD3, HiDream) loads tiny (32 layers of width 64, model_options "
               "'model_config') but, like clip_l, has no quantized path in ComfyUI 0.30's load_clip (no "
               "quantization metadata reaches SDClipModel for CLIP): every format fails as clip_l's cells show; "
               "left out to keep the module fast (32 layers load in ~5 s per cell on 2 cores)."),
    Impossible("mistral3_24b", "FLUX.2's Mistral Small 3.x 24B: a tiny one is buildable (hidden size 5120 is what "
               "detection reads; one layer, no layer 39 = the pruned FLUX.2 file), but ComfyUI 0.30 builds its "
               "tokenizer from the file's tekken_model tensor with transformers' MistralConverter(vocab=...), "
               "which transformers 5.x (installed here; ComfyUI asks only >=4.50.3) replaced by "
               "MistralConverter(vocab_file, ...): load_clip raises TypeError for the bf16 file itself. "
               "Covered once transformers is pinned below 5 in the test extra."),
    Impossible("gemma3_12b", "LTX-2's Gemma 3 12B: detection needs 48 layers (layer 47's q_norm) and ComfyUI "
               "always builds the SigLIP vision tower (1152 wide, 27 layers, ~400M parameters) from a class "
               "attribute no model_options reach; a tiny one is feasible only without its vision weights and at "
               "~1 GB per load. Not covered here."),
    Impossible("hunyuan_video_llava_llama3", "HunyuanVideo loads its llava-llama3 only together with CLIP-L "
               "(two files, clip_type hunyuan_video); a Family holds one file. The encoder's names and cq's "
               "treatment are those of llama31_8b."),
    Impossible("flux_dual_clip", "FLUX.1's DualCLIPLoader pair (CLIP-L + T5-XXL) is two files; each is covered "
               "alone (clip_l, t5xxl)."),
    Impossible("t5xxl_old_cosmos", "Cosmos's old T5-XXL (ungated 'wi', T5_XXL_OLD): same machinery as t5xxl, "
               "not covered yet."),
    Impossible("t5_base_t5_xl_byt5_mt5", "T5-base (Stable Audio, ACE-Step), T5-XL (AuraFlow), ByT5-small "
               "(HunyuanImage glyph), mT5-XL (HunyuanDiT): small encoders rarely quantized; not covered yet."),
    Impossible("qwen3_family_others", "Qwen3 0.6B/2B/8B (Anima, Ovis, FLUX.2 klein 9B), Qwen3-VL 4B/8B/32B, "
               "Qwen3.5, Qwen2.5-3B (OmniGen2), Ministral-3 3B (Ernie), GPT-OSS 20B (Lens), Gemma 4, T5Gemma, "
               "Jina CLIP 2: each detected by a fixed width like qwen3_4b; same machinery, not covered yet."),
]
