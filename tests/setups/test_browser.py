"""An admin asks the advisor for a setup and deploys the candidate it proposes."""

from __future__ import annotations

import pytest
from playwright.sync_api import expect

from apps.deployments import services as deployment_services
from apps.deployments.models import Deployment
from apps.setups import services
from apps.setups.models import Origin, Setup
from tests.conftest import PASSWORD

pytestmark = pytest.mark.browser


def test_from_the_advisor_to_a_deployed_candidate(browser, stack):
    context = browser.new_context(base_url=stack.url)
    page = context.new_page()
    page.set_default_timeout(30_000)
    try:
        page.goto("/login/")
        page.get_by_label("Username").fill("setup-admin")
        page.get_by_label("Password").fill(PASSWORD)
        page.get_by_role("button", name="Log in").click()

        page.get_by_role("navigation").get_by_role("link", name="Setups").click()
        page.get_by_role("link", name="Ask the advisor").click()
        page.get_by_label("Use case").select_option("coding")
        page.get_by_label("Experience").select_option("fast")
        page.get_by_role("button", name="Advise").click()

        candidate = page.locator("#candidates article.candidate").first
        expect(candidate).to_contain_text(str(stack.version))
        expect(candidate.locator(".reasons")).to_contain_text("8,192 tokens of context")
        expect(candidate.locator(".fit")).to_contain_text("Fits on")
        expect(candidate.locator(".expected")).to_contain_text("tokens/s")
        candidate.get_by_role("button", name="Deploy").click()

        expect(page.get_by_role("heading", name="Deployment ")).to_be_visible()
        expect(page.locator("#deployment-state [data-state]").first).to_have_attribute(
            "data-state", "ready", timeout=90_000
        )
    finally:
        context.close()

    setup = Setup.objects.get(origin=Origin.ADVISOR, use_case="coding", experience="fast")
    deployment = Deployment.objects.get(name=setup.name)
    assert (deployment.context_length, deployment.parallel_slots) == (8192, 4)
    assert deployment.created_by.username == "setup-admin"
    deployment_services.deployment_stop(actor=stack.admin, deployment=deployment)


def test_switch_and_roll_back_from_the_deployment_page(browser, stack):
    common = {"use_case": "chat", "model_version": stack.version, "context_length": 512}
    fast = services.setup_create(
        actor=stack.admin, name="ui-fast", experience="fast", preset="balanced", **common
    )
    services.setup_create(
        actor=stack.admin, name="ui-creative", experience="creative", preset="creative", **common
    )
    deployment = services.setup_deploy(actor=stack.admin, setup=fast, name="ui-switch")
    context = browser.new_context(base_url=stack.url)
    page = context.new_page()
    page.set_default_timeout(30_000)
    try:
        page.goto("/login/")
        page.get_by_label("Username").fill("setup-admin")
        page.get_by_label("Password").fill(PASSWORD)
        page.get_by_role("button", name="Log in").click()
        page.goto("/deployments/ui-switch/")
        expect(page.locator("#deployment-state [data-state]").first).to_have_attribute(
            "data-state", "ready", timeout=90_000
        )
        # The switch form arrives with htmx; the new setup loads beside the old one.
        page.locator("#switch-form").get_by_label("Setup").select_option(label="ui-creative")
        page.get_by_role("button", name="Switch").click()
        expect(page.locator(".messages")).to_contain_text("revision 2")
        revision_2 = page.locator('#revisions tr[data-revision="2"]')
        expect(revision_2).to_have_attribute("data-revision-state", "active", timeout=90_000)
        expect(revision_2).to_contain_text("setup ui-creative")

        page.get_by_role("button", name="Roll back to r1").click()
        revision_3 = page.locator('#revisions tr[data-revision="3"]')
        expect(revision_3).to_have_attribute("data-revision-state", "active", timeout=90_000)
        expect(revision_3).to_contain_text("rollback to revision 1")
    finally:
        context.close()
    deployment.refresh_from_db()
    assert deployment.preset == "balanced" and deployment.revision.number == 3
    deployment_services.deployment_stop(actor=stack.admin, deployment=deployment)
