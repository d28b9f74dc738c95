import pytest


@pytest.fixture(scope="session")
def _signing_key_path(tmp_path_factory):
    return tmp_path_factory.mktemp("audit-key") / "audit-signing-key.pem"


@pytest.fixture(autouse=True)
def _audit_signing_key(settings, _signing_key_path):
    """Exports are signed with a key generated for this test session, not var/'s."""
    settings.AUDIT_SIGNING_KEY_FILE = _signing_key_path
