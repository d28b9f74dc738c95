"""The web server's PostgreSQL sessions terminated mid-request (``pg_terminate_backend``,
as a database restart, a failover or an administrator would).

A web server of its own (its sessions named by ``PGAPPNAME``, so the test ends only
those) in front of the serving stack's worker and Gemma. The stream that is running
when its sessions end still finishes, with its usage record; every request after it
is answered at the first try: nothing hands out a connection the server has closed
(Django's pool checks each one it hands out with ``CONN_HEALTH_CHECKS``, settings.py).
"""

from __future__ import annotations

import json
import threading

import httpx
import pytest
from django.db import connection

from apps.inference.models import Outcome, UsageRecord
from tests.live import start_web_server, stop_processes, wait_until

APP_NAME = "aibox-db-fault-web"


@pytest.fixture
def web(stack, tmp_path):
    """A web server whose database sessions carry APP_NAME; its URL."""
    server, url = start_web_server(
        env={**stack.env, "PGAPPNAME": APP_NAME}, log=tmp_path / "uvicorn.log"
    )
    try:
        yield url
    finally:
        stop_processes([server])


def terminate_sessions() -> int:
    """End the web server's sessions from the test's own; how many there were."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid() "
            "AND application_name = %s",
            [APP_NAME],
        )
        return cursor.fetchone()[0]


def test_sessions_terminated_mid_stream_lose_no_request(stack, web):
    inference = {"Authorization": f"Bearer {stack.key('inference')}"}
    reader = {"Authorization": f"Bearer {stack.key('registry-only')}"}
    # Requests that leave connections idle in the server's pool.
    assert httpx.get(f"{web}/api/v1/registry/repos/", headers=reader).status_code == 200

    started = threading.Event()
    events: list[dict | str] = []
    failures: list[BaseException] = []

    def stream() -> None:
        try:
            with httpx.stream(
                "POST",
                f"{web}/v1/completions",
                headers=inference,
                json={
                    "model": "gemma",
                    "prompt": "Count from 1 to 100: 1, 2, 3, 4,",
                    "max_tokens": 16,
                    "stream": True,
                },
                timeout=60,
            ) as response:
                for line in response.iter_lines():
                    if line.startswith("data: "):
                        data = line.removeprefix("data: ")
                        events.append(json.loads(data) if data.startswith("{") else data)
                        started.set()
        except BaseException as exc:  # noqa: BLE001 - a cut body is what the test looks for
            failures.append(exc)

    thread = threading.Thread(target=stream)
    thread.start()
    assert started.wait(60), "the stream never started"
    assert terminate_sessions() >= 1  # the stream's own session and the idle ones
    thread.join(timeout=60)
    assert not thread.is_alive(), "the stream hung after its database session ended"

    assert failures == []  # the body ended properly
    assert events[-1] == "[DONE]", events[-3:]
    request_id = events[0]["id"].removeprefix("cmpl-")
    delivered = sum(1 for e in events if isinstance(e, dict) and e["choices"][0]["text"])
    record = wait_until(
        lambda: UsageRecord.objects.filter(request_id=request_id).first(),
        what="the interrupted stream's usage record",
        timeout=30,
    )
    assert record.outcome == Outcome.OK and record.completion_tokens >= delivered > 0

    # Every request afterwards is answered at once: no connection the server had ended
    # is handed out again (each of those would be a 500).
    for _ in range(4):
        reply = httpx.get(f"{web}/api/v1/registry/repos/", headers=reader, timeout=30)
        assert reply.status_code == 200, reply.text
    reply = httpx.post(
        f"{web}/v1/completions",
        headers=inference,
        json={"model": "gemma", "prompt": "Hello", "max_tokens": 2},
        timeout=30,
    )
    assert reply.status_code == 200, reply.text
    request_id = reply.json()["id"].removeprefix("cmpl-")
    assert wait_until(
        lambda: UsageRecord.objects.filter(request_id=request_id).exists(),
        what="the next request's usage record",
        timeout=30,
    )
