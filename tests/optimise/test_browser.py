"""In a real browser: a data scientist quantises a model from its version page, watches
the job's progress and lands on the new version."""

from __future__ import annotations

import re

import pytest
from playwright.sync_api import expect

from apps.accounts.models import Role
from apps.accounts.services import system_user
from apps.registry.bundled import model_register_bundled
from apps.registry.models import ModelVersion
from tests.conftest import PASSWORD, make_user

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]


@pytest.fixture
def page(browser, live_server, live_worker, training_worker, settings):
    settings.ARTIFACT_ROOT = live_worker.artifact_root
    context = browser.new_context(base_url=live_server.url)
    context.set_default_timeout(30_000)
    yield context.new_page()
    context.close()


def test_quantise_from_the_version_page_and_follow_the_job(page):
    make_user(Role.DATA_SCIENTIST, username="quinn")
    gemma = model_register_bundled(actor=system_user()).version
    page.goto("/login/")
    page.get_by_label("Username").fill("quinn")
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Log in").click()

    page.goto(f"/registry/versions/{gemma.pk}/")
    panel = page.locator("#optimise-panel")  # loaded by htmx after the page
    expect(panel.get_by_role("heading", name="Optimise and evaluate")).to_be_visible()
    panel.locator("summary", has_text="Quantise").click()
    form = page.locator("#quantize-form")
    expect(form.get_by_text("already Q4_K_M")).to_be_visible()
    form.get_by_label("Quantisation type").select_option("Q8_0")
    form.get_by_label("Output repo").fill("gemma-q8")
    form.get_by_role("button", name="Quantise").click()
    # Refused without 'Requantise': the form says why, nothing is queued.
    expect(page.locator("#quantize-form")).to_contain_text("already quantised")
    form = page.locator("#quantize-form")
    form.get_by_label("Requantise").check()
    form.get_by_role("button", name="Quantise").click()

    expect(page).to_have_url(re.compile(r"/optimise/jobs/\d+/$"))
    expect(page.locator("#job-state-name")).to_have_text("Succeeded", timeout=300_000)
    page.locator("#job-output").click()
    made = ModelVersion.objects.get(repo__name="gemma-q8")
    expect(page).to_have_url(re.compile(rf"/registry/versions/{made.pk}/$"))
    expect(page.get_by_text("Q8_0").first).to_be_visible()
    assert made.source["requantized"] is True and made.created_by.username == "quinn"
