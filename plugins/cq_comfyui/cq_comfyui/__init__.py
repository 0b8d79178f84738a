"""cq in ComfyUI: the node classes ComfyUI registers (``NODE_CLASS_MAPPINGS``).

- **Capture calibration (cq)** (:class:`~cq_comfyui.nodes.CaptureCalibration`):
  MODEL in, MODEL out; records the diffusion model's per-Linear input statistics
  while the user's own sampler runs, and adds them to a statistics file after
  every sampling run.
- **Quantize model (cq)** (:class:`~cq_comfyui.nodes.QuantizeModel`): a model file
  from ComfyUI's model folders to a quantized file beside it, with the statistics.
"""

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
