"""cq-int8: integer formats for cq.

``int8_tensorwise`` (per-row or per-tensor scales, optional ConvRot rotation),
``int8_blockwise`` (tile scales; not loaded by stock ComfyUI), ``convrot_w4a4``
(rotated signed INT4) and ``asym_w4a8_int8`` (rotated INT4 with group scales, INT8 GEMM).
"""
