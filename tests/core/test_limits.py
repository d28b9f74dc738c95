"""Request bodies are refused by route and by caller before Django reads them.

The wrapper is driven at the ASGI level, as uvicorn drives it, with the real URL
configuration, API keys and sessions: ``seen`` records each body message the app behind
it read, so "refused before reading" is an empty list.
"""

import asyncio
import json
from concurrent.futures import ThreadPoolExecutor

import pytest
from django.conf import settings
from django.test import Client

from aibox.limits import BodySizeLimit
from apps.accounts.models import Role, Scope
from apps.accounts.services import api_key_create
from tests.conftest import make_user

MiB = 1024 * 1024
UPLOAD_PATH = "/api/v1/registry/repos/tiny/versions/"


def run(path, headers, chunks, method="POST"):
    sent, seen = [], []
    queue = [
        {"type": "http.request", "body": c, "more_body": i < len(chunks) - 1}
        for i, c in enumerate(chunks)
    ]

    async def receive():
        return queue.pop(0)

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": method, "path": path, "headers": headers}

    async def inner(scope, receive, send):
        while True:
            message = await receive()
            seen.append(len(message["body"]))
            if not message["more_body"]:
                break
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    # In its own thread: the browser tests keep an event loop running in this one.
    with ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, BodySizeLimit(inner)(scope, receive, send)).result()
    body = json.loads(sent[1]["body"]) if sent[0]["status"] != 200 else None
    return sent[0]["status"], body, seen


def length(n: int) -> tuple[bytes, bytes]:
    return (b"content-length", str(n).encode())


@pytest.fixture
def admin_key(transactional_db):
    admin = make_user(Role.ADMIN, username="keyholder")
    return api_key_create(actor=admin, owner=admin, name="k", scopes=[Scope.ADMIN]).secret


def test_ordinary_route_refuses_a_large_declared_body_before_reading(transactional_db):
    status, body, seen = run("/healthz", [length(300 * MiB)], [b"x"])
    assert status == 413 and seen == []
    assert body == {"detail": "Request body larger than this endpoint's limit (1,048,576 bytes)."}


def test_upload_route_takes_the_upload_limit(settings, admin_key):
    settings.UPLOAD_MAX_BYTES = 10
    auth = (b"authorization", f"Bearer {admin_key}".encode())
    status, body, seen = run(UPLOAD_PATH, [length(5 * MiB), auth], [b"x"])
    assert status == 413 and seen == []
    assert "limit (10 bytes)" in body["detail"]
    # Under the upload limit (plus multipart framing), but far over the ordinary one.
    settings.UPLOAD_MAX_BYTES = 50 * MiB
    status, _, seen = run(UPLOAD_PATH, [length(20 * MiB), auth], [b"x" * MiB] * 20)
    assert status == 200 and sum(seen) == 20 * MiB


def test_anonymous_large_body_is_refused_before_reading_even_on_upload_routes(transactional_db):
    status, body, seen = run(UPLOAD_PATH, [length(300 * MiB)], [b"x"])
    assert status == 401 and seen == []
    assert "Authenticate before sending" in body["detail"]


def test_inference_api_refuses_before_reading_in_openai_shape(admin_key):
    auth = (b"authorization", f"Bearer {admin_key}".encode())
    status, body, seen = run("/v1/chat/completions", [length(3 * MiB), auth], [b"x"])
    assert status == 413 and seen == []
    assert body["error"]["code"] == "request_too_large"
    assert "2,621,440 bytes" in body["error"]["message"]
    # No key, or a wrong one: the key is checked before a large body is read.
    for headers in ([length(MiB)], [length(MiB), (b"authorization", b"Bearer aibox_no_such")]):
        status, body, seen = run("/v1/chat/completions", headers, [b"x" * MiB])
        assert status == 401 and seen == []
        assert body["error"]["code"] == "invalid_api_key"
    status, _, seen = run("/v1/chat/completions", [length(MiB), auth], [b"x" * MiB])
    assert status == 200 and seen == [MiB]


def test_a_signed_in_session_may_send_a_large_body(transactional_db):
    client = Client()
    client.force_login(make_user(Role.ADMIN, username="signed-in"))
    cookie = f"{settings.SESSION_COOKIE_NAME}={client.cookies[settings.SESSION_COOKIE_NAME].value}"
    headers = [length(MiB), (b"cookie", cookie.encode())]
    status, _, seen = run("/deployments/playground/chat", headers, [b"x" * MiB])
    assert status == 200 and seen == [MiB]
    client.logout()  # the session is gone from the database: the cookie no longer counts
    status, _, seen = run("/deployments/playground/chat", headers, [b"x" * MiB])
    assert status == 401 and seen == []


def test_chunked_body_needs_credentials_and_is_cut_off_at_the_limit(admin_key):
    chunked = (b"transfer-encoding", b"chunked")
    chunk = b"x" * (512 * 1024)
    status, _, seen = run("/healthz", [chunked], [chunk])
    assert status == 401 and seen == []
    auth = (b"authorization", f"Bearer {admin_key}".encode())
    status, _, seen = run("/healthz", [chunked, auth], [chunk] * 5)
    assert status == 413
    assert len(seen) == 2  # it stopped reading once past 1 MiB


def test_small_bodies_pass_without_a_credential_check(db):
    # A login form or a bad-key chat request: read as usual, the view decides.
    status, _, seen = run("/login/", [length(3)], [b"abc"])
    assert status == 200 and seen == [3]
    status, _, seen = run("/v1/chat/completions", [length(1000)], [b"x" * 1000])
    assert status == 200 and seen == [1000]
