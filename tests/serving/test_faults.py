"""Redis restarted under live streams, on a private Redis this test starts and kills.

Web server and worker run against that Redis (and the test database); the deployment is
made through the web API, so everything that crosses Redis goes through the one that
dies. Each stream must end with an error event (not a cut body), each request must
leave a usage record, and the box must serve again once Redis is back, untouched.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
import uuid

import httpx
import pytest

from apps.accounts.models import Role, Scope
from apps.accounts.services import api_key_create
from apps.deployments.models import Deployment, State
from apps.inference.models import Outcome, UsageRecord
from tests.conftest import make_user
from tests.faults import free_port, kill_redis, start_redis
from tests.live import start_celery_worker, start_web_server, stop_processes
from tests.serving.conftest import wait_for_state, wait_until

STREAMS = 3


@pytest.fixture
def private_stack(stack, settings, django_db_blocker, tmp_path):
    """A web server and a worker of their own on a private Redis, sharing the serving
    stack's database rows, artifact store and bundled model."""
    port = free_port()
    redis_url = f"redis://127.0.0.1:{port}/0"
    redis_server = start_redis(port)
    env = {**stack.env, "REDIS_URL": redis_url}
    # This process reads the workers' heartbeats from the same Redis.
    settings.REDIS_URL = redis_url
    processes: list[subprocess.Popen] = []
    with django_db_blocker.unblock():
        admin = make_user(Role.ADMIN, username=f"fault-admin-{port}")
        version = stack.version
        keys = {
            scope: api_key_create(actor=admin, owner=admin, name=scope, scopes=[scope]).secret
            for scope in (Scope.ADMIN, Scope.INFERENCE)
        }
        worker = f"fault-{uuid.uuid4().hex[:6]}@localhost"
        try:
            processes.append(start_celery_worker(env=env, name=worker, log=tmp_path / "w.log"))
            server, url = start_web_server(env=env, log=tmp_path / "uvicorn.log")
            processes.append(server)
            created = httpx.post(
                f"{url}/api/v1/deployments/",
                headers={"Authorization": f"Bearer {keys[Scope.ADMIN]}"},
                json={
                    "name": "gemma-fault",
                    "model_version": version.pk,
                    "context_length": 1024,
                    "parallel_slots": STREAMS,
                    "placement_worker": worker,
                },
                timeout=30,
            )
            assert created.status_code == 201, created.text
            wait_for_state(Deployment.objects.get(name="gemma-fault"), State.READY, timeout=120)
            state = {"url": url, "key": keys[Scope.INFERENCE], "port": port, "redis": redis_server}
            yield state
            redis_server = state["redis"]  # the test restarts it
        finally:
            stop_processes(processes)
            Deployment.objects.filter(name="gemma-fault").delete()
            if redis_server.poll() is None:
                redis_server.kill()


def test_redis_restarted_under_live_streams_loses_no_request(private_stack):
    url, key = private_stack["url"], private_stack["key"]
    started = [threading.Event() for _ in range(STREAMS)]
    events: list[list[dict]] = [[] for _ in range(STREAMS)]
    failures: list[BaseException] = []

    def stream(i: int) -> None:
        try:
            with httpx.stream(
                "POST",
                f"{url}/v1/completions",
                headers={"Authorization": f"Bearer {key}"},
                json={
                    "model": "gemma-fault",
                    "prompt": f"Story {i}:",
                    "max_tokens": 600,
                    "stream": True,
                },
                timeout=60,
            ) as response:
                for line in response.iter_lines():
                    if line.startswith("data: {"):
                        events[i].append(json.loads(line.removeprefix("data: ")))
                        started[i].set()
        except BaseException as exc:  # noqa: BLE001 - a cut body is what the test looks for
            failures.append(exc)

    readers = [threading.Thread(target=stream, args=(i,)) for i in range(STREAMS)]
    for reader in readers:
        reader.start()
    for event in started:
        assert event.wait(60), "a stream never started"

    kill_redis(private_stack["redis"])
    time.sleep(3)
    private_stack["redis"] = start_redis(private_stack["port"])
    back = time.monotonic()
    for reader in readers:
        reader.join(timeout=60)
        assert not reader.is_alive(), "a stream hung after Redis died"

    assert failures == []  # every body ended properly: no cut chunked stream
    for received in events:
        assert "error" in received[-1], received[-1]  # closed with an error event
        assert received[-1]["error"]["code"] == "broker_unavailable"
    # The ledger has every request, with the tokens each stream delivered.
    records = wait_until(
        lambda: (
            list(UsageRecord.objects.filter(deployment_name="gemma-fault"))
            if UsageRecord.objects.filter(deployment_name="gemma-fault").count() == STREAMS
            else None
        ),
        what="a usage record for every stream",
        timeout=30,
    )
    for record in records:
        assert record.outcome == Outcome.UNAVAILABLE and record.completion_tokens > 0

    # Serving again without anyone touching the box. While the worker reconnects a
    # request may be refused (503) or wait; either counts as "not yet".
    def answered() -> bool:
        try:
            reply = httpx.post(
                f"{url}/v1/completions",
                headers={"Authorization": f"Bearer {key}"},
                json={"model": "gemma-fault", "prompt": "Hi", "max_tokens": 2},
                timeout=30,
            )
        except httpx.TimeoutException:
            return False
        return reply.status_code == 200

    wait_until(answered, what="a request served after Redis came back", timeout=240)
    print(f"served again {time.monotonic() - back:.1f} s after Redis came back")  # noqa: T201
