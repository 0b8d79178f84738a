"""A cq preset for Stable Diffusion 3 / 3.5 (MMDiT), shipped as its own package.

Two hooks: one registers the preset (which layers stay in high precision),
the other recognises the model from its tensor names so that ``cq convert``
picks the preset without ``--model``.
"""

from __future__ import annotations

from cq_core import Detection, ModelFilter, hookimpl

SD3 = ModelFilter(
    name="example_sd3",
    category="image",
    help="Stable Diffusion 3.x MMDiT (example plugin): embedders, positional embedding and final layer "
    "stay high precision.",
    # Substrings of tensor names; the source dtype is kept for these layers.
    high_precision=("x_embedder", "context_embedder", "t_embedder", "y_embedder", "pos_embed", "final_layer"),
)

#: A name only MMDiT checkpoints have (ComfyUI's own detection keys on it), and one beside it.
ANCHOR = "joint_blocks.0.context_block.attn.qkv.weight"
ALSO = "x_embedder.proj.weight"


@hookimpl
def cq_register_model_filters(register):
    register(SD3)


@hookimpl
def cq_detect_model(keys, metadata):
    names = set(keys)
    # Checkpoints often carry a prefix such as "model.diffusion_model.": find it from the anchor.
    # The prefix names the component the preset is for: in an all-in-one file the text encoders
    # and the VAE beside it are other components, left to other plugins (cq-models keeps the VAE).
    for key in names:
        if key == ANCHOR or key.endswith("." + ANCHOR):
            prefix = key[: -len(ANCHOR)]
            if prefix + ALSO in names:
                return Detection(SD3.name, f"SD3 MMDiT: found {ANCHOR!r}", prefix)
    return None  # not ours: let other plugins (or "no preset detected") decide
