"""The fixtures of tests/: the registry of every plugin of this repository (entry points are not
loaded, so the suite never depends on what else is installed). The suite's hooks and shared
fixtures: conftest.py at the root; helpers: tests/helpers.py."""

from __future__ import annotations

from tests.helpers import PROJECT_PLUGINS, build_registry, registry_fixture, small_model, write_checkpoint  # noqa: F401

registry = registry_fixture(*PROJECT_PLUGINS, skip_missing=False)
