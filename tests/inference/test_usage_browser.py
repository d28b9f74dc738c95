"""In a real browser: an app developer opens Usage from the menu, reads the chart and the
failures, pages back through the requests, filters by one key and downloads the CSV."""

from __future__ import annotations

import csv
import io
import re
from datetime import timedelta

import pytest
from django.utils import timezone
from playwright.sync_api import expect

from apps.accounts.models import Role
from apps.accounts.services import api_key_create
from apps.inference.models import Outcome
from tests.conftest import PASSWORD, make_user
from tests.inference.factories import make_usage

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]


@pytest.fixture
def page(browser, live_server):
    context = browser.new_context(base_url=live_server.url, accept_downloads=True)
    page = context.new_page()
    page.set_default_timeout(30_000)
    yield page
    context.close()


def record(user, key, *, error: str | None = None, **fields):
    usage = make_usage(user=user, api_key=key, api_key_prefix=key.prefix, **fields)
    # The gateway copies the caller's name (the factory makes one up).
    usage.username = user.username
    if error is not None:
        usage.error = error
    usage.save(update_fields=["username", "error"])
    return usage


def test_developer_reads_pages_filters_and_exports_their_usage(page):
    devon = make_user(Role.APP_DEVELOPER, username="devon")
    dana = make_user(Role.DATA_SCIENTIST, username="dana")
    web = api_key_create(actor=devon, owner=devon, name="web", scopes=["inference"]).api_key
    batch = api_key_create(actor=devon, owner=devon, name="batch", scopes=["inference"]).api_key
    other = api_key_create(actor=dana, owner=dana, name="dana", scopes=["inference"]).api_key
    now = timezone.now()
    for i in range(60):
        record(devon, web, at=now - timedelta(minutes=i + 1), prompt_tokens=3, completion_tokens=2)
    # Noon, so the four requests of that day stay on it whatever the time now.
    two_days_ago = (now - timedelta(days=2)).replace(hour=12, minute=0)
    for i in range(3):
        record(devon, batch, at=two_days_ago - timedelta(minutes=i), prompt_tokens=400)
    record(
        devon,
        batch,
        at=two_days_ago - timedelta(hours=1),
        outcome=Outcome.REJECTED,
        error="The queue of 'chat' is full.",
    )
    record(dana, other, at=now - timedelta(minutes=2), prompt_tokens=5000)

    page.goto("/login/")
    page.get_by_label("Username").fill("devon")
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Log in").click()
    page.get_by_role("navigation").get_by_role("link", name="Usage").click()
    expect(page.get_by_role("heading", name="Usage", exact=True)).to_be_visible()

    # The chart: 30 days, with the batch day's tokens (3 × 420 ok + 1 × 30 rejected).
    bars = page.locator("#usage-chart g.bar")
    expect(bars).to_have_count(30)
    day = two_days_ago.date().isoformat()
    batch_day = page.locator(f'#usage-chart g.bar[data-day="{day}"]')
    expect(batch_day).to_have_attribute("data-tokens", "1290")
    expect(batch_day.locator("title")).to_have_text(re.compile(r"4 requests, 1 failed$"))
    expect(page.locator("#total-requests")).to_have_text("64")
    failures = page.locator("#usage-errors")
    expect(failures).to_contain_text("The queue of 'chat' is full.")
    expect(failures).to_contain_text("429")
    expect(page.locator("#usage-results")).not_to_contain_text("dana")

    # Fifty newest first, then the rest behind "Older requests".
    rows = page.locator("#usage-requests tbody tr")
    expect(rows).to_have_count(50)
    page.get_by_role("link", name="Older requests").click()
    expect(rows).to_have_count(14)
    expect(page).to_have_url(re.compile(r"before="))
    expect(page.get_by_role("link", name="Older requests")).to_have_count(0)

    # One key's requests: the whole view follows the filter.
    page.get_by_label("API key").fill(batch.prefix)
    page.get_by_label("API key").press("Enter")
    expect(page).to_have_url(re.compile(rf"key={batch.prefix}"))
    expect(rows).to_have_count(4)
    expect(page.locator("#total-requests")).to_have_text("4")
    with page.expect_download() as info:
        page.get_by_role("link", name="Download CSV").click()
    with open(info.value.path(), encoding="utf-8") as f:  # noqa: PTH123
        exported = list(csv.DictReader(io.StringIO(f.read())))
    assert len(exported) == 4
    assert {r["api_key_prefix"] for r in exported} == {batch.prefix}
    assert {r["username"] for r in exported} == {"devon"}
    assert "prompt_text" not in exported[0]

    # Someone else's key shows nothing at all.
    page.get_by_label("API key").fill(other.prefix)
    page.get_by_label("API key").press("Enter")
    expect(page.locator("#usage-requests")).to_contain_text("No requests match.")
    expect(page.locator("#total-requests")).to_have_text("0")
