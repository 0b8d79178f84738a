"""The suite's shared fixtures (the project-only registry, ComfyUI's loader), for this plugin's tests."""

from tests.conftest import comfyui, registry  # noqa: F401 (fixtures)
