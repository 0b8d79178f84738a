"""cq in ComfyUI: the node classes ComfyUI registers (``NODE_CLASS_MAPPINGS``).

- **Capture calibration (cq)** (:class:`~cq_comfyui.nodes.CaptureCalibration`):
  MODEL in, MODEL out; records the diffusion model's per-Linear input statistics
  while the user's own sampler runs, and adds them to a statistics file after
  every sampling run.
- **Quantize model (cq)** (:class:`~cq_comfyui.nodes.QuantizeModel`): a model file
  from ComfyUI's model folders to a quantized file beside it, with the statistics
  and an optional size budget.

``WEB_DIRECTORY`` is the frontend extension ComfyUI serves beside them
(``web/cq_report.js``: the Quantize node's report drawn on the node).
The pack ComfyUI imports is the repository's root ``__init__.py``, which re-exports these.
"""

import os

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

#: Absolute, so the clone's root ``__init__.py`` can hand it to ComfyUI as it is
#: (``nodes.py`` ``load_custom_node`` joins it to the pack's folder; an absolute path stays).
WEB_DIRECTORY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "web")

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
