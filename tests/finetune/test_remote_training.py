"""A training worker on "another host": no database, no shared disk, its own credential.

The worker is one more Celery process on the ``training`` queue whose DATABASE_URL
reaches nothing, whose artifact root is empty, whose model cache starts empty, with its
own secret key and ``AIBOX_CONTROL_PLANE_URL`` pointing at a uvicorn of the stack
(``tests/conftest.py``, ``remote_trainer_running``). It claims the job, pulls the base
model and the dataset over HTTP, trains, and sends the adapters back; the control plane
registers them.

The session's training worker is stopped for the test, so the job can only go to the
remote one, and started again afterwards.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import httpx
import pytest

from apps.accounts.models import Role
from apps.audit.models import AuditEvent
from apps.finetune.models import FineTuneJob, JobState
from tests.conftest import RemoteTrainer, remote_trainer_running
from tests.finetune.test_jobs import launch, wait_for
from workers.artifacts import file_sha256

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def remote_trainer(control_plane, training_worker, tmp_path) -> Iterator[RemoteTrainer]:
    with remote_trainer_running(
        control_plane, training_worker, tmp_path, queues="training"
    ) as trainer:
        yield trainer


def test_a_training_worker_without_database_access_trains_and_its_adapter_lands(
    users, gemma, train_version, remote_trainer
):
    dana = users[Role.DATA_SCIENTIST]
    response = launch(dana, gemma, train_version, max_steps=2)
    assert response.status_code == 201, response.content
    job = wait_for(response.json()["id"], JobState.SUCCEEDED, JobState.FAILED)
    assert job.state == JobState.SUCCEEDED, job.reason
    assert job.worker == remote_trainer.name

    # Progress came through Redis as from any worker.
    assert [p["step"] for p in job.history if "train_loss" in p] == [1, 2]
    # The adapters are in the registry with the same provenance as a local run's.
    adapter, peft = job.adapter, job.peft_adapter
    assert adapter.source["base_sha256"] == gemma.sha256
    assert adapter.source["dataset_versions"][0]["sha256"] == train_version.sha256
    assert list(adapter.parents.all()) == [gemma]
    assert peft.metadata["adapter_config"]["r"] == 4

    # Its inputs were pulled over HTTP into its own cache, each under its sha256 and
    # with the bytes that hash to it; each pull is audited under the worker's name.
    for sha256 in (gemma.sha256, train_version.sha256):
        cached = remote_trainer.cache / sha256[:2] / sha256
        assert cached.is_file() and file_sha256(cached) == sha256
    pulls = AuditEvent.objects.filter(
        action="artifact.pulled", actor_label=f"worker:{remote_trainer.name}"
    )
    assert set(pulls.values_list("target_id", flat=True)) == {gemma.sha256, train_version.sha256}
    # A succeeded job's work directory is removed on the worker.
    assert not (remote_trainer.work / f"job-{job.pk}").exists()


def test_the_internal_training_endpoints_take_only_a_worker_credential_and_the_running_attempt(
    users, gemma, train_version, control_plane, live_worker
):
    job = FineTuneJob.objects.create(
        name="refusals",
        created_by=users[Role.DATA_SCIENTIST],
        base_model=gemma,
        dataset_version=train_version,
        output_repo="remote-refusals",
        params={"max_steps": 1},
    )
    base = f"{control_plane.url}/internal/v1/finetune/{job.pk}"
    worker = {"Authorization": f"Bearer {control_plane.token}"}
    with httpx.Client(timeout=30) as http:
        # No credential, or an API-key-shaped one: refused, whatever the route.
        assert http.post(f"{base}/claim", json={"worker": "x"}).status_code == 401
        bad = {"Authorization": "Bearer aibw_not-a-real-one"}
        assert http.get(base, headers=bad).json()["detail"] == "Unknown worker credential."

        # A queued job: the status, then a claim that hands over the order.
        assert http.get(base, headers=worker).json()["state"] == "queued"
        claim = http.post(f"{base}/claim", json={"worker": "w1@otherhost"}, headers=worker)
        assert claim.status_code == 200, claim.text
        order = claim.json()["order"]
        assert order["base_sha256"] == gemma.sha256 and order["attempt"] == 1
        assert order["train"]["sha256"] == train_version.sha256
        # Taken: a second claim (a duplicate delivery) gets 409.
        again = http.post(f"{base}/claim", json={"worker": "w2@otherhost"}, headers=worker)
        assert again.status_code == 409

        # A file whose bytes do not match its declared sha256 is refused and not kept.
        upload = f"{base}/attempts/1/files/adapter.gguf"
        wrong = http.put(
            upload, content=b"GGUF-ish", headers=worker | {"X-Content-SHA256": "0" * 64}
        )
        assert wrong.status_code == 400 and "send it again" in wrong.json()["detail"]
        # Only the two adapter files are taken, and only for the running attempt.
        body = b"not an adapter"
        digest = {"X-Content-SHA256": hashlib.sha256(body).hexdigest()}
        assert (
            http.put(
                f"{base}/attempts/1/files/evil.sh", content=body, headers=worker | digest
            ).status_code
            == 404
        )
        stale = http.put(
            f"{base}/attempts/2/files/adapter.gguf", content=body, headers=worker | digest
        )
        assert stale.status_code == 409 and "no longer running" in stale.json()["detail"]

        # Succeeded without its files: refused, the job still runs.
        finish = f"{base}/attempts/1/finish"
        early = http.post(
            finish, json={"state": "succeeded", "files": {}, "peft_config": {}}, headers=worker
        )
        assert early.status_code == 400 and "Upload adapter.gguf" in early.json()["detail"]
        # A failure is recorded with the worker's reason; the attempt is then over.
        failed = http.post(
            finish, json={"state": "failed", "reason": "out of disk"}, headers=worker
        )
        assert failed.json() == {"state": "failed", "reason": "out of disk"}
        assert http.post(finish, json={"state": "failed"}, headers=worker).status_code == 409
        # Its dataset is no longer pulled by anyone: nothing waits or runs on it.
        pull = http.get(
            f"{control_plane.url}/internal/v1/artifacts/{train_version.sha256}", headers=worker
        )
        assert pull.status_code == 404
    job.refresh_from_db()
    assert job.state == JobState.FAILED and job.reason == "out of disk"
