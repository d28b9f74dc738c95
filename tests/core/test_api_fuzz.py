"""schemathesis over the box's own OpenAPI schema (/api/v1/ and the OpenAI-compatible
/v1/), as each role's widest API key: every operation is called with generated inputs
the schema allows, and every answer must be one the schema describes: no server error, a
documented status code and content type, and a body that matches the schema of that
status. In process (Django's WSGI handler) inside one rolled-back transaction, so nothing
is committed and no task is queued; derandomized, so a run is repeatable.

No deployment exists here, so /v1/ answers refusals only (400 for a malformed body, 403
for a role without inference, 404 for the model): its parsing is what is exercised.

Time: 85 operations × EXAMPLES cases × 4 roles, 1 to 1.5 minutes. Every role runs
every operation although most are the same code: a role's answers differ (a 403 for one
is a 201 or a 400 for another, and each has its own schema), and the cases are the same
for each role, so a role costs a quarter of the run, not a new search. Four times the
examples found nothing more when this was written, in four times the time."""

from __future__ import annotations

import pytest
import schemathesis
from django.core import signals
from django.core.wsgi import get_wsgi_application
from django.db import close_old_connections
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from schemathesis.checks import not_a_server_error
from schemathesis.errors import FailureGroup
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from apps.accounts.models import Role
from apps.accounts.services import ROLE_SCOPES, api_key_create
from tests.conftest import make_user

EXAMPLES = 10
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]


@pytest.fixture
def in_one_transaction():
    """As Django's test client does: requests must not close the test's connection."""
    signals.request_started.disconnect(close_old_connections)
    signals.request_finished.disconnect(close_old_connections)
    yield
    signals.request_started.connect(close_old_connections)
    signals.request_finished.connect(close_old_connections)


@pytest.mark.parametrize("role", list(Role), ids=[r.value for r in Role])
def test_every_answer_is_one_the_schema_describes(db, in_one_transaction, role):
    owner = make_user(role, username=f"fuzz-{role}")
    scopes = sorted(ROLE_SCOPES[role])  # the widest key the role may hold
    secret = api_key_create(actor=owner, owner=owner, name="fuzz", scopes=scopes).secret
    auth = {"Authorization": f"Bearer {secret}"}
    schema = schemathesis.openapi.from_wsgi(
        "/api/schema/?format=json", get_wsgi_application(), headers=auth
    )
    calls: dict[str, set[int]] = {}
    failures: dict[tuple[str, str, int], str] = {}
    operations = [result.ok() for result in schema.get_all_operations()]
    for operation in operations:
        fuzz(operation, auth, calls, failures)
    assert not failures, "\n\n".join(failures.values())
    assert len(calls) == len(operations) >= 80  # every operation of the schema was called
    # Not only refusals: some calls got through to the views.
    assert any(status < 300 for statuses in calls.values() for status in statuses)
    # Some generated /v1/ bodies passed the parser and reached routing: no such model
    # (404), or a role that may not call the inference API (403).
    for label in ("POST /v1/chat/completions", "POST /v1/completions", "POST /v1/embeddings"):
        assert calls[label] & {403, 404}, (label, calls[label])


def fuzz(
    operation,
    auth: dict[str, str],
    calls: dict[str, set[int]],
    failures: dict[tuple[str, str, int], str],
) -> None:
    """Call ``operation`` with EXAMPLES generated cases; keep the first case of each kind
    of failure (operation, check, status), with the curl command that repeats it."""

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
        try:
            case.validate_response(response, checks=CHECKS, headers=auth)
        except FailureGroup as group:
            for failure in group.exceptions:
                key = (operation.label, type(failure).__name__, response.status_code)
                failures.setdefault(
                    key,
                    f"{operation.label}: {failure.title} ({response.status_code})\n"
                    f"{failure.message}\n{response.text[:500]}\n{case.as_curl_command()}",
                )

    call()
