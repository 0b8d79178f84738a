"""cq-int8: integer formats for cq.

``int8_tensorwise`` (per-row or per-tensor scales, optional ConvRot rotation),
``int8_blockwise`` (tile scales; not loaded by stock ComfyUI) and
``convrot_w4a4`` (rotated signed INT4).
"""
