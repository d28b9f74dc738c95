"""schemathesis over the REST API's own OpenAPI schema, as each role's API key: every
operation is called with generated valid and invalid inputs, and none may answer with a
server error. In process (Django's WSGI handler) inside one rolled-back transaction, so
nothing is committed and no task is queued; derandomized, so a run is repeatable."""

from __future__ import annotations

import pytest
import schemathesis
from django.core import signals
from django.core.wsgi import get_wsgi_application
from django.db import close_old_connections
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings

from apps.accounts.models import Role
from apps.accounts.services import ROLE_SCOPES, api_key_create
from tests.conftest import make_user

EXAMPLES = 10


@pytest.fixture
def in_one_transaction():
    """As Django's test client does: requests must not close the test's connection."""
    signals.request_started.disconnect(close_old_connections)
    signals.request_finished.disconnect(close_old_connections)
    yield
    signals.request_started.connect(close_old_connections)
    signals.request_finished.connect(close_old_connections)


@pytest.mark.parametrize("role", list(Role), ids=[r.value for r in Role])
def test_no_operation_answers_with_a_server_error(db, in_one_transaction, role):
    owner = make_user(role, username=f"fuzz-{role}")
    scopes = sorted(ROLE_SCOPES[role])  # the widest key the role may hold
    secret = api_key_create(actor=owner, owner=owner, name="fuzz", scopes=scopes).secret
    auth = {"Authorization": f"Bearer {secret}"}
    schema = schemathesis.openapi.from_wsgi(
        "/api/schema/?format=json", get_wsgi_application(), headers=auth
    )
    calls: dict[str, set[int]] = {}
    errors: list[str] = []
    for result in schema.get_all_operations():
        fuzz(result.ok(), auth, calls, errors)
    assert errors == []
    assert len(calls) >= 40  # every operation of the schema was exercised
    # Not only refusals: some calls got through to the views.
    assert any(status < 300 for statuses in calls.values() for status in statuses)


def fuzz(operation, auth: dict[str, str], calls: dict[str, set[int]], errors: list[str]) -> None:
    @hypothesis_settings(
        max_examples=EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy())
    def call(case) -> None:
        response = case.call(headers=auth)
        calls.setdefault(operation.label, set()).add(response.status_code)
        if response.status_code >= 500:
            errors.append(f"{response.status_code}: {case.as_curl_command()}")

    call()
