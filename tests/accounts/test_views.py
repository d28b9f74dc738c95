import pytest
import redis
from django.conf import settings
from django.test import Client

from apps.accounts.models import Role, User
from apps.accounts.services import LOGIN_DENIED_CACHE_PREFIX
from apps.audit.models import AuditEvent
from tests.conftest import PASSWORD, client_for


def login(client: Client, username: str, password: str):
    return client.post("/login/", {"username": username, "password": password})


def events(action: str):
    return AuditEvent.objects.filter(action=action).order_by("seq")


def test_login_and_logout_are_audited_with_source(users):
    client = Client(HTTP_USER_AGENT="Firefox/140", REMOTE_ADDR="192.0.2.10")
    response = login(client, "dana", PASSWORD)
    assert response.status_code == 302 and response["Location"] == "/"
    assert client.get("/").status_code == 200
    event = events("auth.login").get()
    assert (event.actor_label, event.source_ip, event.user_agent) == (
        "dana",
        "192.0.2.10",
        "Firefox/140",
    )
    assert client.post("/logout/").status_code == 302
    assert events("auth.logout").get().actor_label == "dana"
    assert client.get("/").status_code == 302  # back to the login page


def test_failed_login_is_audited_without_the_password(users):
    client = Client(REMOTE_ADDR="192.0.2.11")
    response = login(client, "dana", "wrong password 123")
    assert response.status_code == 200
    assert b"Please enter a correct username and password" in response.content
    event = events("auth.login_failed").get()
    assert event.outcome == "failure"
    assert event.actor_id is None
    assert event.target_label == "dana"
    assert "wrong password" not in repr(event.details)


@pytest.fixture(autouse=True)
def _no_refusals_remembered():
    """The first-refusal marks live in Redis for a cool-off period; start without them."""
    client = redis.Redis.from_url(settings.REDIS_URL)
    for key in client.scan_iter(f"*{LOGIN_DENIED_CACHE_PREFIX}*"):
        client.delete(key)


def test_repeated_failures_lock_the_username_at_that_address(users, settings):
    for _ in range(settings.AXES_FAILURE_LIMIT):
        login(Client(REMOTE_ADDR="192.0.2.20"), "devon", "nope nope nope")
    response = login(Client(REMOTE_ADDR="192.0.2.20"), "devon", PASSWORD)
    assert response.status_code == 429
    assert b"Too many failed logins" in response.content
    assert events("auth.login_failed").last().outcome == "denied"
    # Whoever knows the name cannot lock its owner out from another address.
    assert login(Client(REMOTE_ADDR="198.51.100.1"), "devon", PASSWORD).status_code == 302


def test_failures_spread_over_addresses_do_not_lock_the_user_out(users, settings):
    for i in range(settings.AXES_FAILURE_LIMIT + 2):
        login(Client(REMOTE_ADDR=f"192.0.2.{40 + i}"), "devon", "nope nope nope")
    assert login(Client(REMOTE_ADDR="198.51.100.2"), "devon", PASSWORD).status_code == 302


def test_repeated_failures_from_one_address_lock_that_address(users, settings):
    for i in range(settings.AXES_FAILURE_LIMIT):
        login(Client(REMOTE_ADDR="203.0.113.5"), f"guess{i}", "nope nope nope")
    locked = login(Client(REMOTE_ADDR="203.0.113.5"), "dana", PASSWORD)
    assert locked.status_code == 429
    assert login(Client(REMOTE_ADDR="203.0.113.6"), "dana", PASSWORD).status_code == 302


def test_a_locked_out_address_cannot_flood_the_audit_log(users, settings):
    for i in range(settings.AXES_FAILURE_LIMIT):
        login(Client(REMOTE_ADDR="203.0.113.9"), f"guess{i}", "nope nope nope")
    before = events("auth.login_failed").count()
    for i in range(30):
        assert login(Client(REMOTE_ADDR="203.0.113.9"), f"more{i}", "x").status_code == 429
    # At most one event says the address is refused (the attempt that locked it may have
    # said so already); the rest are counted by the lockout alone.
    assert events("auth.login_failed").count() <= before + 1
    assert events("auth.login_failed").last().outcome == "denied"


def test_a_name_that_is_no_user_is_kept_only_as_a_digest(users):
    typed = "Tr0ub4dor&3-my-password"
    for _ in range(2):
        login(Client(REMOTE_ADDR="192.0.2.60"), typed, "whatever")
    first, second = events("auth.login_failed")
    for event in (first, second):
        assert typed not in f"{event.actor_label} {event.target_label} {event.details}"
        assert event.target_label.startswith("unknown user ")
    assert first.target_label == second.target_label  # repeated attempts still show


def test_password_change(users):
    user = users[Role.APP_DEVELOPER]
    client = client_for(user)
    response = client.post(
        "/account/password/",
        {
            "old_password": PASSWORD,
            "new_password1": "a much longer new secret",
            "new_password2": "a much longer new secret",
        },
    )
    assert response.status_code == 302
    user.refresh_from_db()
    assert user.check_password("a much longer new secret")
    event = events("user.password_change").get()
    assert "secret" not in repr(event.details)
    # Still logged in after the change.
    assert client.get("/").status_code == 200


def test_admin_creates_user_with_role(admin_user):
    client = client_for(admin_user)
    response = client.post(
        "/users/new/",
        {
            "username": "nina",
            "first_name": "Nina",
            "email": "nina@example.com",
            "role": Role.COMPLIANCE_OFFICER,
            "password": "long enough password",
        },
    )
    assert response.status_code == 302
    nina = User.objects.get(username="nina")
    assert nina.role == Role.COMPLIANCE_OFFICER and nina.check_password("long enough password")
    event = events("user.create").get()
    assert event.actor_label == "ada" and event.target_label == "nina"
    assert event.details["role"] == "compliance_officer"
    assert "password" not in event.details
    assert login(Client(), "nina", "long enough password").status_code == 302


@pytest.mark.parametrize(
    ("data", "error"),
    [
        ({"username": "dana", "password": "long enough password"}, b"already exists"),
        ({"username": "bad name!", "password": "long enough password"}, b"letters, digits"),
        ({"username": "short", "password": "short"}, b"too short"),
        ({"username": "system", "password": "long enough password"}, b"reserved"),
    ],
)
def test_create_user_form_errors(users, data, error):
    client = client_for(users[Role.ADMIN])
    response = client.post("/users/new/", {"role": Role.APP_DEVELOPER, **data})
    assert response.status_code == 200
    assert error in response.content
    assert not events("user.create").exists()


def test_role_change_and_deactivation_are_audited(users):
    admin, dana = users[Role.ADMIN], users[Role.DATA_SCIENTIST]
    client = client_for(admin)
    edit = {"first_name": "", "last_name": "", "email": "", "is_active": "on"}
    response = client.post(f"/users/{dana.pk}/", {**edit, "role": Role.APP_DEVELOPER})
    assert response.status_code == 302
    change = events("user.role_change").get()
    assert change.details["changes"]["role"] == {"from": "data_scientist", "to": "app_developer"}

    client.post(f"/users/{dana.pk}/", {**edit, "role": Role.APP_DEVELOPER, "is_active": ""})
    assert events("user.deactivate").exists()
    assert login(Client(), "dana", PASSWORD).status_code == 200  # refused, form shown again


def test_admin_cannot_demote_themselves(admin_user):
    client = client_for(admin_user)
    response = client.post(
        f"/users/{admin_user.pk}/", {"role": Role.APP_DEVELOPER, "is_active": "on"}
    )
    assert response.status_code == 200
    assert b"cannot remove your own admin role" in response.content
    admin_user.refresh_from_db()
    assert admin_user.role == Role.ADMIN


def test_system_user_cannot_log_in_or_be_listed(admin_user):
    from apps.accounts.services import system_user

    system = system_user()
    assert not system.has_usable_password() and not system.is_active
    response = client_for(admin_user).get("/users/")
    assert b"ada" in response.content and b">system<" not in response.content
    assert client_for(admin_user).get(f"/users/{system.pk}/").status_code == 404


def test_api_key_page_shows_the_secret_once(users):
    client = client_for(users[Role.APP_DEVELOPER])
    response = client.post(
        "/account/api-keys/", {"name": "ci-bot", "scopes": ["inference"], "deployments": ""}
    )
    assert response.status_code == 200
    assert response["Cache-Control"] == "no-store"
    body = response.content.decode()
    assert "Copy it now" in body
    secret = body.split('<code id="new-key">')[1].split("</code>")[0]
    assert secret.startswith("aibox_")
    again = client.get("/account/api-keys/").content.decode()
    assert "ci-bot" in again and secret not in again
