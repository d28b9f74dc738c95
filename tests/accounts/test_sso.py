"""Single sign-on against a real OpenID Connect provider process (oidc-provider-mock),
started by the tests: users created and updated with their mapped role, audited; no role
or a deactivated user refused; passwords only for break-glass users when so configured."""

from __future__ import annotations

import socket
import subprocess
import sys
from urllib.parse import urlsplit

import httpx
import pytest
from django.test import Client
from playwright.sync_api import expect

from apps.accounts.models import Role, User
from apps.audit.models import AuditEvent
from tests.conftest import PASSWORD
from tests.live import wait_until

ROLE_MAP = [
    ("aibox-admins", Role.ADMIN),
    ("compliance", Role.COMPLIANCE_OFFICER),
    ("ml-team", Role.DATA_SCIENTIST),
    ("apps", Role.APP_DEVELOPER),
]


@pytest.fixture(scope="module")
def provider():
    """The provider, as its own process on a free port; its issuer URL."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    process = subprocess.Popen(  # noqa: S603 - our interpreter, the package's own CLI
        [sys.executable, "-m", "oidc_provider_mock", "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    issuer = f"http://127.0.0.1:{port}"

    def answers() -> bool:
        try:
            return httpx.get(f"{issuer}/.well-known/openid-configuration").status_code == 200
        except httpx.TransportError:
            return False

    try:
        wait_until(answers, what="the OpenID provider answering", timeout=30)
        yield issuer
    finally:
        process.terminate()
        process.wait(timeout=10)


@pytest.fixture
def sso(settings, provider):
    settings.OIDC_ISSUER = provider
    settings.OIDC_RP_CLIENT_ID, settings.OIDC_RP_CLIENT_SECRET = "aibox", "not-checked-by-the-mock"
    settings.OIDC_ROLE_MAP = [(group, str(role)) for group, role in ROLE_MAP]
    settings.AUTHENTICATION_BACKENDS = [
        *settings.AUTHENTICATION_BACKENDS,
        "apps.accounts.sso.SsoBackend",
    ]
    return provider


def claims(provider: str, sub: str, **values) -> None:
    assert httpx.put(f"{provider}/users/{sub}", json=values).status_code == 204


def sign_in(client: Client, sub: str):
    """The code flow as a browser runs it: AIBox -> provider (the person says who they
    are) -> AIBox's callback, which swaps the code for tokens at the provider."""
    start = client.get("/sso/login/")
    assert start.status_code == 302
    authorized = httpx.post(start["Location"], data={"sub": sub})
    assert authorized.status_code == 302
    callback = urlsplit(authorized.headers["location"])
    return client.get(f"{callback.path}?{callback.query}")


def test_first_sign_in_creates_the_user_with_the_mapped_role(db, sso):
    claims(
        sso,
        "sub-alice",
        email="alice@example.com",
        preferred_username="alice",
        groups=["staff", "ml-team"],
    )
    client = Client()
    response = sign_in(client, "sub-alice")
    assert response.status_code == 302 and response["Location"] == "/"
    assert client.get("/").status_code == 200  # signed in
    alice = User.objects.get(oidc_subject="sub-alice")
    assert (alice.username, alice.role, alice.email) == (
        "alice",
        Role.DATA_SCIENTIST,
        "alice@example.com",
    )
    assert not alice.has_usable_password()
    created = AuditEvent.objects.get(action="user.sso_create")
    assert created.details == {"role": "data_scientist", "issuer": sso}
    assert AuditEvent.objects.filter(action="auth.login", actor_label="alice").exists()


def test_the_role_follows_the_provider_at_each_sign_in(db, sso):
    claims(sso, "sub-bob", preferred_username="bob", groups=["apps"])
    sign_in(Client(), "sub-bob")
    assert User.objects.get(oidc_subject="sub-bob").role == Role.APP_DEVELOPER
    claims(sso, "sub-bob", preferred_username="bob", groups=["compliance", "apps"])
    assert sign_in(Client(), "sub-bob")["Location"] == "/"
    bob = User.objects.get(oidc_subject="sub-bob")
    assert bob.role == Role.COMPLIANCE_OFFICER and User.objects.filter(username="bob").count() == 1
    change = AuditEvent.objects.get(action="user.sso_role_change")
    assert change.details == {"from": "app_developer", "to": "compliance_officer", "issuer": sso}


def test_no_mapped_role_or_a_deactivated_user_is_refused(db, sso):
    claims(sso, "sub-eve", preferred_username="eve", groups=["visitors"])
    client = Client()
    refused = sign_in(client, "sub-eve")
    assert refused["Location"] == "/login/?sso=refused"
    assert "has no AIBox role" in client.get(refused["Location"]).content.decode()
    assert not User.objects.filter(oidc_subject="sub-eve").exists()
    assert client.get("/").status_code == 302  # not signed in
    assert AuditEvent.objects.filter(action="auth.login_failed").exists()

    claims(sso, "sub-carl", preferred_username="carl", groups=["ml-team"])
    sign_in(Client(), "sub-carl")
    User.objects.filter(oidc_subject="sub-carl").update(is_active=False)
    again = Client()
    assert sign_in(again, "sub-carl")["Location"] == "/login/?sso=refused"
    assert again.get("/").status_code == 302


def test_a_same_named_local_user_is_not_taken_over(db, sso, users):
    """The provider's subject decides who someone is: a name or e-mail that matches a
    local account does not sign in as it."""
    claims(sso, "sub-other-dana", preferred_username="dana", groups=["aibox-admins"])
    sign_in(Client(), "sub-other-dana")
    newcomer = User.objects.get(oidc_subject="sub-other-dana")
    assert newcomer.username == "dana-2" and newcomer.role == Role.ADMIN
    assert User.objects.get(username="dana").role == Role.DATA_SCIENTIST


def test_break_glass_only_leaves_passwords_to_the_named_users(db, sso, settings, users):
    settings.LOCAL_LOGIN, settings.BREAK_GLASS_USERS = "break-glass", ["ada"]
    page = Client().get("/login/").content.decode()
    assert "Sign in with single sign-on" in page and "break-glass accounts only" in page
    refused = Client().post("/login/", {"username": "dana", "password": PASSWORD})
    assert refused.status_code == 200  # the form again, not signed in
    assert Client().post("/login/", {"username": "ada", "password": PASSWORD}).status_code == 302


def test_without_an_issuer_there_is_no_single_sign_on(db):
    assert Client().get("/sso/login/").status_code == 404
    assert "single sign-on" not in Client().get("/login/").content.decode()


@pytest.mark.browser
@pytest.mark.django_db(transaction=True)
def test_a_person_signs_in_through_the_provider_in_a_browser(sso, browser, live_server):
    claims(sso, "sub-grace", preferred_username="grace", name="Grace H", groups=["compliance"])
    context = browser.new_context(base_url=live_server.url)
    page = context.new_page()
    page.set_default_timeout(30_000)
    try:
        page.goto("/login/")
        page.get_by_role("link", name="Sign in with single sign-on").click()
        page.wait_for_url(f"{sso}/oauth2/authorize*")  # at the provider now
        page.locator("input[name=sub]").fill("sub-grace")
        page.get_by_role("button", name="Authorize").click()
        page.wait_for_url(f"{live_server.url}/")
        expect(page.locator("body")).to_contain_text("grace")
        # The mapped role: a compliance officer's menu has the audit log.
        expect(page.get_by_role("navigation", name="Main")).to_contain_text("Audit")
    finally:
        context.close()
    assert User.objects.get(oidc_subject="sub-grace").role == Role.COMPLIANCE_OFFICER
