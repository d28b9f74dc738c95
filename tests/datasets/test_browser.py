"""A data scientist brings a dataset in through the browser: upload, report, preview,
split. The validation and the split run on the real Celery worker."""

from __future__ import annotations

import re

import pytest
from playwright.sync_api import expect

from apps.accounts.models import Role
from apps.datasets.models import DatasetVersion
from tests.conftest import PASSWORD, make_user
from tests.datasets.conftest import CHAT_ROWS, jsonl

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]


@pytest.fixture
def page(browser, live_server):
    context = browser.new_context(base_url=live_server.url)
    page = context.new_page()
    page.set_default_timeout(30_000)
    yield page
    context.close()


def test_upload_see_the_report_and_preview_then_split(page, tmp_path):
    make_user(Role.DATA_SCIENTIST, username="dana")
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"Question number {i}?"},
                {"role": "assistant", "content": f"Answer number {i}."},
            ]
        }
        for i in range(25)
    ]
    rows.insert(3, '{"messages": [}')
    rows.insert(7, {"messages": [{"role": "wizard", "content": "Hi"}]})
    file = tmp_path / "support.jsonl"
    file.write_bytes(jsonl(rows + CHAT_ROWS))

    page.goto("/login/")
    page.get_by_label("Username").fill("dana")
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Log in").click()
    page.get_by_role("navigation").get_by_role("link", name="Datasets").click()
    page.get_by_label("Name").fill("support-chats")
    page.get_by_label("Licence").fill("cc-by-4.0")
    page.get_by_label("Source").fill("Helpdesk export")
    page.get_by_role("button", name="Create dataset").click()
    expect(page.get_by_role("heading", name="support-chats")).to_be_visible()

    page.get_by_label("Data file").set_input_files(file)
    page.get_by_role("button", name="Upload").click()
    # The upload lands on the version page, which follows the validation job live.
    expect(page).to_have_url(re.compile(r"/datasets/versions/\d+/$"))
    expect(page.locator("#version-status [data-state]")).to_have_text("Rejected")
    expect(page.locator("#state-reason")).to_contain_text("2 rows failed validation")
    errors = page.locator("#validation-errors")
    expect(errors.locator("tr[data-line='4']")).to_contain_text("invalid_json")
    expect(errors.locator("tr[data-line='8']")).to_contain_text("unknown_role")
    expect(page.locator("#row-count")).to_contain_text("29 (27 valid, 2 failed)")

    # The preview shows chat turns as turns, and the broken line as it was.
    preview = page.locator("#preview")
    first = preview.locator("li[data-row='0']")
    expect(first.locator(".turn-user")).to_contain_text("Question number 0?")
    expect(first.locator(".turn-assistant")).to_contain_text("Answer number 0.")
    expect(preview.locator("li[data-line='4']")).to_contain_text('{"messages": [}')
    preview.get_by_role("link", name="Next →").click()
    expect(preview.locator("li[data-row='28'] .turn-assistant")).to_contain_text("Paris.")

    # A seeded split of the valid rows.
    derive = page.locator("#derive")
    derive.get_by_label("Validation fraction").fill("0.25")
    derive.get_by_label("Seed").fill("3")
    derive.get_by_role("button", name="Split").click()
    expect(page.get_by_text("split of support-chats v1 queued")).to_be_visible()
    job = page.locator("#transforms tr[data-transform='split']")
    expect(job.locator("[data-state]")).to_have_text("Succeeded")
    expect(job).to_contain_text("train (20 rows)")
    expect(job).to_contain_text("validation (7 rows)")

    job.get_by_role("link", name="v3").click()
    expect(page.get_by_role("heading", name=re.compile("support-chats v3"))).to_be_visible()
    expect(page.locator("#version-status [data-state]")).to_have_text("Valid")
    parent = DatasetVersion.objects.get(number=1)
    assert DatasetVersion.objects.get(number=3).parent == parent
