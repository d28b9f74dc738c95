"""Usage limits on the inference API: set by admins (service, REST API, pages), audited,
and refused to everyone else."""

from __future__ import annotations

import pytest
from django.core.exceptions import PermissionDenied, ValidationError
from django.db import IntegrityError, transaction
from django.test import Client
from rest_framework.test import APIClient

from apps.accounts.models import Role, Scope, UsageLimit
from apps.accounts.services import api_key_create, limit_clear, limit_set, system_user
from apps.audit.models import AuditEvent
from tests.conftest import client_for


@pytest.fixture
def key(users):
    owner = users[Role.APP_DEVELOPER]
    return api_key_create(actor=owner, owner=owner, name="bot", scopes=[Scope.INFERENCE]).api_key


def events(action_prefix: str = "limit.") -> list[AuditEvent]:
    return list(AuditEvent.objects.filter(action__startswith=action_prefix).order_by("seq"))


def bearer(users, *scopes: str) -> APIClient:
    admin = users[Role.ADMIN]
    secret = api_key_create(actor=admin, owner=admin, name="ops", scopes=list(scopes)).secret
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {secret}")
    return client


# --- the services ---------------------------------------------------------------


def test_an_admin_sets_a_keys_limits_and_the_change_is_audited(users, key):
    admin = users[Role.ADMIN]
    row = limit_set(actor=admin, api_key=key, requests_per_minute=60, max_concurrent=2)
    assert (row.requests_per_minute, row.max_concurrent, row.tokens_per_minute) == (60, 2, None)

    limit_set(
        actor=admin, api_key=key, requests_per_minute=30, token_budget=1000, budget_period="day"
    )
    first, second = events()
    assert first.action == second.action == "limit.set"
    assert first.actor_label == "ada"
    assert (second.target_type, second.target_id) == ("accounts.apikey", str(key.pk))
    assert "bot" in second.target_label
    assert second.details["subject"] == "api_key"
    assert second.details["before"] == {
        "requests_per_minute": 60,
        "tokens_per_minute": None,
        "max_concurrent": 2,
        "token_budget": None,
        "budget_period": None,
    }
    assert second.details["after"] == {
        "requests_per_minute": 30,
        "tokens_per_minute": None,
        "max_concurrent": None,
        "token_budget": 1000,
        "budget_period": "day",
    }
    assert UsageLimit.objects.get(api_key=key).max_concurrent is None  # a PUT: all replaced


def test_saving_the_same_values_writes_nothing(users, key):
    admin = users[Role.ADMIN]
    limit_set(actor=admin, role=Role.APP_DEVELOPER, tokens_per_minute=500)
    limit_set(actor=admin, role=Role.APP_DEVELOPER, tokens_per_minute=500)
    (event,) = events()
    assert (event.target_type, event.target_id, event.target_label) == (
        "accounts.role",
        "app_developer",
        "App developer",
    )


def test_clearing_removes_the_row_and_is_audited(users):
    admin, devon = users[Role.ADMIN], users[Role.APP_DEVELOPER]
    limit_set(actor=admin, user=devon, max_concurrent=3)
    limit_clear(actor=admin, user=devon)
    limit_clear(actor=admin, user=devon)  # nothing left: nothing written
    assert not UsageLimit.objects.exists()
    assert [e.action for e in events()] == ["limit.set", "limit.clear"]
    assert events()[1].details["before"]["max_concurrent"] == 3

    # Every value empty is a clear too.
    limit_set(actor=admin, user=devon, max_concurrent=3)
    assert limit_set(actor=admin, user=devon) is None
    assert not UsageLimit.objects.exists()
    assert [e.action for e in events()][-1] == "limit.clear"


@pytest.mark.parametrize("role", [Role.DATA_SCIENTIST, Role.APP_DEVELOPER, Role.COMPLIANCE_OFFICER])
def test_only_admins_set_limits(users, key, role):
    actor = users[role]
    with pytest.raises(PermissionDenied, match="does not allow you to set usage limits"):
        limit_set(actor=actor, api_key=key, requests_per_minute=1000)
    with pytest.raises(PermissionDenied):
        limit_clear(actor=actor, api_key=key)
    assert not UsageLimit.objects.exists()
    assert events() == []


def test_the_system_actor_may_set_limits(db, key):
    limit_set(actor=system_user(), role=Role.DATA_SCIENTIST, requests_per_minute=5)
    assert events()[0].actor_label == "system"


@pytest.mark.parametrize(
    ("values", "field", "message"),
    [
        ({"requests_per_minute": 0}, "requests_per_minute", "from 1 to"),
        ({"max_concurrent": -1}, "max_concurrent", "from 1 to"),
        ({"token_budget": 100}, "budget_period", "needs its period"),
        ({"budget_period": "day"}, "token_budget", "needs its period"),
        ({"token_budget": 100, "budget_period": "week"}, "budget_period", "day, month"),
    ],
)
def test_invalid_values_are_refused_naming_the_field(users, key, values, field, message):
    with pytest.raises(ValidationError) as caught:
        limit_set(actor=users[Role.ADMIN], api_key=key, **values)
    assert message in " ".join(caught.value.message_dict[field])


def test_a_limit_names_exactly_one_subject(users, key):
    admin = users[Role.ADMIN]
    with pytest.raises(ValidationError, match="exactly one"):
        limit_set(actor=admin, api_key=key, user=admin, requests_per_minute=1)
    with pytest.raises(ValidationError, match="exactly one"):
        limit_set(actor=admin, requests_per_minute=1)
    with pytest.raises(ValidationError, match="Unknown role"):
        limit_set(actor=admin, role="owner", requests_per_minute=1)


def test_the_database_holds_one_row_per_subject(users, key):
    UsageLimit.objects.create(api_key=key, requests_per_minute=1)
    with pytest.raises(IntegrityError), transaction.atomic():
        UsageLimit.objects.create(api_key=key, requests_per_minute=2)
    with pytest.raises(IntegrityError), transaction.atomic():
        UsageLimit.objects.create(user=users[Role.ADMIN], role=Role.ADMIN, max_concurrent=1)
    with pytest.raises(IntegrityError), transaction.atomic():
        UsageLimit.objects.create(role=Role.ADMIN, token_budget=5)  # no period
    key.delete()
    assert not UsageLimit.objects.exists()


# --- the REST API ---------------------------------------------------------------


def test_the_api_sets_reads_and_clears_a_keys_limits(users, key):
    api = bearer(users, Scope.ADMIN)
    url = f"/api/v1/api-keys/{key.pk}/limits"
    api.put(f"/api/v1/roles/{Role.APP_DEVELOPER}/limits", {"tokens_per_minute": 900}, format="json")
    response = api.put(url, {"requests_per_minute": 60}, format="json")
    assert response.status_code == 200, response.content
    body = response.json()
    assert body["subject"] == "api_key"
    assert body["requests_per_minute"] == 60 and body["tokens_per_minute"] is None
    assert body["effective"]["tokens_per_minute"] == 900
    assert body["effective"]["sources"] == {
        "requests_per_minute": "api_key",
        "tokens_per_minute": "role",
    }
    assert api.get(url).json()["requests_per_minute"] == 60

    listed = api.get("/api/v1/limits/").json()
    assert {(row["subject"], row["api_key"], row["role"]) for row in listed} == {
        ("api_key", key.pk, None),
        ("role", None, "app_developer"),
    }

    response = api.delete(url)
    assert response.status_code == 200
    assert response.json()["requests_per_minute"] is None
    assert [e.action for e in events()] == ["limit.set", "limit.set", "limit.clear"]


def test_the_api_sets_a_users_and_a_roles_limits(users):
    api = bearer(users, Scope.ADMIN)
    devon = users[Role.APP_DEVELOPER]
    response = api.put(
        f"/api/v1/users/{devon.pk}/limits",
        {"token_budget": 10_000, "budget_period": "month"},
        format="json",
    )
    assert response.status_code == 200, response.content
    assert response.json()["effective"]["token_budget"] == 10_000
    response = api.put("/api/v1/roles/data_scientist/limits", {"max_concurrent": 4}, format="json")
    assert response.json()["max_concurrent"] == 4 and response.json()["effective"] is None
    assert UsageLimit.objects.get(role=Role.DATA_SCIENTIST).max_concurrent == 4


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"requests_per_minute": 0}, "requests_per_minute"),
        ({"tokens_per_minute": "lots"}, "tokens_per_minute"),
        ({"token_budget": 2**63}, "token_budget"),
        ({"budget_period": "year"}, "budget_period"),
        ({"token_budget": 500}, "budget_period"),
    ],
)
def test_the_api_answers_400_naming_the_field(users, key, body, field):
    response = bearer(users, Scope.ADMIN).put(
        f"/api/v1/api-keys/{key.pk}/limits", body, format="json"
    )
    assert response.status_code == 400
    assert field in response.json()
    assert not UsageLimit.objects.exists()


def test_the_api_answers_404_for_what_does_not_exist(users, db):
    api = bearer(users, Scope.ADMIN)
    assert api.get("/api/v1/roles/owner/limits").status_code == 404
    assert api.get("/api/v1/api-keys/999999/limits").status_code == 404
    assert api.get(f"/api/v1/users/{system_user().pk}/limits").status_code == 404


@pytest.mark.parametrize("role", [Role.DATA_SCIENTIST, Role.APP_DEVELOPER, Role.COMPLIANCE_OFFICER])
def test_the_api_refuses_other_roles(users, key, role):
    api = APIClient()
    api.force_login(users[role])
    url = f"/api/v1/api-keys/{key.pk}/limits"
    assert api.get(url).status_code == 403
    assert api.put(url, {"requests_per_minute": 1}, format="json").status_code == 403
    assert api.delete(url).status_code == 403
    assert api.get("/api/v1/limits/").status_code == 403


def test_an_admins_key_needs_the_admin_scope(users, key):
    api = bearer(users, Scope.INFERENCE, Scope.REGISTRY_READ)
    url = f"/api/v1/api-keys/{key.pk}/limits"
    response = api.put(url, {"requests_per_minute": 1}, format="json")
    assert response.status_code == 403
    assert "admin" in response.json()["detail"]
    assert api.get(url).status_code == 403
    assert not UsageLimit.objects.exists()


# --- the pages ------------------------------------------------------------------


def test_an_admin_edits_a_roles_limits_on_its_page(users):
    client = client_for(users[Role.ADMIN])
    page = client.get("/limits/")
    assert page.status_code == 200
    assert b'data-limit="role-app_developer"' in page.content
    assert b'data-limit="user-devon"' in page.content

    url = f"/limits/roles/{Role.APP_DEVELOPER}/"
    assert client.get(url).status_code == 200
    response = client.post(
        url, {"requests_per_minute": "120", "token_budget": "5000", "budget_period": "month"}
    )
    assert response.status_code == 302 and response["Location"] == url
    row = UsageLimit.objects.get(role=Role.APP_DEVELOPER)
    assert (row.requests_per_minute, row.token_budget, row.budget_period) == (120, 5000, "month")
    assert "Limits of role App developer saved." in client.get(url).content.decode()
    assert events()[0].details["after"]["requests_per_minute"] == 120

    response = client.post(url, {"clear": "1"})
    assert response.status_code == 302
    assert not UsageLimit.objects.exists()
    assert [e.action for e in events()] == ["limit.set", "limit.clear"]


def test_a_keys_page_shows_what_applies_and_where_it_comes_from(users, key):
    admin = users[Role.ADMIN]
    limit_set(actor=admin, user=key.user, tokens_per_minute=700)
    client = client_for(admin)
    response = client.get(f"/limits/api-keys/{key.pk}/", HTTP_HX_REQUEST="true")
    html = response.content.decode()
    assert response.status_code == 200
    assert "<html" not in html  # htmx: the fragment alone
    assert "In effect" in html and "700" in html and "user" in html


def test_an_invalid_form_shows_its_errors_and_saves_nothing(users):
    client = client_for(users[Role.ADMIN])
    response = client.post(
        f"/limits/users/{users[Role.DATA_SCIENTIST].pk}/",
        {"max_concurrent": "0", "token_budget": "10"},
        HTTP_HX_REQUEST="true",
    )
    assert response.status_code == 200
    html = response.content.decode()
    assert "greater than or equal to 1" in html
    assert not UsageLimit.objects.exists()

    response = client.post(
        f"/limits/users/{users[Role.DATA_SCIENTIST].pk}/", {"token_budget": "10"}
    )
    assert "needs its period" in response.content.decode()
    assert not UsageLimit.objects.exists()


@pytest.mark.parametrize("role", [Role.DATA_SCIENTIST, Role.APP_DEVELOPER, Role.COMPLIANCE_OFFICER])
def test_the_pages_are_for_admins_only(users, key, role):
    client = client_for(users[role])
    for url in ("/limits/", f"/limits/api-keys/{key.pk}/", "/limits/roles/admin/"):
        assert client.get(url).status_code == 403
    assert client.post("/limits/roles/admin/", {"max_concurrent": "1"}).status_code == 403
    assert not UsageLimit.objects.exists()


def test_anonymous_visitors_are_sent_to_log_in(db):
    response = Client().get("/limits/")
    assert response.status_code == 302 and response["Location"].startswith("/login/")


def test_pages_answer_404_for_what_does_not_exist(users):
    client = client_for(users[Role.ADMIN])
    assert client.get("/limits/roles/owner/").status_code == 404
    assert client.get("/limits/api-keys/999999/").status_code == 404
    assert client.get("/limits/users/999999/").status_code == 404
