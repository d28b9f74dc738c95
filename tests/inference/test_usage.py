"""The usage page, its CSV export and the usage API: who sees whose requests, the filters,
the chart's daily totals, the recent failures and keyset pages."""

from __future__ import annotations

import csv
import io
import re
from datetime import timedelta

import pytest
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.utils import timezone
from rest_framework.test import APIClient

from aibox.redis_clients import sync_client
from apps.accounts.models import Role, User
from apps.accounts.services import api_key_create, limit_set
from apps.deployments.models import Deployment, State
from apps.inference.limits import limits_admit, limits_for
from apps.inference.models import Outcome, UsageRecord
from apps.inference.selectors import USAGE_COLUMNS
from apps.registry.services import model_repo_create
from tests.conftest import client_for, make_user
from tests.inference.factories import make_usage
from tests.inference.test_limits import release
from tests.registry.conftest import upload_version, write_tiny_gguf

pytestmark = pytest.mark.django_db

NOW = timezone.now()
TODAY = NOW.date()  # settings.TIME_ZONE is UTC


def days_ago(days: int, minutes: int = 0):
    return NOW - timedelta(days=days, minutes=minutes)


def record(user: User, *, key=None, at=None, error: str | None = None, **extra) -> UsageRecord:
    """A request as the gateway writes it for ``user`` (through ``key``, else the
    playground)."""
    usage = make_usage(
        at=at or days_ago(0, minutes=1),
        user=user,
        api_key=key,
        api_key_prefix=key.prefix if key else "",
        **extra,
    )
    # The factory names a made-up user and writes its own error message; the gateway
    # copies the caller's name.
    usage.username = user.username
    if error is not None:
        usage.error = error
    usage.save(update_fields=["username", "error"])
    return usage


def key_for(user: User, name: str = "app", scopes: tuple[str, ...] = ("inference",)):
    return api_key_create(actor=user, owner=user, name=name, scopes=list(scopes))


def listed(response) -> set[str]:
    """The request ids in the page's (or fragment's) table of requests."""
    assert response.status_code == 200, response.content[:300]
    return set(re.findall(r'data-request-id="([0-9a-f-]+)"', response.content.decode()))


def ids(*records: UsageRecord) -> set[str]:
    return {str(r.request_id) for r in records}


@pytest.fixture
def world(users):
    devon, ada, dana = users[Role.APP_DEVELOPER], users[Role.ADMIN], users[Role.DATA_SCIENTIST]
    devon_key, dana_key = key_for(devon).api_key, key_for(dana).api_key
    return {
        "devon_key": devon_key,
        "dana_key": dana_key,
        "devon_api": record(devon, key=devon_key, deployment="chat"),
        "devon_playground": record(devon, deployment="chat"),
        "devon_embed": record(devon, key=devon_key, deployment="embed", at=days_ago(3)),
        "dana": record(dana, key=dana_key, deployment="chat"),
        "ada": record(ada, deployment="embed", at=days_ago(40)),
    }


def test_a_developer_sees_only_their_own_requests(users, world):
    devon = client_for(users[Role.APP_DEVELOPER])
    own = ids(world["devon_api"], world["devon_playground"], world["devon_embed"])
    assert listed(devon.get("/usage/")) == own
    # Someone else's key, name or deployment filters their own requests: nothing.
    assert listed(devon.get(f"/usage/?key={world['dana_key'].prefix}")) == set()
    assert listed(devon.get("/usage/?user=dana")) == set()
    assert listed(devon.get(f"/usage/?key={world['devon_key'].prefix}")) == ids(
        world["devon_api"], world["devon_embed"]
    )
    assert listed(devon.get("/usage/?deployment=embed")) == ids(world["devon_embed"])
    page = devon.get("/usage/").content.decode()
    assert "Your inference requests" in page
    # No user filter or column to choose someone else by.
    assert 'type="hidden" name="user"' in page and "<th>User</th>" not in page


def test_admins_and_compliance_officers_see_everyone_and_filter(users, world):
    everyone = ids(*(r for r in world.values() if isinstance(r, UsageRecord)))
    for role in (Role.ADMIN, Role.COMPLIANCE_OFFICER):
        client = client_for(users[role])
        assert listed(client.get("/usage/")) == everyone
        assert listed(client.get(f"/usage/?key={world['dana_key'].prefix}")) == ids(world["dana"])
        assert listed(client.get("/usage/?user=DEVON")) == ids(
            world["devon_api"], world["devon_playground"], world["devon_embed"]
        )
        assert listed(client.get("/usage/?deployment=embed")) == ids(
            world["devon_embed"], world["ada"]
        )
        since, until = (TODAY - timedelta(days=5)).isoformat(), (TODAY - timedelta(days=1))
        assert listed(client.get(f"/usage/?since={since}&until={until}")) == ids(
            world["devon_embed"]
        )
        assert listed(client.get(f"/usage/?until={TODAY - timedelta(days=39)}")) == ids(
            world["ada"]
        )
        page = client.get("/usage/").content.decode()
        assert "<th>User</th>" in page and 'name="user"' in page


def test_an_invalid_filter_says_why(users, world):
    client = client_for(users[Role.ADMIN])
    response = client.get(f"/usage/?since={TODAY}&until={TODAY - timedelta(days=1)}")
    assert response.status_code == 200
    assert "&#x27;From&#x27; must not be after &#x27;Until&#x27;." in response.content.decode()
    assert listed(response) == set()
    bad_cursor = client.get("/usage/?before=yesterday")
    assert "That page link is not valid" in bad_cursor.content.decode()
    export = client.get("/usage/export.csv?since=soon")
    assert export.status_code == 400 and b"Enter a valid date" in export.content


def test_the_chart_shows_each_days_totals(users):
    devon = users[Role.APP_DEVELOPER]
    record(devon, at=days_ago(2), prompt_tokens=100, completion_tokens=50)
    record(devon, at=days_ago(2, minutes=5), prompt_tokens=10, completion_tokens=5)
    record(devon, at=days_ago(0), prompt_tokens=7, completion_tokens=3, outcome=Outcome.TIMEOUT)
    record(devon, at=days_ago(31), prompt_tokens=1000)  # before the 30 days
    record(users[Role.ADMIN], at=days_ago(1), prompt_tokens=999)  # someone else's
    page = client_for(devon).get("/usage/").content.decode()
    bars = dict(re.findall(r'data-day="([\d-]+)" data-tokens="(\d+)"', page))
    assert len(bars) == 30
    assert bars[str(TODAY - timedelta(days=2))] == "165"
    assert bars[str(TODAY)] == "10"
    assert set(bars.values()) == {"165", "10", "0"}
    assert min(bars) == str(TODAY - timedelta(days=29)) and max(bars) == str(TODAY)
    day = TODAY - timedelta(days=2)
    assert f"{day}: 165 tokens (110 prompt, 55 completion), 2 requests</title>" in page
    assert f"{TODAY}: 10 tokens (7 prompt, 3 completion), 1 request, 1 failed</title>" in page
    assert re.search(r'id="total-requests">3<', page)
    assert re.search(r'id="total-tokens">175<', page)
    assert re.search(r'id="total-errors">1<', page)


def test_a_period_without_requests_draws_no_chart(users):
    page = client_for(users[Role.APP_DEVELOPER]).get("/usage/").content.decode()
    assert 'id="usage-chart"' not in page
    assert "No requests in this period." in page and "No requests match." in page


def test_recent_failures_show_status_and_message(users):
    devon = users[Role.APP_DEVELOPER]
    ok = record(devon, outcome=Outcome.OK)
    full = record(devon, outcome=Outcome.REJECTED, error="The queue of 'chat' is full.")
    record(users[Role.DATA_SCIENTIST], outcome=Outcome.ERROR, error="dana's failure")
    page = client_for(devon).get("/usage/").content.decode()
    failures = page.split('id="usage-errors"', 1)[1].split("</section>", 1)[0]
    assert "The queue of &#x27;chat&#x27; is full." in failures
    assert "<td>429</td>" in failures and "Rejected (queue full)" in failures
    assert "dana" not in failures
    assert str(ok.request_id) not in failures and str(full.request_id) in failures
    assert "No failed requests" not in failures


def test_keyset_pages_never_offset_or_count(users):
    devon = users[Role.APP_DEVELOPER]
    made = [record(devon, at=days_ago(0, minutes=i)) for i in range(70)]
    # Fifty written in the same microsecond: the cursor's id breaks the tie.
    same = days_ago(1)
    made += [record(devon, at=same) for _ in range(50)]
    client = client_for(devon)
    seen: list[str] = []
    url = "/usage/"
    with CaptureQueriesContext(connection) as queries:
        while url:
            response = client.get(url, HTTP_HX_REQUEST="true", HTTP_HX_TARGET="usage-table")
            html = response.content.decode()
            assert "<html" not in html and 'id="usage-requests"' in html
            seen += re.findall(r'data-request-id="([0-9a-f-]+)"', html)
            more = re.search(r'id="usage-older" href="([^"]+)"', html)
            url = "/usage/" + more.group(1).replace("&amp;", "&") if more else None
    assert len(seen) == 120 and set(seen) == ids(*made)
    assert seen[:70] == [str(r.request_id) for r in made[:70]]  # newest first
    sql = " ".join(
        q["sql"] for q in queries.captured_queries if "inference_usagerecord" in q["sql"]
    )
    assert "OFFSET" not in sql and "COUNT(" not in sql


def test_htmx_gets_the_results_fragment(users, world):
    client = client_for(users[Role.ADMIN])
    response = client.get("/usage/?deployment=embed", HTTP_HX_REQUEST="true")
    html = response.content.decode()
    assert "<html" not in html and 'id="usage-overview"' in html and 'id="usage-table"' in html
    assert listed(response) == ids(world["devon_embed"], world["ada"])
    assert "/usage/export.csv?deployment=embed" in html


def test_a_deployments_page_loads_its_recent_requests_from_here(users, settings, tmp_path):
    settings.ARTIFACT_ROOT = tmp_path / "artifacts"
    devon, dana = users[Role.APP_DEVELOPER], users[Role.DATA_SCIENTIST]
    repo = model_repo_create(actor=dana, name="tiny", licence="mit")
    version = upload_version(dana, repo, write_tiny_gguf(tmp_path / "tiny.gguf"))
    chat = Deployment.objects.create(
        name="chat", model_version=version, running=False, state=State.STOPPED
    )
    UsageRecord.objects.filter(pk=record(devon, deployment="chat").pk).update(deployment=chat)

    page = client_for(dana).get("/deployments/chat/").content.decode()
    assert 'hx-get="/usage/deployments/chat/"' in page
    # Whoever may see the deployment sees every caller's requests to it, as before.
    fragment = client_for(dana).get("/usage/deployments/chat/", HTTP_HX_REQUEST="true")
    html = fragment.content.decode()
    assert fragment.status_code == 200 and "<html" not in html and devon.username in html
    alone = client_for(dana).get("/usage/deployments/chat/").content.decode()
    assert "<html" in alone and "Recent requests to chat" in alone and devon.username in alone
    assert client_for(dana).get("/usage/deployments/nothing/").status_code == 404


def read_csv(response) -> list[dict[str, str]]:
    assert response.status_code == 200
    assert response["Content-Type"] == "text/csv; charset=utf-8"
    assert response["Content-Disposition"].startswith('attachment; filename="aibox-usage-')
    text = b"".join(response.streaming_content).decode()
    reader = csv.DictReader(io.StringIO(text))
    assert tuple(reader.fieldnames) == USAGE_COLUMNS
    return list(reader)


def test_the_csv_lists_the_filtered_records_and_no_prompt_or_output(users, world):
    devon = users[Role.APP_DEVELOPER]
    stored = record(
        devon,
        key=world["devon_key"],
        prompt_text="the secret prompt",
        output_text="the secret answer",
        prompt_sha256="a" * 64,
        output_sha256="b" * 64,
        outcome=Outcome.ERROR,
        error='=HYPERLINK("http://evil")',
        stream=True,
        time_to_first_token_ms=12.5,
    )
    response = client_for(devon).get(f"/usage/export.csv?key={world['devon_key'].prefix}")
    rows = read_csv(response)
    text = repr(rows)
    assert "secret" not in text and "a" * 64 not in text and "b" * 64 not in text
    assert {r["request_id"] for r in rows} == ids(world["devon_api"], world["devon_embed"], stored)
    row = next(r for r in rows if r["request_id"] == str(stored.request_id))
    assert row == {
        "request_id": str(stored.request_id),
        "created_at": stored.created_at.isoformat(),
        "username": "devon",
        "api_key_prefix": world["devon_key"].prefix,
        "deployment_name": "chat",
        "endpoint": "chat",
        "stream": "true",
        "prompt_tokens": "10",
        "cached_tokens": "0",
        "completion_tokens": "20",
        "latency_ms": "100.0",
        "time_to_first_token_ms": "12.5",
        "load_ms": "",  # it did not wait for a load
        "outcome": "error",
        "status_code": "500",
        # Escaped, so a spreadsheet shows the text instead of running it.
        "error": '\'=HYPERLINK("http://evil")',
    }


def test_the_csv_has_only_what_the_caller_may_see(users, world):
    devon_rows = read_csv(client_for(users[Role.APP_DEVELOPER]).get("/usage/export.csv"))
    assert {r["username"] for r in devon_rows} == {"devon"}
    assert len(devon_rows) == 3
    assert read_csv(client_for(users[Role.APP_DEVELOPER]).get("/usage/export.csv?user=ada")) == []
    officer_rows = read_csv(client_for(users[Role.COMPLIANCE_OFFICER]).get("/usage/export.csv"))
    assert {r["username"] for r in officer_rows} == {"devon", "dana", "ada"}
    # Newest first, as on the page.
    assert [r["created_at"] for r in officer_rows] == sorted(
        (r["created_at"] for r in officer_rows), reverse=True
    )


def api_pages(client, url: str) -> list[dict]:
    results: list[dict] = []
    while url:
        response = client.get(url)
        assert response.status_code == 200, response.content[:300]
        body = response.json()
        results += body["results"]
        url = body["next"]
    return results


def test_the_api_pages_through_own_records_with_a_cursor(users):
    devon = users[Role.APP_DEVELOPER]
    made = [record(devon, at=days_ago(0, minutes=i)) for i in range(120)]
    record(users[Role.ADMIN])
    client = APIClient()
    client.force_authenticate(devon)
    with CaptureQueriesContext(connection) as queries:
        results = api_pages(client, "/api/v1/usage/")
    assert [r["request_id"] for r in results] == [str(r.request_id) for r in made]
    assert set(results[0]) == set(USAGE_COLUMNS)
    sql = " ".join(
        q["sql"] for q in queries.captured_queries if "inference_usagerecord" in q["sql"]
    )
    assert "OFFSET" not in sql and "COUNT(" not in sql
    assert len([q for q in queries.captured_queries if "inference_usagerecord" in q["sql"]]) == 3


def test_the_api_filters_as_the_page_does(users, world):
    officer = APIClient()
    officer.force_authenticate(users[Role.COMPLIANCE_OFFICER])
    rows = api_pages(officer, f"/api/v1/usage/?key={world['dana_key'].prefix}")
    assert [r["request_id"] for r in rows] == [str(world["dana"].request_id)]
    rows = api_pages(officer, "/api/v1/usage/?user=devon&deployment=embed")
    assert [r["request_id"] for r in rows] == [str(world["devon_embed"].request_id)]
    assert officer.get("/api/v1/usage/?since=soon").status_code == 400
    developer = APIClient()
    developer.force_authenticate(users[Role.APP_DEVELOPER])
    assert api_pages(developer, "/api/v1/usage/?user=dana") == []
    assert {r["username"] for r in api_pages(developer, "/api/v1/usage/")} == {"devon"}


def test_an_apps_inference_key_reads_its_owners_usage(users, world):
    devon = users[Role.APP_DEVELOPER]
    inference = key_for(devon, "reader").secret
    registry = key_for(devon, "registry", scopes=("registry:read",)).secret
    client = Client()
    response = client.get("/api/v1/usage/", HTTP_AUTHORIZATION=f"Bearer {inference}")
    assert response.status_code == 200
    assert {r["username"] for r in response.json()["results"]} == {"devon"}
    refused = client.get("/api/v1/usage/daily/", HTTP_AUTHORIZATION=f"Bearer {registry}")
    assert refused.status_code == 403 and "needs one of: inference" in refused.json()["detail"]
    cora = users[Role.COMPLIANCE_OFFICER]
    audit = key_for(cora, "audit", scopes=("audit:read",)).secret
    response = client.get("/api/v1/usage/", HTTP_AUTHORIZATION=f"Bearer {audit}")
    assert {r["username"] for r in response.json()["results"]} == {"devon", "dana", "ada"}


def test_the_daily_api_counts_tokens_and_requests_per_day(users):
    devon = users[Role.APP_DEVELOPER]
    record(devon, at=days_ago(1), prompt_tokens=5, completion_tokens=6)
    record(devon, at=days_ago(1, minutes=3), prompt_tokens=1, completion_tokens=2)
    record(devon, at=days_ago(0), outcome=Outcome.UNAVAILABLE, prompt_tokens=0, completion_tokens=0)
    record(users[Role.DATA_SCIENTIST], at=days_ago(1), prompt_tokens=1000)
    client = APIClient()
    client.force_authenticate(devon)
    body = client.get("/api/v1/usage/daily/?days=3").json()
    assert body["start"] == str(TODAY - timedelta(days=2)) and body["end"] == str(TODAY)
    assert body["days"] == [
        {
            "day": str(TODAY - timedelta(days=2)),
            "requests": 0,
            "errors": 0,
            "prompt_tokens": 0,
            "completion_tokens": 0,
            "tokens": 0,
        },
        {
            "day": str(TODAY - timedelta(days=1)),
            "requests": 2,
            "errors": 0,
            "prompt_tokens": 6,
            "completion_tokens": 8,
            "tokens": 14,
        },
        {
            "day": str(TODAY),
            "requests": 1,
            "errors": 1,
            "prompt_tokens": 0,
            "completion_tokens": 0,
            "tokens": 0,
        },
    ]
    assert body["totals"] == {
        "requests": 3,
        "errors": 1,
        "prompt_tokens": 6,
        "completion_tokens": 8,
        "tokens": 14,
    }
    assert len(client.get("/api/v1/usage/daily/").json()["days"]) == 30
    since = TODAY - timedelta(days=1)
    ranged = client.get(f"/api/v1/usage/daily/?since={since}&until={since}").json()
    assert [d["tokens"] for d in ranged["days"]] == [14]
    assert client.get("/api/v1/usage/daily/?days=0").status_code == 400
    assert client.get("/api/v1/usage/daily/?days=367").status_code == 400
    future = client.get(f"/api/v1/usage/daily/?since={TODAY + timedelta(days=3)}").json()
    assert future["days"] == [] and future["totals"] is None


@pytest.mark.parametrize("path", ["/usage/", "/usage/export.csv", "/usage/deployments/chat/"])
def test_anonymous_visitors_are_sent_to_log_in(db, path):
    response = Client().get(path)
    assert response.status_code == 302 and response["Location"].startswith("/login/")


@pytest.mark.parametrize("path", ["/api/v1/usage/", "/api/v1/usage/daily/"])
def test_anonymous_api_callers_get_401(db, path):
    assert Client().get(path).status_code == 401


def test_every_role_has_the_usage_link(users):
    for user in users.values():
        page = client_for(user).get("/account/password/").content.decode()
        assert '<a href="/usage/">Usage</a>' in page


def test_records_of_a_deleted_user_stay_with_their_name(users):
    gone = make_user(Role.APP_DEVELOPER, username="gone")
    kept = record(gone)
    gone.delete()
    admin = client_for(users[Role.ADMIN])
    assert listed(admin.get("/usage/?user=gone")) == ids(kept)


def test_a_key_owner_sees_what_is_left_of_their_budget(users):
    developer = users[Role.APP_DEVELOPER]
    key = key_for(developer)
    sync_client().delete(*(sync_client().keys(f"aibox:limits:key:{key.api_key.pk}:*") or ["-"]))
    limit_set(actor=users[Role.ADMIN], api_key=key.api_key, token_budget=1000, budget_period="day")
    limits = limits_for(user=developer, api_key=key.api_key)
    limits_admit(redis=sync_client(), limits=limits, request_id="r1")
    release(limits, "r1", tokens=250)

    page = client_for(developer).get("/usage/")
    panel = re.search(r'id="usage-limits">(.*?)</div>', page.content.decode(), re.S).group(1)
    assert key.api_key.prefix in panel
    assert "750 of 1000 left" in panel

    api = APIClient()
    api.credentials(HTTP_AUTHORIZATION=f"Bearer {key.secret}")
    body = api.get("/api/v1/usage/limits/").json()
    assert [row["prefix"] for row in body] == [key.api_key.prefix]
    assert body[0]["limits"]["budget"] | {"resets_at": None} == {
        "limit": 1000,
        "period": "day",
        "used": 250,
        "remaining": 750,
        "resets_at": None,
    }
    # Someone else's key, named by prefix, shows nothing to a developer.
    other = key_for(users[Role.DATA_SCIENTIST])
    assert api.get(f"/api/v1/usage/limits/?key={other.api_key.prefix}").json() == []
