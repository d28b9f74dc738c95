"""Filters, keyset pages and exports over a generated log of a million events.

The log is written once for this module (tests/audit/synthetic.py: the chain computed
in Python, one COPY) and committed, then removed when the module ends, so the other
audit tests still start from an empty log.
"""

import json

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from apps.accounts.models import Role
from apps.audit import signing
from apps.audit.chain import verify_events
from apps.audit.models import AuditEvent
from apps.audit.selectors import EVENT_COLUMNS
from apps.audit.verification import verify_export
from tests.audit import synthetic
from tests.conftest import client_for
from tests.provenance.test_views import seqs

N = 1_000_000


@pytest.fixture(scope="module")
def million(test_database, django_db_blocker):
    with django_db_blocker.unblock():
        assert not AuditEvent.objects.exists(), "the million-event log needs an empty table"
        head = synthetic.write_log(N)
        try:
            yield head
        finally:
            with connection.cursor() as cursor:
                # TRUNCATE fires no row trigger: the one way to empty the table, for tests.
                cursor.execute("TRUNCATE audit_auditevent")


@pytest.fixture
def officer(million, users):
    return client_for(users[Role.COMPLIANCE_OFFICER])


def page(client, query: str) -> list[int]:
    response = client.get(f"/audit/?{query}")
    assert response.status_code == 200
    return seqs(response.content.decode())


def test_the_generated_log_is_a_valid_chain(million, db):
    assert AuditEvent.objects.get(seq=N).hash == million
    # The real verifier, over the last 50,000 events (the whole chain takes ~30 s here;
    # the export test below checks a longer range through another path).
    tail = (
        AuditEvent.objects.filter(seq__gt=N - 50_000)
        .order_by("seq")
        .values(*EVENT_COLUMNS)
        .iterator(chunk_size=5000)
    )
    result = verify_events(tail, expected_prev_hash=None, expected_first_seq=N - 49_999)
    assert result.ok, str(result.error)
    assert result.checked == 50_000 and result.last_hash == million


def test_keyset_pages_never_offset_or_count(officer):
    with CaptureQueriesContext(connection) as queries:
        first = page(officer, "")
        deep = page(officer, "before=123457")
    assert first == list(range(N, N - 50, -1))
    assert deep == list(range(123456, 123406, -1))
    sql = " ".join(q["sql"] for q in queries.captured_queries if "audit_auditevent" in q["sql"])
    assert "OFFSET" not in sql and "COUNT(" not in sql


def test_filters_over_a_million_events(officer):
    assert page(officer, "actor=USER07")[:3] == [999957, 999907, 999857]
    assert page(officer, "actor=user07&before=500000")[:2] == [499957, 499907]
    assert page(officer, "text=needle-500000") == [500000]
    assert page(officer, "text=NEEDLE")[:3] == [1000000, 900000, 800000]
    apikeys = page(officer, "action=apikey.")
    assert apikeys[:4] == [999993, 999992, 999981, 999980]  # i % 12 in (8, 9)
    assert page(officer, "outcome=denied&before=1000")[:2] == [909, 808]
    assert page(officer, "target_type=registry.modelversion&target_id=7")[:2] == [994007, 987007]
    window = "since=2026-01-02T00:00&until=2026-01-02T00:10"  # 600 s from event #86400
    assert (
        page(officer, f"{window}&outcome=failure")
        == [s for s in range(86999, 86399, -1) if s % 25 == 0 and s % 101][:50]
    )


def test_filtered_export_verifies_its_range(officer):
    window = {"since": "2026-01-02T00:00", "until": "2026-01-02T03:00", "actor": "user07"}
    response = officer.post("/audit/export.jsonl", window)
    data = b"".join(response.streaming_content)
    report = verify_export(data, public_key=signing.public_key().raw)
    assert report.ok, report.problems
    events = [json.loads(line) for line in data.splitlines()[:-1]]
    assert len(events) == 216 and all(e["actor_label"] == "user07" for e in events)
    verified = report.manifest["verified_range"]
    assert (verified["first_seq"], verified["last_seq"]) == (events[0]["seq"], events[-1]["seq"])
    assert verified["events_checked"] == events[-1]["seq"] - events[0]["seq"] + 1
