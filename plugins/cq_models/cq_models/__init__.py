"""cq-models: model-family presets for cq, with auto-detection from tensor names."""
