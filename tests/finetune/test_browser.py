"""A data scientist launches a fine-tune from the form in Chromium and watches it train on
the real training worker: the progress bar moves, the loss chart appears, and the job
ends with links to the adapters it produced and to their lineage."""

from __future__ import annotations

import re

import pytest
from playwright.sync_api import expect

from apps.accounts.models import Role
from apps.finetune.models import FineTuneJob
from tests.conftest import PASSWORD

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

# Enough steps of two rows that the training outlasts several of the page's one-second
# polls (and of the worker's once-a-second reports), so the bar is seen part way.
STEPS = 12


@pytest.fixture
def page(browser, live_server):
    context = browser.new_context(base_url=live_server.url)
    page = context.new_page()
    page.set_default_timeout(30_000)
    yield page
    context.close()


def test_launch_from_the_form_and_watch_it_train(
    page, users, gemma, train_version, training_worker
):
    page.goto("/login/")
    page.get_by_label("Username").fill(users[Role.DATA_SCIENTIST].username)
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Log in").click()
    page.get_by_role("navigation").get_by_role("link", name="Fine-tunes").click()

    launch = page.locator("#launch")
    launch.get_by_label("Base model").select_option(str(gemma.pk))
    launch.get_by_label("Training data").select_option(str(train_version.pk))
    launch.get_by_label("Lora rank").fill("4")
    launch.get_by_label("Max seq length").fill("64")
    launch.get_by_label("Learning rate").fill("0.005")
    launch.get_by_label("Max steps").fill(str(STEPS))
    launch.get_by_label("Batch size").fill("2")
    # The estimate follows the form as it changes.
    expect(launch.locator("[data-estimate]")).to_contain_text(f"{STEPS} steps")
    launch.get_by_role("button", name="Launch").click()

    expect(page).to_have_url(re.compile(r"/finetunes/\d+/$"))
    job = FineTuneJob.objects.get()
    assert job.params["max_steps"] == STEPS and job.params["batch_size"] == 2

    # htmx polls the job: the bar shows a step between the first and the last, and the
    # loss chart has appeared while it is still running.
    progress = page.locator("#job-progress")
    expect(progress).to_have_attribute("value", re.compile(r"^[1-9]\d?$"), timeout=600_000)
    expect(page.locator(".loss-chart")).to_be_visible()
    expect(page.locator(".loss-chart polyline.train")).to_be_attached()
    expect(page.locator("#job-status [data-state]")).to_have_text("Succeeded", timeout=600_000)
    expect(progress).to_have_attribute("value", "100")
    expect(page.locator("#job-steps")).to_have_text(f"step {STEPS} of {STEPS}")
    points = page.locator(".loss-chart polyline.train").get_attribute("points")
    assert len(points.split()) == STEPS

    job.refresh_from_db()
    outputs = page.locator("#outputs")
    expect(outputs.locator("[data-output='gguf']")).to_have_text(str(job.adapter))
    expect(outputs.locator("[data-output='peft']")).to_have_text(str(job.peft_adapter))
    outputs.locator("[data-lineage='adapter']").click()
    expect(page.get_by_role("heading", name=f"Lineage of {job.adapter}")).to_be_visible()
    ancestors = page.locator("#ancestors")
    expect(ancestors).to_contain_text(str(job.base_model))
    expect(ancestors).to_contain_text(str(train_version))

    page.go_back()
    page.locator("#outputs [data-output='gguf']").click()
    expect(page).to_have_url(re.compile(rf"/registry/versions/{job.adapter.pk}/?$"))
