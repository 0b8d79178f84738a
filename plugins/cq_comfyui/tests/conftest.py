"""cq-nodes' tests: the node pack depends on every format plugin and cq-models (its pyproject), so the
registry holds them all and cq-core. The suite's hooks and shared fixtures: conftest.py at the
repository root; helpers: tests/helpers.py."""

from tests.helpers import PROJECT_PLUGINS, registry_fixture

registry = registry_fixture(*PROJECT_PLUGINS)
