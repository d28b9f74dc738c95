"""The REST API's error bodies (aibox/api.py) are one shape, the one its schema
documents: ``detail``, and each refused field's messages under its name. And inputs a
schemathesis run found to end in a server error answer a client error instead."""

from __future__ import annotations

from rest_framework.test import APIClient

from apps.accounts.models import Role


def _client(user) -> APIClient:
    client = APIClient()
    client.force_login(user)
    return client


def test_a_refused_field_is_named_in_detail_and_listed_under_its_name(users):
    response = _client(users[Role.ADMIN]).post(
        "/api/v1/registry/repos/", {"licence": "mit"}, format="json"
    )
    assert response.status_code == 400
    body = response.json()
    assert body["name"] == ["This field is required."]
    assert body["detail"] == "name: This field is required."


def test_a_filter_error_lists_messages_under_the_field(users):
    response = _client(users[Role.ADMIN]).get("/api/v1/usage/?since=soon")
    assert response.status_code == 400
    assert response.json() == {"detail": "Enter a valid date.", "since": ["Enter a valid date."]}


def test_an_audit_filter_with_any_utc_offset_is_not_a_server_error(users):
    client = _client(users[Role.ADMIN])
    # PostgreSQL takes offsets up to 15:59; Python's datetimes go to 23:59.
    far = client.get("/api/v1/audit/events/", {"since": "2024-04-10T18:49:23-17:54"})
    assert far.status_code == 200
    # In UTC, before year 1: a time the database cannot hold.
    early = client.get("/api/v1/audit/events/", {"until": "0001-01-01T00:00:00+05:00"})
    assert early.status_code == 400
    assert early.json()["until"] == ["Enter a time between the years 1 and 9999."]
