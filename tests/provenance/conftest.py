# Each test's own artifact store, as in the registry's tests (lineage and dossiers are
# built from stored model files).
from tests.registry.conftest import artifact_root  # noqa: F401 (an autouse fixture)
