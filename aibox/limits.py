"""Request bodies: a limit per route, and no large body from a caller we do not know.

Django's ASGI handler reads the whole body (spooling it to a temporary file) before
routing, middleware or the view run, so any check made there comes after the bytes have
arrived. This ASGI wrapper runs first and decides from the headers alone:

- Every route has a body limit. It is small by default (``REQUEST_MAX_BODY_BYTES``);
  a view raises it with a ``body_limit`` attribute naming a kind: ``"inference"``
  (``INFERENCE_MAX_BODY_BYTES``, the /v1/ API and the playground) or ``"upload"``
  (``UPLOAD_MAX_BYTES``, only the streamed upload endpoints). A declared length over
  the limit is answered 413 before a byte is read; a chunked body is cut off as soon as
  it crosses it.
- A body over ``ANONYMOUS_MAX_BODY_BYTES``, or of unknown (chunked) length, is read only
  for a caller with a valid API key or signed-in session; anyone else gets 401 first.
  Smaller bodies (a login form, a chat request) are read as usual and checked by the
  view, so the common request costs no extra database round trip here.
"""

from __future__ import annotations

import json
from functools import lru_cache
from importlib import import_module
from types import SimpleNamespace
from typing import Any

from asgiref.sync import sync_to_async
from django import db
from django.conf import settings
from django.contrib.auth import get_user
from django.http import parse_cookie
from django.urls import Resolver404, resolve

from apps.accounts.services import ApiKeyRejected, api_key_authenticate
from apps.deployments.credentials import SECRET_PREFIX as WORKER_SECRET_PREFIX
from apps.deployments.credentials import CredentialRejected, worker_credential_authenticate

UPLOAD = "upload"
INFERENCE = "inference"
# Multipart framing and form fields around an uploaded file.
MULTIPART_OVERHEAD = 1024 * 1024
ANONYMOUS_MAX_BODY_BYTES = 64 * 1024


def body_limit(kind: str | None) -> int:
    """The largest body, in bytes, that a route of ``kind`` takes (None: an ordinary one)."""
    if kind == UPLOAD:
        return settings.UPLOAD_MAX_BYTES + MULTIPART_OVERHEAD
    if kind == INFERENCE:
        return settings.INFERENCE_MAX_BODY_BYTES
    return settings.REQUEST_MAX_BODY_BYTES


# Resolving a path costs 20-80 us; the few paths that carry traffic (/v1/...) repeat.
@lru_cache(maxsize=4096)
def route_body_kind(path: str) -> str | None:
    """The ``body_limit`` kind that the view serving ``path`` declares, if any."""
    try:
        view = resolve(path).func
    except Resolver404:
        return None
    # Class-based views (Django's and DRF's) keep the class on the function as_view returns.
    for holder in (view, getattr(view, "view_class", None)):
        kind = getattr(holder, "body_limit", None)
        if kind is not None:
            return kind
    return None


def has_credentials(headers: dict[bytes, bytes]) -> bool:
    """Whether the request carries a valid API key, a worker credential (a training
    worker sending back its adapters) or the cookie of a signed-in session."""
    try:
        scheme, _, raw_key = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
        if scheme.lower() == "bearer" and raw_key.strip().startswith(WORKER_SECRET_PREFIX):
            try:
                worker_credential_authenticate(authorization=f"Bearer {raw_key.strip()}")
            except CredentialRejected:
                return False
            return True
        if scheme.lower() == "bearer":
            try:
                api_key_authenticate(raw_key=raw_key.strip())
            except ApiKeyRejected:
                return False
            return True
        cookies = parse_cookie(headers.get(b"cookie", b"").decode("latin-1"))
        session_key = cookies.get(settings.SESSION_COOKIE_NAME)
        if not session_key:
            return False
        store = import_module(settings.SESSION_ENGINE).SessionStore(session_key)
        # get_user reads (and on a stale password hash, flushes) only request.session.
        return get_user(SimpleNamespace(session=store)).is_authenticated
    finally:
        # Not a Django request: nothing else hands this thread's connection back.
        db.connection.close()


class BodyTooLarge(Exception):
    pass


class BodySizeLimit:
    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        openai_shape = scope["path"].startswith("/v1/")
        kind = route_body_kind(scope["path"])
        limit = body_limit(kind)
        # What the caller is told: the file size limit, without the multipart framing.
        shown = settings.UPLOAD_MAX_BYTES if kind == UPLOAD else limit
        declared = headers.get(b"content-length")
        length = int(declared) if declared is not None and declared.isdigit() else None
        if length is not None and length > limit:
            await _refuse_too_large(send, shown, openai_shape)
            return
        unknown_length = length is None and b"transfer-encoding" in headers
        large = unknown_length or (length or 0) > ANONYMOUS_MAX_BODY_BYTES
        if large and not await sync_to_async(has_credentials, thread_sensitive=False)(headers):
            await _refuse_anonymous(send, openai_shape)
            return
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge
            return message

        try:
            await self.app(scope, limited_receive, send)
        except BodyTooLarge:
            await _refuse_too_large(send, shown, openai_shape)


async def _refuse_too_large(send, shown: int, openai_shape: bool) -> None:
    message = f"Request body larger than this endpoint's limit ({shown:,} bytes)."
    await _answer(send, 413, message, "request_too_large", openai_shape)


async def _refuse_anonymous(send, openai_shape: bool) -> None:
    message = (
        "Authenticate before sending a request body this large: send a valid API key as "
        "'Authorization: Bearer <key>', or sign in."
    )
    await _answer(send, 401, message, "invalid_api_key", openai_shape)


async def _answer(send, status: int, message: str, code: str, openai_shape: bool) -> None:
    if openai_shape:
        error = {"message": message, "type": "invalid_request_error", "param": None, "code": code}
        payload: dict[str, Any] = {"error": error}
    else:
        payload = {"detail": message}
    headers = [(b"content-type", b"application/json"), (b"connection", b"close")]
    if status == 401:
        headers.append((b"www-authenticate", b'Bearer realm="aibox"'))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": json.dumps(payload).encode()})
