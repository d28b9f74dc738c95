"""An admin asks the advisor for a setup and deploys the candidate it proposes."""

from __future__ import annotations

import pytest
from playwright.sync_api import expect

from apps.deployments import services as deployment_services
from apps.deployments.models import Deployment
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
