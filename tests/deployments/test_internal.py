"""Worker credentials (issue, revoke: admins only, audited) and the internal artifact
endpoint they open (/internal/v1/artifacts/<sha256>): who may pull, what, and how."""

from __future__ import annotations

import hashlib
from io import StringIO

import pytest
from django.core.exceptions import PermissionDenied
from django.core.management import call_command
from django.test import Client
from rest_framework.test import APIClient

from apps.accounts.models import Role, Scope
from apps.accounts.services import api_key_create
from apps.audit.models import AuditEvent
from apps.deployments.credentials import worker_credential_issue, worker_credential_revoke
from apps.deployments.models import WorkerCredential
from apps.registry.artifacts import artifact_store

# The test client serves the endpoint's async stream synchronously, and says so.
pytestmark = pytest.mark.filterwarnings("ignore:StreamingHttpResponse must consume")


@pytest.fixture
def issued(users):
    return worker_credential_issue(actor=users[Role.ADMIN], name="gpu-host-2")


def pull(secret: str | None, sha256: str, *, method: str = "get", **headers):
    if secret is not None:
        headers["HTTP_AUTHORIZATION"] = f"Bearer {secret}"
    return getattr(Client(), method)(f"/internal/v1/artifacts/{sha256}", **headers)


def body(response) -> bytes:
    # An async iterator (what ASGI streams); iterating the response consumes it here.
    return b"".join(response)


# --- credentials --------------------------------------------------------------------


def test_an_admin_issues_a_credential_whose_secret_is_not_stored(users, issued):
    assert issued.secret.startswith("aibw_") and len(issued.secret) > 40
    row = WorkerCredential.objects.get(name="gpu-host-2")
    assert row.secret_hash == hashlib.sha256(issued.secret.encode()).hexdigest()
    assert row.created_by == users[Role.ADMIN] and row.status == "active"
    event = AuditEvent.objects.get(action="worker_credential.issued")
    assert event.target_label == "gpu-host-2"
    assert event.actor_label == users[Role.ADMIN].username
    assert issued.secret not in str(event.details) and issued.secret[5:] not in event.hash


@pytest.mark.parametrize("role", [Role.DATA_SCIENTIST, Role.APP_DEVELOPER, Role.COMPLIANCE_OFFICER])
def test_only_admins_issue_or_revoke(users, issued, role):
    with pytest.raises(PermissionDenied):
        worker_credential_issue(actor=users[role], name="sneaky")
    with pytest.raises(PermissionDenied):
        worker_credential_revoke(actor=users[role], credential=issued.credential)
    assert not WorkerCredential.objects.filter(name="sneaky").exists()
    assert WorkerCredential.objects.get(name="gpu-host-2").revoked_at is None


def test_a_name_holds_one_active_credential_until_revoked(users, issued):
    admin = users[Role.ADMIN]
    with pytest.raises(Exception, match="already has an active credential"):
        worker_credential_issue(actor=admin, name="gpu-host-2")
    worker_credential_revoke(actor=admin, credential=issued.credential)
    worker_credential_revoke(actor=admin, credential=issued.credential)  # a no-op
    assert AuditEvent.objects.filter(action="worker_credential.revoked").count() == 1
    assert worker_credential_issue(actor=admin, name="gpu-host-2").secret != issued.secret


def test_the_api_lists_issues_and_revokes_for_admins_only(users):
    admin = APIClient()
    admin.force_login(users[Role.ADMIN])
    answer = admin.post("/api/v1/workers/credentials/", {"name": "edge-1"}, format="json")
    assert answer.status_code == 201 and answer.json()["secret"].startswith("aibw_")
    listed = admin.get("/api/v1/workers/credentials/").json()
    assert [c["name"] for c in listed] == ["edge-1"] and "secret" not in listed[0]
    scientist = APIClient()
    scientist.force_login(users[Role.DATA_SCIENTIST])
    assert scientist.get("/api/v1/workers/credentials/").status_code == 403
    pk = answer.json()["id"]
    assert scientist.post(f"/api/v1/workers/credentials/{pk}/revoke").status_code == 403
    revoked = admin.post(f"/api/v1/workers/credentials/{pk}/revoke")
    assert revoked.status_code == 200 and revoked.json()["status"] == "revoked"
    assert admin.post("/api/v1/workers/credentials/999999/revoke").status_code == 404


@pytest.mark.parametrize("role", [Role.DATA_SCIENTIST, Role.APP_DEVELOPER, Role.COMPLIANCE_OFFICER])
def test_no_other_role_issues_lists_or_revokes_through_the_api(users, issued, role):
    caller = APIClient()
    caller.force_login(users[role])
    assert caller.get("/api/v1/workers/credentials/").status_code == 403
    answer = caller.post("/api/v1/workers/credentials/", {"name": "sneaky"}, format="json")
    assert answer.status_code == 403
    assert not WorkerCredential.objects.filter(name="sneaky").exists()
    pk = issued.credential.pk
    assert caller.post(f"/api/v1/workers/credentials/{pk}/revoke").status_code == 403
    assert WorkerCredential.objects.get(pk=pk).revoked_at is None


def test_the_management_command_issues_lists_and_revokes(db):
    out = StringIO()
    call_command("worker_credential", "issue", "remote-a", stdout=out, stderr=StringIO())
    secret = out.getvalue().strip()
    assert secret.startswith("aibw_")
    out = StringIO()
    call_command("worker_credential", "list", stdout=out)
    assert "remote-a\tactive" in out.getvalue() and secret not in out.getvalue()
    call_command("worker_credential", "revoke", "remote-a", stdout=StringIO())
    assert WorkerCredential.objects.get(name="remote-a").status == "revoked"
    assert AuditEvent.objects.filter(action="worker_credential.revoked").exists()


# --- the endpoint ---------------------------------------------------------------------


def test_no_or_a_wrong_credential_is_401(version, issued):
    sha256 = version.sha256
    for response in (
        pull(None, sha256),
        pull("aibw_not-a-real-one", sha256),
        pull("not-even-the-prefix", sha256),
        pull(None, sha256, method="head"),
    ):
        assert response.status_code == 401
    assert "detail" in pull(None, sha256).json()


def test_an_api_key_or_a_session_opens_nothing(users, version):
    admin = users[Role.ADMIN]
    key = api_key_create(actor=admin, owner=admin, name="k", scopes=[Scope.ADMIN]).secret
    assert pull(key, version.sha256).status_code == 401
    client = Client()
    client.force_login(admin)
    assert client.get(f"/internal/v1/artifacts/{version.sha256}").status_code == 401


def test_a_revoked_credential_is_401(users, version, issued):
    worker_credential_revoke(actor=users[Role.ADMIN], credential=issued.credential)
    response = pull(issued.secret, version.sha256)
    assert response.status_code == 401 and "revoked" in response.json()["detail"]


def test_an_unknown_or_missing_artifact_is_404(version, issued):
    assert pull(issued.secret, "0" * 64).status_code == 404
    assert pull(issued.secret, "not-a-digest").status_code == 404
    artifact_store().path_for(version.sha256).unlink()
    response = pull(issued.secret, version.sha256)
    assert response.status_code == 404 and "missing" in response.json()["detail"]


def test_a_full_get_streams_the_file_and_marks_the_credential_used(version, issued):
    data = artifact_store().path_for(version.sha256).read_bytes()
    response = pull(issued.secret, version.sha256)
    assert response.status_code == 200 and response.streaming
    assert body(response) == data
    assert response["Content-Length"] == str(len(data))
    assert response["X-Content-SHA256"] == version.sha256
    assert response["Accept-Ranges"] == "bytes"
    assert WorkerCredential.objects.get(pk=issued.credential.pk).last_used_at is not None
    event = AuditEvent.objects.get(action="artifact.pulled")
    assert event.target_id == version.sha256 and event.actor_label == "worker:gpu-host-2"


def test_ranges_resume_a_transfer(version, issued):
    data = artifact_store().path_for(version.sha256).read_bytes()
    size = len(data)
    tail = pull(issued.secret, version.sha256, HTTP_RANGE="bytes=100-")
    assert tail.status_code == 206 and body(tail) == data[100:]
    assert tail["Content-Range"] == f"bytes 100-{size - 1}/{size}"
    assert tail["Content-Length"] == str(size - 100)
    middle = pull(issued.secret, version.sha256, HTTP_RANGE="bytes=10-19")
    assert middle.status_code == 206 and body(middle) == data[10:20]
    assert middle["Content-Range"] == f"bytes 10-19/{size}"
    # A resumed range is the same pull: no second audit event.
    assert not AuditEvent.objects.filter(action="artifact.pulled").exists()


def test_an_unsatisfiable_range_is_416(version, issued):
    size = artifact_store().path_for(version.sha256).stat().st_size
    response = pull(issued.secret, version.sha256, HTTP_RANGE=f"bytes={size}-")
    assert response.status_code == 416 and response["Content-Range"] == f"bytes */{size}"


def test_head_gives_the_size_and_digest_without_a_body(version, issued):
    size = artifact_store().path_for(version.sha256).stat().st_size
    response = pull(issued.secret, version.sha256, method="head")
    assert response.status_code == 200 and response.content == b""
    assert response["Content-Length"] == str(size)
    assert response["X-Content-SHA256"] == version.sha256
    assert not AuditEvent.objects.filter(action="artifact.pulled").exists()
