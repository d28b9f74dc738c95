"""The /v1/ handler of aibox/asgi.py, in process: its own middleware list still checks
the Host header, sets the security headers and answers in OpenAI's error shape."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import httpx

from aibox.asgi import application


def _get(path: str, **headers: str) -> httpx.Response:
    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=application)
        async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as client:
            return await client.get(path, headers=headers)

    # On a thread of its own: a browser test may leave this one with a running loop.
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, go()).result()


def test_missing_key_is_401_with_security_headers():
    response = _get("/v1/models")
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "invalid_api_key"
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert response.headers["Referrer-Policy"] == "same-origin"


def test_unknown_host_is_refused():
    response = _get("/v1/models", host="evil.example")
    assert response.status_code == 400


def test_unknown_path_is_a_json_404():
    response = _get("/v1/nothing-here", authorization="Bearer x")
    assert response.status_code == 404
    assert response.headers["Content-Type"] == "application/json"
