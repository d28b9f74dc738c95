from datetime import timedelta

import pytest
from django.core.exceptions import ValidationError
from django.db import connection
from django.utils import timezone
from rest_framework.test import APIClient

from apps.accounts.models import ApiKey, Role, Scope
from apps.accounts.services import api_key_create, api_key_revoke
from apps.audit.models import AuditEvent


def bearer(secret: str) -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {secret}")
    return client


def test_database_never_holds_the_secret(users):
    owner = users[Role.APP_DEVELOPER]
    issued = api_key_create(actor=owner, owner=owner, name="bot", scopes=[Scope.INFERENCE])
    random_part = issued.secret.split("_", 2)[2]
    assert issued.secret.startswith(f"aibox_{issued.api_key.prefix}_")

    # Dump every column of every row of every table, and look for the secret.
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'"
        )
        tables = [row[0] for row in cursor.fetchall()]
        dump = []
        for table in tables:
            cursor.execute(f'SELECT * FROM "{table}"')  # noqa: S608 - names from the catalogue
            dump.extend(repr(row) for row in cursor.fetchall())
    text = "\n".join(dump)
    assert random_part not in text
    assert issued.secret not in text
    assert issued.api_key.prefix in text  # the public part is stored, for lookup


def test_key_authenticates_and_records_last_use(users):
    owner = users[Role.APP_DEVELOPER]
    issued = api_key_create(actor=owner, owner=owner, name="bot", scopes=[Scope.INFERENCE])
    response = bearer(issued.secret).get("/api/v1/me")
    assert response.status_code == 200
    assert response.json()["username"] == "devon"
    assert response.json()["api_key"]["scopes"] == ["inference"]
    issued.api_key.refresh_from_db()
    assert issued.api_key.last_used_at is not None


@pytest.mark.parametrize(
    ("make_bad", "message"),
    [
        (lambda secret, key: secret[:-4] + "AAAA", "Invalid API key."),
        (lambda secret, key: "aibox_000000000000_" + secret.split("_", 2)[2], "Invalid API key."),
        (lambda secret, key: "not-a-key", "Malformed API key."),
    ],
)
def test_wrong_keys_get_a_clear_401(users, make_bad, message):
    owner = users[Role.APP_DEVELOPER]
    issued = api_key_create(actor=owner, owner=owner, name="bot", scopes=[Scope.INFERENCE])
    response = bearer(make_bad(issued.secret, issued.api_key)).get("/api/v1/me")
    assert response.status_code == 401
    assert response.json() == {"detail": message}
    assert response["WWW-Authenticate"].startswith("Bearer")


def test_revoked_key_is_refused(users):
    owner = users[Role.APP_DEVELOPER]
    issued = api_key_create(actor=owner, owner=owner, name="bot", scopes=[Scope.INFERENCE])
    api_key_revoke(actor=owner, api_key=issued.api_key)
    response = bearer(issued.secret).get("/api/v1/me")
    assert response.status_code == 401
    assert response.json() == {"detail": "This API key has been revoked."}
    actions = list(AuditEvent.objects.order_by("seq").values_list("action", flat=True))
    assert actions == ["apikey.create", "apikey.revoke"]


def test_expired_key_is_refused(users):
    owner = users[Role.APP_DEVELOPER]
    issued = api_key_create(
        actor=owner,
        owner=owner,
        name="short-lived",
        scopes=[Scope.INFERENCE],
        expires_at=timezone.now() + timedelta(hours=1),
    )
    assert bearer(issued.secret).get("/api/v1/me").status_code == 200
    ApiKey.objects.filter(pk=issued.api_key.pk).update(
        expires_at=timezone.now() - timedelta(seconds=1)
    )
    response = bearer(issued.secret).get("/api/v1/me")
    assert response.status_code == 401
    assert response.json() == {"detail": "This API key has expired."}


def test_deactivated_owner_key_is_refused(users):
    owner = users[Role.APP_DEVELOPER]
    issued = api_key_create(actor=owner, owner=owner, name="bot", scopes=[Scope.INFERENCE])
    owner.is_active = False
    owner.save()
    response = bearer(issued.secret).get("/api/v1/me")
    assert response.status_code == 401
    assert "deactivated" in response.json()["detail"]


def test_scope_limits_an_admin_key(users):
    admin = users[Role.ADMIN]
    inference_only = api_key_create(actor=admin, owner=admin, name="i", scopes=[Scope.INFERENCE])
    full = api_key_create(actor=admin, owner=admin, name="a", scopes=[Scope.ADMIN])
    response = bearer(inference_only.secret).get("/api/v1/users/")
    assert response.status_code == 403
    assert "lacks the scope" in response.json()["detail"]
    assert bearer(full.secret).get("/api/v1/users/").status_code == 200


@pytest.mark.parametrize(
    ("role", "scopes", "error"),
    [
        (Role.COMPLIANCE_OFFICER, [Scope.INFERENCE], "cannot hold the scope(s): inference"),
        (Role.APP_DEVELOPER, [Scope.ADMIN], "cannot hold the scope(s): admin"),
        (Role.DATA_SCIENTIST, [], "Choose at least one scope."),
    ],
)
def test_roles_limit_the_scopes_of_their_keys(users, role, scopes, error):
    with pytest.raises(ValidationError, match=error.replace("(", r"\(").replace(")", r"\)")):
        api_key_create(actor=users[role], owner=users[role], name="k", scopes=scopes)
    assert not ApiKey.objects.exists()


def test_inference_key_can_be_limited_to_named_deployments(users):
    owner = users[Role.APP_DEVELOPER]
    issued = api_key_create(
        actor=owner,
        owner=owner,
        name="support-bot",
        scopes=[Scope.INFERENCE],
        deployments=["support-chat", " "],
    )
    assert issued.api_key.deployments == ["support-chat"]
    assert issued.api_key.allows_deployment("support-chat")
    assert not issued.api_key.allows_deployment("finance-chat")


def test_api_creates_key_once_and_audits_without_secret(users):
    owner = users[Role.DATA_SCIENTIST]
    client = APIClient()
    client.force_login(owner)
    response = client.post(
        "/api/v1/api-keys/",
        {"name": "notebook", "scopes": ["registry:read"]},
        format="json",
    )
    assert response.status_code == 201
    secret = response.json()["key"]
    assert response["Cache-Control"] == "no-store"
    listed = client.get("/api/v1/api-keys/").json()
    assert [k["name"] for k in listed] == ["notebook"]
    assert "key" not in listed[0]
    event = AuditEvent.objects.get(action="apikey.create")
    assert secret not in repr(event.details)
    assert event.details["scopes"] == ["registry:read"]


def test_non_admin_key_cannot_mint_keys(users):
    owner = users[Role.APP_DEVELOPER]
    issued = api_key_create(actor=owner, owner=owner, name="bot", scopes=[Scope.INFERENCE])
    response = bearer(issued.secret).post(
        "/api/v1/api-keys/", {"name": "x", "scopes": ["inference"]}, format="json"
    )
    assert response.status_code == 403
    assert ApiKey.objects.count() == 1


def test_only_an_admin_scoped_key_lists_or_revokes_keys(users):
    """The inference key bin/aibox run hands to apps cannot revoke (or list) keys."""
    admin = users[Role.ADMIN]
    victim = api_key_create(actor=admin, owner=admin, name="victim", scopes=[Scope.INFERENCE])
    app_key = api_key_create(actor=admin, owner=admin, name="app", scopes=[Scope.INFERENCE])
    client = bearer(app_key.secret)
    refused = client.post(f"/api/v1/api-keys/{victim.api_key.pk}/revoke")
    assert refused.status_code == 403 and "lacks the scope" in refused.json()["detail"]
    assert client.get("/api/v1/api-keys/").status_code == 403
    victim.api_key.refresh_from_db()
    assert victim.api_key.revoked_at is None
    admin_key = api_key_create(actor=admin, owner=admin, name="ops", scopes=[Scope.ADMIN])
    revoked = bearer(admin_key.secret).post(f"/api/v1/api-keys/{victim.api_key.pk}/revoke")
    assert revoked.status_code == 200 and revoked.json()["status"] == "revoked"
