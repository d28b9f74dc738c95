"""An admin's first session, in a real browser: users, roles, API keys, audit log."""

import re

import pytest
from playwright.sync_api import expect

from apps.accounts.models import ApiKey, Role, User
from tests.conftest import PASSWORD, make_user

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]


def test_admin_manages_users_and_keys_and_sees_it_audited(page):
    make_user(Role.ADMIN, username="ada")

    page.goto("/")
    expect(page).to_have_url(re.compile(r"/login/"))
    page.get_by_label("Username").fill("ada")
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Log in").click()
    expect(page.get_by_role("heading", name="Welcome, ada")).to_be_visible()

    # Create a data scientist.
    page.get_by_role("navigation").get_by_role("link", name="Users").click()
    page.get_by_role("link", name="New user").click()
    page.get_by_label("Username").fill("dana")
    page.get_by_label("First name").fill("Dana")
    page.get_by_label("Role").select_option(label="Data scientist")
    page.get_by_label("Password").fill("a long initial password")
    page.get_by_role("button", name="Create user").click()
    expect(page.get_by_text("User dana created as Data scientist.")).to_be_visible()
    expect(page.get_by_role("row", name=re.compile(r"dana.*Data scientist"))).to_be_visible()
    assert User.objects.get(username="dana").role == Role.DATA_SCIENTIST

    # Create an API key: the secret is shown once.
    page.get_by_role("navigation").get_by_role("link", name="API keys").click()
    page.get_by_label("Name", exact=True).fill("helpdesk-bot")
    page.get_by_label("Inference (all or named deployments)").check()
    page.get_by_role("button", name="Create key").click()
    secret = page.locator("#new-key").inner_text()
    assert secret.startswith("aibox_")
    row = page.locator("tr[data-key='helpdesk-bot']")
    expect(row).to_contain_text("active")

    # Revoke it (htmx, after a confirmation dialog).
    page.once("dialog", lambda dialog: dialog.accept())
    row.get_by_role("button", name="Revoke").click()
    expect(page.locator("tr[data-key='helpdesk-bot']")).to_contain_text("revoked")
    assert ApiKey.objects.get(name="helpdesk-bot").revoked_at is not None
    page.reload()
    expect(page.locator("#new-key")).to_have_count(0)  # never shown again

    # Every step is in the audit log, newest first.
    page.get_by_role("navigation").get_by_role("link", name="Audit log").click()
    table = page.locator("table.audit")
    for action in ("apikey.revoke", "apikey.create", "user.create", "auth.login"):
        expect(table.get_by_text(action, exact=True)).to_be_visible()
    actions = table.locator("tbody tr td:nth-child(4)").all_inner_texts()
    assert actions[:4] == ["apikey.revoke", "apikey.create", "user.create", "auth.login"]
    assert secret not in page.content()

    # Filtering narrows the list without a page reload.
    page.get_by_label("Action").fill("apikey.")
    page.get_by_role("button", name="Filter").click()
    expect(table.locator("tbody tr")).to_have_count(2)
