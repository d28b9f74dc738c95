"""Load on demand on the real stack: an idle deployment frees its memory on the worker,
stays listed, and the next requests (through the official openai client) wait for one
load and are answered, their usage records showing the wait."""

from __future__ import annotations

import threading
import time

from apps.audit.models import AuditEvent
from apps.deployments import lifecycle, selectors, services
from apps.deployments.models import Deployment, State
from apps.inference.models import Outcome, UsageRecord
from tests.serving.conftest import wait_for_state, wait_until

NAME = "gemma-on-demand"


def _held(stack) -> bool:
    worker = selectors.worker_get(stack.worker)
    return any(r["deployment"] == NAME for r in worker.replicas)


def _record(request_id: str) -> UsageRecord:
    # Written as the response ends: the client may read it a moment before.
    return wait_until(
        lambda: UsageRecord.objects.filter(request_id=request_id).first(),
        what=f"the usage record of {request_id}",
        timeout=10,
    )


def _unload(stack, deployment: Deployment) -> None:
    # The beat task's service, with the clock moved past the idle period.
    assert lifecycle.deployments_idle_unload(now=time.time() + 61) == [NAME]
    wait_for_state(deployment, State.IDLE)
    wait_until(lambda: not _held(stack), what=f"{stack.worker} unloading {NAME}", timeout=30)
    wait_until(
        lambda: deployment.replica_set.get().state == State.STOPPED,
        what="the replica reported stopped",
        timeout=30,
    )


def _events(deployment: Deployment, action: str):
    return AuditEvent.objects.filter(
        target_type="deployments.deployment", target_id=str(deployment.pk), action=action
    )


def test_an_idle_deployment_unloads_and_the_next_requests_load_it(stack, openai_client):
    deployment = stack.deploy(NAME, context_length=512, preset="precise", idle_unload_seconds=60)
    assert _held(stack)
    # Just loaded: not idle yet.
    assert lifecycle.deployments_idle_unload() == []

    _unload(stack, deployment)
    assert deployment.running
    assert "without requests" in deployment.state_reason
    assert _events(deployment, "deployment.idle_unload").count() == 1
    # Still offered: the API lists it, not ready.
    listed = {m.id: m for m in openai_client.models.list().data}
    assert NAME in listed and listed[NAME].model_extra["ready"] is False

    reply = openai_client.chat.completions.create(
        model=NAME, messages=[{"role": "user", "content": "Say hello."}], max_tokens=8
    )
    assert reply.choices[0].message.content
    assert _held(stack)
    deployment.refresh_from_db()
    assert deployment.state == State.READY
    record = _record(reply.id.removeprefix("chatcmpl-"))
    assert record.outcome == Outcome.OK and record.deployment_name == NAME
    assert record.load_ms > 0
    assert record.latency_ms >= record.load_ms
    load = _events(deployment, "deployment.load_on_request").get()
    assert load.details["requested_by"] == "serve-dev"

    # Unloaded again, three requests at once: one load, three answers.
    _unload(stack, deployment)
    replies: list = []

    def ask() -> None:
        replies.append(
            openai_client.completions.create(model=NAME, prompt="Once upon a", max_tokens=4)
        )

    threads = [threading.Thread(target=ask) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=90)
    assert len(replies) == 3 and all(r.choices[0].text for r in replies)
    assert _events(deployment, "deployment.load_on_request").count() == 2
    records = [_record(r.id.removeprefix("cmpl-")) for r in replies]
    assert all(r.outcome == Outcome.OK and r.load_ms > 0 for r in records)

    services.deployment_stop(actor=stack.admin, deployment=deployment)
    wait_until(lambda: not _held(stack), what=f"{NAME} stopping", timeout=30)
