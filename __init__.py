"""cq as a ComfyUI custom node pack: this folder, cloned into ``ComfyUI/custom_nodes/``.

ComfyUI imports every folder in ``custom_nodes`` by its ``__init__.py``
(ComfyUI 0.30 ``nodes.py`` ``load_custom_node``, under the folder's path as the
module name) and registers what ``NODE_CLASS_MAPPINGS`` holds. The nodes
themselves are the distribution ``cq-nodes`` (``plugins/cq_comfyui``), which
``requirements.txt`` beside this file installs into ComfyUI's Python together
with cq-core and the format plugins of this same clone:

    cd ComfyUI/custom_nodes/cq && python -m pip install -r requirements.txt

Imported any other way (a Python package named after the folder: pytest names a
checkout so when its root holds this file and ``tests/__init__.py``), this file
registers no nodes; it makes ``<folder>.<module>`` the top-level ``<module>``
(``cq.tests.conftest`` is ``tests.conftest``), so nothing in the checkout is
imported twice under two names.
"""

import importlib
import importlib.abc
import importlib.util
import os
import sys


class _CheckoutAlias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """``<package>.<name>`` imports as the top-level module ``<name>`` and is that module."""

    def __init__(self, package: str) -> None:
        self.prefix = package + "."
        self.own_specs: dict[str, object] = {}

    def find_spec(self, fullname, path=None, target=None):
        if not fullname.startswith(self.prefix):
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec):
        module = importlib.import_module(spec.name[len(self.prefix):])
        self.own_specs[spec.name] = module.__spec__
        return module

    def exec_module(self, module):
        # module_from_spec set the alias' spec on the module; it keeps its own.
        module.__spec__ = self.own_specs.pop(module.__spec__.name)


if __name__.isidentifier():  # a Python package, not ComfyUI's loader (a path is no identifier)
    if not any(isinstance(f, _CheckoutAlias) and f.prefix == __name__ + "." for f in sys.meta_path):
        sys.meta_path.insert(0, _CheckoutAlias(__name__))
else:
    try:
        from cq_comfyui import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS, WEB_DIRECTORY
    except ImportError as exc:
        here = os.path.dirname(os.path.abspath(__file__))
        raise ImportError(
            f"cq's nodes are not installed in this Python ({sys.executable}): run "
            f"'cd {here} && {os.path.basename(sys.executable)} -m pip install -r requirements.txt' "
            f"and restart ComfyUI ({exc})."
        ) from exc

    __all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
