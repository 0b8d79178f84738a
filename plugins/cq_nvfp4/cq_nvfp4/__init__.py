"""cq-nvfp4: the NVFP4 format (FP4 E2M1 codes, e4m3 block scales, per-block scale search) for cq."""
