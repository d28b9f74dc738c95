"""The audit signing key is made once, on purpose and audited; a lost one is never
silently replaced."""

import stat

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

from apps.audit import signing
from apps.audit.models import AuditEvent
from apps.audit.signing import SigningKeyMissing, public_key, sign


@pytest.fixture
def key_file(settings, tmp_path):
    settings.AUDIT_SIGNING_KEY_FILE = tmp_path / "keys" / "audit-signing-key.pem"
    return settings.AUDIT_SIGNING_KEY_FILE


def test_a_missing_key_stops_signing_with_a_clear_error(db, key_file):
    with pytest.raises(SigningKeyMissing, match="Restore it from backup"):
        sign(b"anything")
    assert not key_file.exists()  # nothing was generated behind the operator's back


def test_the_first_key_is_created_on_purpose_and_audited(db, key_file, capsys):
    call_command("audit_signing_key", "--create")
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    fingerprint = public_key().fingerprint
    assert f"sha256 {fingerprint}" in capsys.readouterr().out
    event = AuditEvent.objects.get(action="audit.signing_key.create")
    assert event.actor_label == "system"
    assert event.details == {"fingerprint": fingerprint, "replaces": None}
    assert "PRIVATE" not in str(event.details)
    # Asking again changes nothing.
    call_command("audit_signing_key", "--create")
    assert AuditEvent.objects.filter(action="audit.signing_key.create").count() == 1


def test_a_lost_key_is_replaced_only_when_asked_and_says_which(db, key_file):
    call_command("audit_signing_key", "--create")
    old = public_key().fingerprint
    key_file.unlink()  # a container recreated without its volume, say
    signing._key.cache_clear()  # as a new process would start
    with pytest.raises(CommandError, match="is missing from .*Restore it from backup"):
        call_command("audit_signing_key", "--create")
    with pytest.raises(CommandError, match="is missing"):
        call_command("audit_signing_key")
    call_command("audit_signing_key", "--replace-lost-key")
    new = public_key().fingerprint
    assert new != old
    replaced = AuditEvent.objects.filter(action="audit.signing_key.create").latest("seq")
    assert replaced.details == {"fingerprint": new, "replaces": old}
