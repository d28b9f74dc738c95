"""Services check the caller's role themselves, whatever called them (a view, the API, a
command or a script in ``manage.py shell``): a refused call raises PermissionDenied and
writes nothing. The views' own checks only decide what a page offers."""

from datetime import UTC, datetime

import pytest
from django.core.exceptions import PermissionDenied

from apps.accounts.models import ApiKey, Role, Scope, User
from apps.accounts.services import (
    api_key_create,
    api_key_revoke,
    system_user,
    user_create,
    user_set_password,
)
from apps.audit.models import AuditEvent
from apps.audit.selectors import AuditFilters
from apps.provenance.services import (
    audit_dossier_generate,
    audit_export_start,
    audit_report_generate,
)
from apps.registry.artifacts import artifact_reverify
from apps.registry.models import ModelVersion

START, END = datetime(2026, 1, 1, tzinfo=UTC), datetime(2027, 1, 1, tzinfo=UTC)


def refused(call, *args, **kwargs) -> str:
    before = AuditEvent.objects.count()
    with pytest.raises(PermissionDenied) as info:
        call(*args, **kwargs)
    assert AuditEvent.objects.count() == before  # nothing written, not even an event
    return str(info.value)


@pytest.mark.parametrize("role", [Role.DATA_SCIENTIST, Role.APP_DEVELOPER, Role.COMPLIANCE_OFFICER])
def test_only_admins_create_users(users, role):
    message = refused(
        user_create, actor=users[role], username="mallory", role=Role.ADMIN, password="x" * 16
    )
    assert "create users" in message
    assert not User.objects.filter(username="mallory").exists()
    user_create(actor=users[Role.ADMIN], username="alice", role=Role.APP_DEVELOPER, password="x")
    user_create(actor=system_user(), username="bob", role=Role.ADMIN, password="x")  # bootstrap


def test_a_user_sets_their_own_password_and_only_an_admin_sets_anothers(users):
    scientist, developer = users[Role.DATA_SCIENTIST], users[Role.APP_DEVELOPER]
    refused(user_set_password, actor=scientist, user=developer, password="taken-over-1234")
    developer.refresh_from_db()
    assert not developer.check_password("taken-over-1234")
    user_set_password(actor=scientist, user=scientist, password="my-own-new-one-1")
    user_set_password(actor=users[Role.ADMIN], user=developer, password="reset-by-admin-1")
    developer.refresh_from_db()
    assert developer.check_password("reset-by-admin-1")


def test_only_the_owner_or_an_admin_revokes_a_key(users):
    developer = users[Role.APP_DEVELOPER]
    issued = api_key_create(actor=developer, owner=developer, name="app", scopes=[Scope.INFERENCE])
    refused(api_key_revoke, actor=users[Role.DATA_SCIENTIST], api_key=issued.api_key)
    assert ApiKey.objects.get(pk=issued.api_key.pk).revoked_at is None
    api_key_revoke(actor=users[Role.ADMIN], api_key=issued.api_key)
    assert ApiKey.objects.get(pk=issued.api_key.pk).revoked_at is not None


@pytest.mark.parametrize("role", [Role.DATA_SCIENTIST, Role.APP_DEVELOPER])
def test_audit_documents_are_for_admins_and_compliance_officers(users, role):
    actor = users[role]
    assert "export the audit log" in refused(
        audit_export_start, actor=actor, filters=AuditFilters(), fmt="jsonl"
    )
    refused(audit_report_generate, actor=actor, start=START, end=END, fmt="json")
    refused(audit_dossier_generate, actor=actor, version=ModelVersion(), fmt="json")
    officer = users[Role.COMPLIANCE_OFFICER]
    assert audit_report_generate(actor=officer, start=START, end=END, fmt="json")
    assert audit_export_start(actor=officer, filters=AuditFilters(), fmt="jsonl").head_seq > 0


def test_only_admins_reverify_stored_files(users):
    refused(artifact_reverify, actor=users[Role.DATA_SCIENTIST], limit=10)
    # An admin (and beat, as the system user) may; a batch of none re-hashes nothing.
    assert artifact_reverify(actor=users[Role.ADMIN], limit=0).checked == 0
    assert artifact_reverify(actor=system_user(), limit=0).checked == 0
