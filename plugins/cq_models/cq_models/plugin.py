"""cq plugin entry point of cq-models: registers every preset, the detector, and the layers
whose shape ComfyUI reads to detect a model."""

from __future__ import annotations

from cq_core import hookimpl
from cq_models.detect import detect_components
from cq_models.diffusers import LAYOUTS
from cq_models.presets import PRESETS
from cq_models.shape_reads import shape_read_layers


@hookimpl
def cq_register_model_filters(register):
    for preset in PRESETS:
        register(preset)


@hookimpl
def cq_detect_model(keys, metadata):
    return detect_components(keys) or None


@hookimpl
def cq_register_layout_converters(register):
    for layout in LAYOUTS:
        register(layout)


@hookimpl
def cq_shape_read_layers(keys, metadata):
    return shape_read_layers(keys)
