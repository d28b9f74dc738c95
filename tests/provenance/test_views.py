import re

import pytest
from rest_framework.test import APIClient

from apps.accounts.models import Role
from apps.audit.models import Outcome
from apps.audit.services import audit_record
from tests.conftest import client_for


@pytest.fixture
def log(users):
    actor = users[Role.ADMIN]
    for i in range(120):
        audit_record(
            actor=actor,
            action="model.upload" if i % 2 else "user.update",
            outcome=Outcome.FAILURE if i % 10 == 0 else Outcome.SUCCESS,
            details={"n": i, "note": "quarterly-review" if i == 77 else ""},
        )
    return users


def seqs(html: str) -> list[int]:
    return [int(s) for s in re.findall(r"<tr class=\"outcome-\w+\">\s*<td>(\d+)</td>", html)]


def test_pages_newest_first_with_keyset_cursor(log):
    client = client_for(log[Role.COMPLIANCE_OFFICER])
    first = client.get("/audit/").content.decode()
    assert seqs(first) == list(range(120, 70, -1))
    assert "before=71" in first
    second = client.get("/audit/?before=71").content.decode()
    assert seqs(second) == list(range(70, 20, -1))
    last = client.get("/audit/?before=21").content.decode()
    assert seqs(last) == list(range(20, 0, -1))
    assert "Older events" not in last


def test_filters_combine(log):
    client = client_for(log[Role.ADMIN])
    html = client.get("/audit/?action=model.&outcome=failure").content.decode()
    # odd events are model.upload; failures are every 10th (0-based i) -> none odd
    assert seqs(html) == []
    html = client.get("/audit/?action=user.&outcome=failure").content.decode()
    assert seqs(html) == [111, 101, 91, 81, 71, 61, 51, 41, 31, 21, 11, 1]
    html = client.get("/audit/?text=quarterly").content.decode()
    assert seqs(html) == [78]


def test_invalid_filter_shows_an_error_not_a_crash(log):
    response = client_for(log[Role.ADMIN]).get("/audit/?since=not-a-date&before=-3")
    assert response.status_code == 200
    assert b"Enter a valid date/time." in response.content
    assert seqs(response.content.decode()) == []


def test_htmx_request_gets_only_the_table(log):
    client = client_for(log[Role.ADMIN])
    response = client.get("/audit/?action=user.", HTTP_HX_REQUEST="true")
    body = response.content.decode()
    assert "<html" not in body and "<table" in body
    # The export form carries the filter.
    assert 'formaction="/audit/export.csv"' in body
    assert '<input type="hidden" name="action" value="user.">' in body
    assert len(seqs(body)) == 50


def test_api_pages_with_a_cursor_and_filters(log):
    client = APIClient()
    client.force_login(log[Role.COMPLIANCE_OFFICER])
    page = client.get("/api/v1/audit/events/?action=model.").json()
    assert [e["seq"] for e in page["results"]][:3] == [120, 118, 116]
    assert len(page["results"]) == 50
    following = client.get(page["next"]).json()
    assert following["results"][0]["seq"] == 20
    assert all(e["action"] == "model.upload" for e in following["results"])


def test_api_events_verify_offline_as_served(log):
    from apps.audit.chain import verify_events

    client = APIClient()
    client.force_login(log[Role.ADMIN])
    events = client.get("/api/v1/audit/events/").json()["results"]
    result = verify_events(reversed(events), expected_prev_hash=None, expected_first_seq=None)
    assert result.ok and result.checked == 50
    events[10]["details"]["n"] = -1
    broken = verify_events(reversed(events), expected_prev_hash=None, expected_first_seq=None)
    assert not broken.ok and broken.error.seq == events[10]["seq"]


def test_api_filters_by_target_and_time(log):
    from datetime import timedelta

    from django.utils import timezone

    client = APIClient()
    client.force_login(log[Role.ADMIN])
    audit_record(actor=log[Role.ADMIN], action="test.target", target_type="x.thing", target_id="7")
    page = client.get("/api/v1/audit/events/?target_type=x.thing&target_id=7").json()
    assert [e["action"] for e in page["results"]] == ["test.target"]
    future = (timezone.now() + timedelta(days=1)).strftime("%Y-%m-%dT%H:%M")
    assert client.get(f"/api/v1/audit/events/?since={future}").json()["results"] == []
    bad = client.get("/api/v1/audit/events/?since=soon")
    assert bad.status_code == 400 and "since" in bad.json()
