"""An admin deploys the bundled model from the UI and chats with it in the playground."""

from __future__ import annotations

import re

import pytest
from playwright.sync_api import expect

from apps.deployments.models import Deployment
from apps.inference.models import UsageRecord
from tests.conftest import PASSWORD

pytestmark = pytest.mark.browser


def test_deploy_from_the_ui_and_stream_in_the_playground(browser, stack):
    context = browser.new_context(base_url=stack.url)
    page = context.new_page()
    page.set_default_timeout(30_000)
    try:
        page.goto("/login/")
        page.get_by_label("Username").fill("serve-admin")
        page.get_by_label("Password").fill(PASSWORD)
        page.get_by_role("button", name="Log in").click()

        page.get_by_role("navigation").get_by_role("link", name="Deployments").click()
        # The worker list shows the live worker and what it holds.
        expect(page.locator(f'tr[data-worker="{stack.worker}"]')).to_contain_text("online")
        page.get_by_label("Public name").fill("gemma-ui")
        page.get_by_label("Model version").select_option(index=1)
        page.get_by_label("Context length").fill("512")
        page.get_by_label("Logging level").select_option("full")
        page.get_by_role("button", name="Deploy").click()

        expect(page.get_by_role("heading", name="Deployment gemma-ui")).to_be_visible()
        # htmx polls the state until the worker reports the model loaded.
        expect(page.locator("#deployment-state [data-state]").first).to_have_attribute(
            "data-state", "ready", timeout=90_000
        )
        expect(page.locator("[data-logging-level]")).to_contain_text("Full text")

        page.get_by_role("link", name="Try it in the playground").click()
        expect(page.get_by_label("Deployment", exact=True)).to_have_value("gemma-ui")
        page.get_by_label("Max tokens").fill("24")
        page.get_by_label("Message", exact=True).fill("Say hello.")
        page.get_by_role("button", name="Send").click()
        answer = page.locator(".turn-assistant .turn-text")
        expect(answer).not_to_be_empty(timeout=60_000)
        expect(page.locator("#pg-stats")).to_contain_text(re.compile(r"tokens/s"))
        expect(page.get_by_role("button", name="Send")).to_be_enabled()
        shown = answer.inner_text()
        stats = page.locator("#pg-stats").inner_text()
    finally:
        context.close()

    record = UsageRecord.objects.get(deployment_name="gemma-ui")
    assert record.username == "serve-admin" and record.stream
    # Full logging keeps the whole answer the browser showed.
    assert record.output_text.strip() == shown.strip()
    # The count shown is the stream's usage, not its chunks (a chunk may hold several).
    assert f" {record.completion_tokens} tokens in " in stats
    assert Deployment.objects.get(name="gemma-ui").created_by.username == "serve-admin"
