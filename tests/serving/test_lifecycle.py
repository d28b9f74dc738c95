"""Deployments on real workers: placement, several at once, stop and worker death."""

from __future__ import annotations

import json
import signal
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from django.core.exceptions import ValidationError

from apps.audit.models import AuditEvent
from apps.deployments import lifecycle, selectors, services
from apps.deployments.models import Deployment, Replica, State
from apps.inference.models import Outcome, UsageRecord
from tests.serving.conftest import OFFLINE_AFTER, wait_for_state, wait_until


def _post(stack, path: str, body: dict, timeout: float = 60) -> httpx.Response:
    return httpx.post(
        f"{stack.url}{path}",
        headers={"Authorization": f"Bearer {stack.key()}"},
        json=body,
        timeout=timeout,
    )


def test_worker_heartbeat_reports_hardware_and_held_replicas(stack):
    worker = selectors.worker_get(stack.worker)
    assert worker.online and worker.serving and worker.pool == "thread"
    assert worker.cpu_cores >= 1 and worker.ram_total_mib > 0
    gemma = Deployment.objects.get(name="gemma")
    assert worker.holds(gemma.replica_set.get())
    held = {r["deployment"] for r in worker.replicas}
    assert "gemma" in held


def test_deploy_is_audited_with_the_served_digest(stack):
    gemma = Deployment.objects.get(name="gemma")
    events = AuditEvent.objects.filter(
        target_type="deployments.deployment", target_id=str(gemma.pk)
    )
    actions = list(events.order_by("seq").values_list("action", flat=True))
    assert actions[:1] == ["deployment.create"] and "replica.ready" in actions
    ready = events.get(action="replica.ready")
    assert ready.details["sha256"] == stack.version.sha256
    assert ready.details["worker"] == stack.worker
    assert ready.details["chat_template"] == "default:gemma3"


def test_placement_refuses_what_will_not_fit(stack):
    with pytest.raises(ValidationError) as caught:
        services.deployment_create(
            actor=stack.admin,
            name="too-big",
            model_version=stack.version,
            context_length=32768,
            parallel_slots=64,
        )
    message = " ".join(caught.value.messages)
    assert "needs about" in message and "available" in message
    assert not Deployment.objects.filter(name="too-big").exists()


def test_two_deployments_answer_at_once(stack):
    stack.deploy("gemma-two", context_length=512, preset="creative")
    results: dict[str, int] = {}

    def ask(name: str) -> None:
        reply = _post(stack, "/v1/completions", {"model": name, "prompt": "Hello", "max_tokens": 6})
        results[name] = reply.status_code

    threads = [threading.Thread(target=ask, args=(name,)) for name in ("gemma", "gemma-two")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert results == {"gemma": 200, "gemma-two": 200}
    worker = selectors.worker_get(stack.worker)
    assert {"gemma", "gemma-two"} <= {r["deployment"] for r in worker.replicas}
    services.deployment_stop(actor=stack.admin, deployment=Deployment.objects.get(name="gemma-two"))


def test_stopping_a_deployment_fails_waiting_requests_cleanly(stack):
    deployment = stack.deploy("gemma-stop", context_length=512, queue_size=4)
    body = {"model": "gemma-stop", "prompt": "Tell a long story:", "max_tokens": 300}
    outcomes: list[httpx.Response] = []

    def ask() -> None:
        outcomes.append(_post(stack, "/v1/completions", body))

    threads = [threading.Thread(target=ask) for _ in range(2)]
    for thread in threads:
        thread.start()

    def depth() -> int:
        worker = selectors.worker_get(stack.worker)
        return sum(r["queue_depth"] for r in worker.replicas if r["deployment"] == "gemma-stop")

    wait_until(lambda: depth() == 2, what="one request generating and one waiting")
    services.deployment_stop(actor=stack.admin, deployment=deployment)
    for thread in threads:
        thread.join(timeout=30)
    assert [r.status_code for r in outcomes] == [503, 503]
    for response in outcomes:
        error = response.json()["error"]
        assert error["code"] == "replica_unavailable" and "stopped" in error["message"]
    wait_for_state(deployment, State.STOPPED, timeout=30)
    # Stopped: the next request is refused at once.
    after = _post(stack, "/v1/completions", body, timeout=5)
    assert after.status_code == 503 and "stopped" in after.json()["error"]["message"]


def test_restart_and_scale_reload_replicas(stack):
    deployment = stack.deploy("gemma-scale", context_length=256)
    first = deployment.replica_set.get()
    services.deployment_scale(actor=stack.admin, deployment=deployment, replicas=2)
    wait_for_state(deployment, State.READY)
    both_ready = Replica.objects.filter(deployment=deployment, state=State.READY, generation=1)
    wait_until(lambda: both_ready.count() == 2, what="the second replica becoming ready")
    services.deployment_restart(actor=stack.admin, deployment=deployment)
    reloaded = Replica.objects.filter(deployment=deployment, state=State.READY, generation=2)
    wait_until(lambda: reloaded.count() == 2, what="both replicas coming back after a restart")
    assert deployment.replica_set.get(index=0).generation == first.generation + 1
    services.deployment_scale(actor=stack.admin, deployment=deployment, replicas=1)
    assert deployment.replica_set.count() == 1
    reply = _post(
        stack, "/v1/completions", {"model": "gemma-scale", "prompt": "Hi", "max_tokens": 2}
    )
    assert reply.status_code == 200
    services.deployment_stop(actor=stack.admin, deployment=deployment)


def test_killed_worker_makes_its_deployment_unavailable_without_a_hang(stack):
    name = f"doomed-{uuid.uuid4().hex[:6]}@localhost"
    process = stack.start_worker(name)
    deployment = stack.deploy("gemma-doomed", context_length=512, placement_worker=name)
    assert deployment.replica_set.get().worker == name

    started = threading.Event()
    events: list[str] = []

    def stream() -> None:
        with httpx.stream(
            "POST",
            f"{stack.url}/v1/completions",
            headers={"Authorization": f"Bearer {stack.key()}"},
            json={"model": "gemma-doomed", "prompt": "Story:", "max_tokens": 500, "stream": True},
            timeout=60,
        ) as response:
            for line in response.iter_lines():
                if line:
                    events.append(line)
                    started.set()

    reader = threading.Thread(target=stream)
    reader.start()
    assert started.wait(30)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=10)
    reader.join(timeout=OFFLINE_AFTER + 15)
    assert not reader.is_alive(), "the stream hung after its worker died"
    last = json.loads(events[-1].removeprefix("data: "))
    assert last["error"]["code"] == "model_unavailable"
    assert "stopped responding" in last["error"]["message"]
    # The usage record bills what the client received before the cut (each chunk holds
    # at least one token), not the 0 tokens of an end event that never came.
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
    delivered = [c for c in chunks if c.get("choices") and c["choices"][0]["text"]]
    cut = UsageRecord.objects.get(deployment_name="gemma-doomed", stream=True)
    assert cut.completion_tokens >= len(delivered) > 0

    # The next request fails with a clear reason (a hang would hit the client's timeout).
    reply = _post(stack, "/v1/completions", {"model": "gemma-doomed", "prompt": "Hi"}, timeout=5)
    assert reply.status_code == 503
    assert "offline" in reply.json()["error"]["message"]
    assert (
        UsageRecord.objects.filter(
            deployment_name="gemma-doomed", outcome=Outcome.UNAVAILABLE
        ).count()
        >= 1
    )
    assert not selectors.worker_get(name).online


def _offline(hostname: str) -> bool:
    worker = selectors.worker_get(hostname)
    return worker is None or not worker.online


def test_two_replicas_on_two_workers_share_the_requests_and_outlive_one_of_them(stack):
    spares = [f"pair-{uuid.uuid4().hex[:6]}@localhost" for _ in range(2)]
    processes = dict(zip(spares, (stack.start_worker(name) for name in spares), strict=True))
    deployment = stack.deploy("gemma-spread", context_length=512, replicas=2)
    holders = set(deployment.replica_set.values_list("worker", flat=True))
    assert len(holders) == 2, "the two replicas went to the same worker"
    # Ready as soon as one replica is: wait for both workers to say they hold theirs.
    wait_until(
        lambda: len(selectors.replicas_serving(deployment.replica_set.all())) == 2,
        what="both replicas serving",
        timeout=120,
    )

    def complete(_: int) -> httpx.Response:
        body = {"model": "gemma-spread", "prompt": "Once upon a time", "max_tokens": 24}
        return _post(stack, "/v1/completions", body)

    # Requests in flight together go to the replica with fewer in flight: both serve.
    with ThreadPoolExecutor(max_workers=4) as pool:
        replies = list(pool.map(complete, range(4)))
    assert [r.status_code for r in replies] == [200] * 4
    served = set(
        UsageRecord.objects.filter(deployment_name="gemma-spread").values_list("worker", flat=True)
    )
    assert served == holders

    # One of them dies (one the test started): once it shows offline, every request goes
    # to the other, and beat's next run places the lost replica again, on another worker.
    victim = next(name for name in spares if name in holders)
    survivor = next(iter(holders - {victim}))
    processes[victim].send_signal(signal.SIGKILL)
    processes[victim].wait(timeout=10)
    wait_until(lambda: _offline(victim), what=f"{victim} going offline", timeout=OFFLINE_AFTER + 10)
    before = UsageRecord.objects.filter(deployment_name="gemma-spread").count()
    assert [complete(i).status_code for i in range(3)] == [200] * 3
    after = UsageRecord.objects.filter(deployment_name="gemma-spread").order_by("-created_at")[:3]
    assert {r.worker for r in after} == {survivor}
    assert UsageRecord.objects.filter(deployment_name="gemma-spread").count() == before + 3

    lost = deployment.replica_set.get(worker=victim)
    moves = [m for m in lifecycle.replicas_rehome() if m.startswith("gemma-spread#")]
    lost.refresh_from_db()
    assert moves == [f"gemma-spread#{lost.index}: {victim} -> {lost.worker}"]
    assert lost.worker not in (victim, survivor)  # the other live worker: still spread
    assert lost.generation == 2
    moved = AuditEvent.objects.get(action="replica.moved", target_id=str(deployment.pk))
    assert moved.details["from"] == victim and moved.details["to"] == lost.worker
    assert moved.details["generation"] == [1, 2]
    wait_until(
        lambda: len(selectors.replicas_serving(deployment.replica_set.all())) == 2,
        what="the moved replica serving",
        timeout=120,
    )
    assert not [m for m in lifecycle.replicas_rehome() if m.startswith("gemma-spread#")]

    # A replica removed while its worker could not be told (here: its row deleted) is
    # unloaded from that worker at the next run.
    Replica.objects.filter(pk=lost.pk).delete()
    lifecycle.replicas_rehome()
    wait_until(
        lambda: (
            not any(r["replica_id"] == lost.pk for r in selectors.worker_get(lost.worker).replicas)
        ),
        what=f"{lost.worker} unloading the replica it should no longer hold",
    )
    services.deployment_stop(actor=stack.admin, deployment=deployment)
