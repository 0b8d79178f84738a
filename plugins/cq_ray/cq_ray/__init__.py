"""cq-ray: ``cq convert --executor ray``, the per-tensor work as Ray tasks (see docs/distributed.md)."""
