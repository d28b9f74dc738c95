"""``manage.py deployment_default --wait``: ready means a live worker serves the model.

After a restart the database still says "ready" from the last run while the new worker
is loading; the command must not report ready until a worker's heartbeat lists the
replica's current generation.
"""

from __future__ import annotations

import io
import json
import time

import pytest
import redis
from django.conf import settings
from django.core.management import CommandError, call_command

from apps.accounts.models import Role
from apps.deployments.models import Deployment, Replica, State
from workers import redis_keys

WORKER = "cpu@restarting-host"


@pytest.fixture
def heartbeats():
    client = redis.Redis.from_url(settings.REDIS_URL)
    yield client
    client.delete(redis_keys.heartbeat_key(WORKER))


def _beat(client, replicas: list[dict]) -> None:
    payload = {"hostname": WORKER, "sent_at": time.time(), "serving": True, "replicas": replicas}
    client.set(redis_keys.heartbeat_key(WORKER), json.dumps(payload))


def test_wait_needs_a_live_worker_holding_the_replica(users, version, heartbeats, tmp_path):
    deployment = Deployment.objects.create(
        name="tiny-chat", model_version=version, context_length=256, running=True
    )
    deployment.state = State.READY
    deployment.save()
    replica = Replica.objects.create(
        deployment=deployment, index=0, worker=WORKER, generation=3, state=State.READY
    )
    args = {"name": "tiny-chat", "key_file": str(tmp_path / "key.txt")}

    # The database says ready, but no worker has said so: not ready.
    with pytest.raises(CommandError, match="not ready"):
        call_command("deployment_default", wait=1, **args)
    # A worker that still holds the previous generation (it is reloading): not ready.
    _beat(heartbeats, [{"replica_id": replica.pk, "generation": 2, "queue_depth": 0}])
    with pytest.raises(CommandError, match="not ready"):
        call_command("deployment_default", wait=1, **args)
    # The worker has loaded this generation: ready, and said so.
    _beat(heartbeats, [{"replica_id": replica.pk, "generation": 3, "queue_depth": 0}])
    out = io.StringIO()
    call_command("deployment_default", wait=30, stdout=out, **args)
    assert out.getvalue().splitlines()[-1] == "  tiny-chat: Ready"
    assert users[Role.ADMIN]  # the key file went to the first admin
    assert (tmp_path / "key.txt").read_text().strip()


def test_a_deployment_an_admin_stopped_is_reported_not_waited_for(users, version, tmp_path):
    Deployment.objects.create(
        name="tiny-chat",
        model_version=version,
        context_length=256,
        running=False,
        state=State.STOPPED,
    )
    out = io.StringIO()
    # Waiting for it would end in "not ready" (a CommandError that stops bin/aibox run).
    call_command(
        "deployment_default",
        name="tiny-chat",
        key_file=str(tmp_path / "k.txt"),
        wait=5,
        stdout=out,
    )
    assert "stopped by an admin; not starting it" in out.getvalue()
    deployment = Deployment.objects.get(name="tiny-chat")
    assert not deployment.running and deployment.state == State.STOPPED


def test_a_failed_deployment_is_reported_and_aibox_carries_on(users, version, tmp_path):
    Deployment.objects.create(
        name="tiny-chat",
        model_version=version,
        context_length=256,
        running=True,
        state=State.FAILED,
        state_reason="llama.cpp could not load the model.",
    )
    err = io.StringIO()
    call_command(
        "deployment_default",
        name="tiny-chat",
        key_file=str(tmp_path / "k.txt"),
        wait=5,
        stderr=err,
    )
    assert "tiny-chat failed: llama.cpp could not load the model." in err.getvalue()
    assert "AIBox keeps running" in err.getvalue()
