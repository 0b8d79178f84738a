"""cq-ray's tests: an executor converts with formats, so the registry holds every format plugin of this
repository (the tests skip where one is not installed) and cq-core; the tests that run Ray add cq-ray
(``ray_registry``). The suite's hooks and shared fixtures: conftest.py at the repository root."""

from tests.helpers import PROJECT_PLUGINS, registry_fixture

registry = registry_fixture(*PROJECT_PLUGINS)
