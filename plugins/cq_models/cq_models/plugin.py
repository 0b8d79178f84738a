"""cq plugin entry point of cq-models: registers every preset and the detector."""

from __future__ import annotations

from cq_core import hookimpl
from cq_models.detect import detect_components
from cq_models.presets import PRESETS


@hookimpl
def cq_register_model_filters(register):
    for preset in PRESETS:
        register(preset)


@hookimpl
def cq_detect_model(keys, metadata):
    return detect_components(keys) or None
