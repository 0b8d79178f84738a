"""FP8 formats for cq: float8_e4m3fn and float8_e5m2 with per-tensor scales, mxfp8 with E8M0 block scales."""
