"""cq-nvfp4's tests run with cq-core and this plugin only: the registry holds exactly them (the suite's
hooks and shared fixtures: conftest.py at the repository root; helpers: tests/helpers.py)."""

from tests.helpers import registry_fixture

registry = registry_fixture("cq_nvfp4.plugin")
