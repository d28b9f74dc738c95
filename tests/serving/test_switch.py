"""Switching a running deployment to another setup under the same name: clients that keep
streaming through a switch and a rollback see no failure, and every answer names the
revision that served it; a switch that cannot load leaves the old revision serving."""

from __future__ import annotations

import threading
import uuid
from dataclasses import dataclass, field

import pytest

from apps.deployments.models import Deployment, RevisionState, State
from apps.inference.models import UsageRecord
from apps.registry.services import model_repo_create, model_version_approve
from tests.conftest import client_for
from tests.live import wait_until
from tests.registry.conftest import upload_version, write_tiny_gguf
from tests.serving.conftest import wait_for_state
from tests.setups.conftest import write_shaped_gguf

CLIENTS = 4


@dataclass
class Traffic:
    """Clients streaming chat completions in a loop until told to stop."""

    url: str
    key: str
    model: str
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    answers: dict[str, str] = field(default_factory=dict)  # request id -> fingerprint
    failures: list[str] = field(default_factory=list)
    threads: list[threading.Thread] = field(default_factory=list)

    def start(self) -> None:
        for n in range(CLIENTS):
            thread = threading.Thread(target=self._client, args=(n,), daemon=True)
            thread.start()
            self.threads.append(thread)

    def _client(self, n: int) -> None:
        from openai import OpenAI

        client = OpenAI(base_url=f"{self.url}/v1", api_key=self.key, max_retries=0, timeout=60)
        while not self.stop.is_set():
            try:
                stream = client.chat.completions.create(
                    model=self.model,
                    messages=[{"role": "user", "content": f"Count to ten, client {n}."}],
                    max_tokens=12,
                    stream=True,
                )
                fingerprints, request_id, text = set(), "", ""
                for chunk in stream:
                    fingerprints.add(chunk.system_fingerprint)
                    request_id = chunk.id.split("-", 1)[1]
                    if chunk.choices and chunk.choices[0].delta.content:
                        text += chunk.choices[0].delta.content
                assert len(fingerprints) == 1, fingerprints
                with self.lock:
                    self.answers[request_id] = fingerprints.pop()
            except Exception as exc:  # noqa: BLE001 - every failure is what the test counts
                with self.lock:
                    self.failures.append(f"client {n}: {exc!r}")

    def seen(self, revision: int) -> int:
        with self.lock:
            return sum(1 for f in self.answers.values() if f.endswith(f"-r{revision}"))

    def finish(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=90)


def _active(deployment: Deployment) -> int:
    deployment.refresh_from_db()
    return deployment.revision.number


def _drained(deployment: Deployment) -> bool:
    """Only the served revision's replicas are left (the old ones unloaded)."""
    deployment.refresh_from_db()
    return all(r.revision_id == deployment.revision_id for r in deployment.replica_set.all())


def test_clients_stream_through_a_switch_and_a_rollback_without_a_failure(stack):
    deployment = stack.deploy("switchy", context_length=512, parallel_slots=2, preset="precise")
    admin = client_for(stack.admin)
    traffic = Traffic(stack.url, stack.key(), "switchy")
    traffic.start()
    try:
        wait_until(lambda: traffic.seen(1) >= CLIENTS, what="answers from revision 1")
        answer = admin.post(
            "/api/v1/deployments/switchy/switch",
            {"settings": {"preset": "creative", "context_length": 1024}, "label": "roomier"},
            content_type="application/json",
        )
        assert answer.status_code == 202, answer.content
        assert answer.json()["number"] == 2 and answer.json()["state"] == "pending"
        wait_until(lambda: _active(deployment) == 2, what="revision 2 taking over", timeout=120)
        wait_until(lambda: _drained(deployment), what="revision 1 unloading", timeout=60)
        wait_until(lambda: traffic.seen(2) >= CLIENTS, what="answers from revision 2")

        answer = admin.post(
            "/api/v1/deployments/switchy/rollback", {"revision": 1}, content_type="application/json"
        )
        assert answer.status_code == 202, answer.content
        wait_until(lambda: _active(deployment) == 3, what="the rollback taking over", timeout=120)
        wait_until(lambda: _drained(deployment), what="revision 2 unloading", timeout=60)
        wait_until(lambda: traffic.seen(3) >= CLIENTS, what="answers from revision 3")
    finally:
        traffic.finish()

    assert traffic.failures == []
    deployment.refresh_from_db()
    assert (deployment.preset, deployment.context_length) == ("precise", 512)
    assert deployment.state == State.READY
    states = dict(deployment.revisions.values_list("number", "state"))
    assert states == {1: "retired", 2: "retired", 3: "active"}
    assert deployment.revisions.get(number=3).label == "rollback to revision 1"

    # Every answer names the revision that served it, and its usage record says the same.
    # The web process writes a record as it closes the stream, just after the client has
    # read the last chunk: wait for them all.
    def all_recorded() -> dict | None:
        records = {
            r.request_id.hex: r
            for r in UsageRecord.objects.filter(deployment_name="switchy", stream=True)
        }
        return records if set(traffic.answers) <= set(records) else None

    records = wait_until(all_recorded, what="a usage record for every answer", timeout=30)
    for request_id, fingerprint in traffic.answers.items():
        record = records[request_id]
        assert record.status_code == 200
        assert fingerprint == f"aibox-{record.model_sha256[:12]}-r{record.revision}"
    assert {r.revision for r in records.values()} == {1, 2, 3}


def test_a_switch_that_cannot_load_leaves_the_old_one_serving(stack, openai_client, tmp_path):
    deployment = Deployment.objects.get(name="gemma")
    before = _active(deployment)
    repo = model_repo_create(
        actor=stack.admin, name=f"broken-{uuid.uuid4().hex[:4]}", licence="mit"
    )
    # A valid GGUF header with no usable weights: llama.cpp refuses to load it.
    broken = model_version_approve(
        actor=stack.admin,
        version=upload_version(stack.admin, repo, write_tiny_gguf(tmp_path / "broken.gguf")),
        reason="test",
    )
    answer = client_for(stack.admin).post(
        "/api/v1/deployments/gemma/switch",
        {"model_version": broken.pk, "settings": {"context_length": 256}},
        content_type="application/json",
    )
    assert answer.status_code == 202, answer.content
    number = answer.json()["number"]
    revision = deployment.revisions.get(number=number)

    def failed():
        revision.refresh_from_db()
        return revision.state == RevisionState.FAILED

    wait_until(failed, what="the broken revision failing", timeout=60)
    assert "could not load" in revision.reason
    assert _active(deployment) == before
    wait_for_state(deployment, State.READY)
    reply = openai_client.chat.completions.create(
        model="gemma", messages=[{"role": "user", "content": "Hi"}], max_tokens=4
    )
    assert reply.system_fingerprint.endswith(f"-r{before}")
    assert deployment.replica_set.filter(revision=revision).count() == 0


def test_a_switch_with_no_room_beside_offers_a_stop_then_start(stack, tmp_path):
    repo = model_repo_create(actor=stack.admin, name=f"vast-{uuid.uuid4().hex[:4]}", licence="mit")
    path = write_shaped_gguf(tmp_path / "vast.gguf", context=512, blocks=400, embedding=131_072)
    vast = model_version_approve(
        actor=stack.admin, version=upload_version(stack.admin, repo, path), reason="test"
    )
    deployment = Deployment.objects.get(name="gemma")
    revisions = deployment.revisions.count()
    answer = client_for(stack.admin).post(
        "/api/v1/deployments/gemma/switch",
        {"model_version": vast.pk, "settings": {"context_length": 512}},
        content_type="application/json",
    )
    assert answer.status_code == 400
    assert "stop-then-start" in answer.json()["detail"]
    assert "stops answering for about" in answer.json()["detail"]
    assert deployment.revisions.count() == revisions  # nothing was created


@pytest.mark.parametrize("change", [{"parallel_slots": 0}, {"kv_cache_type": "q9"}])
def test_a_bad_switch_names_the_field(stack, change):
    answer = client_for(stack.admin).post(
        "/api/v1/deployments/gemma/switch",
        {"settings": change},
        content_type="application/json",
    )
    assert answer.status_code == 400
    assert next(iter(change)) in answer.json()
