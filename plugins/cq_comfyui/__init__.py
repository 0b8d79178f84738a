"""cq's ComfyUI nodes, loaded as a folder in ``ComfyUI/custom_nodes``.

ComfyUI imports this file as a package (``nodes.py`` ``load_custom_node``), so the
relative import finds the node package beside it; a pip install of this
distribution provides the same package, ``cq_comfyui``.
"""

from .cq_comfyui import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
