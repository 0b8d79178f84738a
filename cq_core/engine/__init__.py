"""The engine: a recipe, the per-tensor plan, the read/optimize/encode pipeline, the report."""
