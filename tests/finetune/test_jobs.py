"""Fine-tunes end to end: launched through the API, trained by a real training worker on
Gemma 3 270M, progress persisted, adapters registered with their provenance."""

from __future__ import annotations

from pathlib import Path

import pytest
from django.core.exceptions import ValidationError

from apps.accounts.models import Role
from apps.audit.models import AuditEvent
from apps.deployments.models import Replica
from apps.finetune.models import FineTuneJob, JobState
from apps.finetune.tasks import finetune_reap
from apps.registry.models import Format
from tests.conftest import client_for
from tests.live import wait_until

pytestmark = pytest.mark.django_db(transaction=True)

TINY = {
    "lora_rank": 4,
    "lora_alpha": 8,
    "max_seq_length": 64,
    "learning_rate": 1e-3,
    "checkpoint_every": 1,
}


def launch(user, gemma, version, **params):
    return client_for(user).post(
        "/api/v1/finetunes/",
        {"base_model": gemma.pk, "dataset_version": version.pk, "params": TINY | params},
        content_type="application/json",
    )


def wait_for(job_id: int, *states: str, timeout: float = 900) -> FineTuneJob:
    def reached():
        job = FineTuneJob.objects.get(pk=job_id)
        return job if job.state in states else None

    return wait_until(reached, what=f"fine-tune {job_id} reaching {states}", timeout=timeout)


def test_a_fine_tune_trains_and_registers_its_adapters(
    users, gemma, train_version, training_worker
):
    dana = users[Role.DATA_SCIENTIST]
    response = launch(dana, gemma, train_version, max_steps=3)
    assert response.status_code == 201, response.content
    job = wait_for(response.json()["id"], JobState.SUCCEEDED, JobState.FAILED)
    assert job.state == JobState.SUCCEEDED, job.reason
    assert job.worker == training_worker.name

    # Progress went through Redis and is in PostgreSQL: every step, with its loss.
    steps = [p["step"] for p in job.history if "train_loss" in p]
    assert steps == [1, 2, 3]
    assert all(p["train_loss"] > 0 for p in job.history if "train_loss" in p)
    assert job.step == job.max_steps == 3 and job.last_checkpoint_step == 3
    assert any("step" in line["message"].lower() for line in job.logs)

    adapter, peft = job.adapter, job.peft_adapter
    assert adapter.format == Format.GGUF_LORA and adapter.architecture == "gemma3"
    assert peft.format == Format.PEFT_SAFETENSORS
    assert peft.metadata["adapter_config"]["r"] == 4
    assert list(adapter.parents.all()) == [gemma]
    assert adapter.repo.licence == "gemma AND cc-by-4.0"
    source = adapter.source
    assert source["base_sha256"] == gemma.sha256
    assert source["dataset_versions"][0]["sha256"] == train_version.sha256
    assert source["params"]["lora_rank"] == 4 and source["seed"] == 42
    assert {"torch", "transformers", "peft"} <= set(source["library_versions"])
    assert source["hardware"] and source["duration_s"] is not None

    body = client_for(dana).get(f"/api/v1/finetunes/{job.pk}/").json()
    assert body["state"] == "succeeded" and body["adapter"] == adapter.pk
    actions = set(AuditEvent.objects.values_list("action", flat=True))
    assert {"finetune.create", "finetune.succeeded", "model_version.create"} <= actions

    page = client_for(dana).get(f"/finetunes/{job.pk}/")
    assert b"job-progress" in page.content and b"polyline" in page.content


def test_cancel_keeps_the_checkpoint_and_retry_resumes(
    users, gemma, train_version, training_worker
):
    dana = users[Role.DATA_SCIENTIST]
    first = launch(dana, gemma, train_version, max_steps=8).json()["id"]
    second = launch(dana, gemma, train_version, max_steps=2).json()["id"]
    # One job at a time on the training worker: the second waits its turn, visibly.
    wait_until(
        lambda: FineTuneJob.objects.filter(pk=first, step__gte=2).exists(),
        what="the first job training",
        timeout=900,
    )
    waiting = client_for(dana).get(f"/api/v1/finetunes/{second}/").json()
    assert waiting["state"] == "queued" and waiting["queue_position"] == 1

    cancel = client_for(dana).post(f"/api/v1/finetunes/{first}/cancel")
    assert cancel.status_code == 200
    job = wait_for(first, JobState.CANCELLED, JobState.FAILED, timeout=120)
    assert job.state == JobState.CANCELLED, job.reason
    assert job.last_checkpoint_step and job.last_checkpoint_step < 8
    stopped_at = job.last_checkpoint_step

    assert wait_for(second, JobState.SUCCEEDED, JobState.FAILED).state == JobState.SUCCEEDED

    retry = client_for(dana).post(f"/api/v1/finetunes/{first}/retry")
    assert retry.status_code == 200 and retry.json()["state"] == "queued"
    job = wait_for(first, JobState.SUCCEEDED, JobState.FAILED)
    assert job.state == JobState.SUCCEEDED, job.reason
    # It went on from a checkpoint of the first attempt (at least the one last reported
    # before the cancel; the runner may have saved one more before it saw the flag).
    assert job.result["resumed_from_step"] is not None, job.logs
    assert stopped_at <= job.result["resumed_from_step"] < 8, job.logs
    assert job.step == 8 and job.attempts == 2


def test_a_killed_worker_fails_the_job_with_a_reason_and_retry_resumes(
    users, gemma, train_version, training_worker
):
    dana = users[Role.DATA_SCIENTIST]
    job_id = launch(dana, gemma, train_version, max_steps=6).json()["id"]
    wait_until(
        lambda: FineTuneJob.objects.filter(pk=job_id, last_checkpoint_step__gte=2).exists(),
        what="the job checkpointing step 2",
        timeout=900,
    )
    killed = training_worker.name
    training_worker.kill()

    # Nobody tells the control plane: the heartbeat expires, the job page says so, and
    # beat's next reap fails the job (reading it changes nothing).
    wait_until(
        lambda: "stopped responding" in client_for(dana).get(f"/finetunes/{job_id}/").text,
        what="the job page saying its worker stopped responding",
        timeout=120,
    )
    assert FineTuneJob.objects.get(pk=job_id).state == JobState.RUNNING
    finetune_reap.delay()  # what beat sends every 30 s

    def failed():
        body = client_for(dana).get(f"/api/v1/finetunes/{job_id}/").json()
        return body if body["state"] != "running" else None

    body = wait_until(failed, what="the job leaving running", timeout=120)
    assert body["state"] == "failed"
    assert body["reason"].startswith("The training worker stopped responding (last seen ")
    assert f"on {killed}, at step {body['step']})" in body["reason"]
    checkpoint = body["last_checkpoint_step"]
    assert checkpoint >= 2
    assert f"Retry resumes from the checkpoint at step {checkpoint}." in body["reason"]
    event = AuditEvent.objects.filter(action="finetune.failed").get()
    assert event.details["worker"] == killed and event.outcome == "failure"

    training_worker.start()
    retry = client_for(dana).post(f"/api/v1/finetunes/{job_id}/retry")
    assert retry.status_code == 200, retry.content
    job = wait_for(job_id, JobState.SUCCEEDED, JobState.FAILED)
    assert job.state == JobState.SUCCEEDED, job.reason
    assert job.worker == training_worker.name and job.attempts == 2
    assert checkpoint <= job.result["resumed_from_step"] < 6, job.logs
    assert job.step == 6 and job.adapter is not None


def test_beat_fails_running_jobs_whose_worker_went_silent(users, gemma, train_version, live_worker):
    from django.conf import settings
    from django.utils import timezone

    from apps.finetune import progress

    def running(worker: str) -> FineTuneJob:
        # As a training worker leaves a job it claimed and trained three steps of.
        return FineTuneJob.objects.create(
            name="secrets",
            base_model=gemma,
            dataset_version=train_version,
            output_repo="secrets-lora",
            created_by=users[Role.DATA_SCIENTIST],
            state=JobState.RUNNING,
            worker=worker,
            attempts=1,
            started_at=timezone.now(),
            step=3,
            last_checkpoint_step=2,
        )

    silent, beating = running("train-gone@host"), running("train-here@host")
    progress.beat(silent.pk, "train-gone@host", ttl=0.5)
    progress.beat(beating.pk, "train-here@host", ttl=120)
    try:
        wait_until(lambda: not progress.alive(silent.pk), what="the heartbeat expiring")
        # Reading the job says its worker went silent, and changes nothing: beat does that.
        dana = client_for(users[Role.DATA_SCIENTIST])
        page = dana.get(f"/finetunes/{silent.pk}/").content.decode()
        assert "The training worker has stopped responding" in page
        assert dana.get(f"/api/v1/finetunes/{silent.pk}/").json()["state"] == "running"
        assert FineTuneJob.objects.get(pk=silent.pk).state == JobState.RUNNING
        finetune_reap.delay()  # what beat sends
        silent = wait_for(silent.pk, JobState.FAILED, timeout=60)
        assert "stopped responding (last seen " in silent.reason
        assert silent.reason.endswith(
            "on train-gone@host, at step 3). Retry resumes from the checkpoint at step 2."
        )
        beating.refresh_from_db()
        assert beating.state == JobState.RUNNING and beating.reason == ""

        # A worker given up for dead that reports after all changes nothing.
        from apps.finetune.runs import finetune_job_finish

        finetune_job_finish(job_id=silent.pk, attempt=1, state=JobState.CANCELLED, reason="late")
        late = FineTuneJob.objects.get(pk=silent.pk)
        assert late.state == JobState.FAILED and late.reason == silent.reason
    finally:
        progress.drop(beating.pk)
    assert any(entry["task"] == "finetune.reap" for entry in settings.CELERY_BEAT_SCHEDULE.values())


def test_bad_parameters_and_unusable_data_are_refused_before_queueing(users, gemma, train_version):
    dana = users[Role.DATA_SCIENTIST]
    response = launch(dana, gemma, train_version, target_modules=["q_proj", "wq"])
    assert response.status_code == 400
    assert "Unknown target module" in response.json()["detail"]
    assert "wq" in response.json()["detail"]

    response = launch(dana, gemma, train_version, max_seq_length=10**6)
    assert response.status_code == 400 and "context" in response.json()["detail"]

    response = launch(dana, gemma, train_version, learning_rate=2)
    assert response.status_code == 400 and "Learning rate" in response.json()["detail"]
    assert not FineTuneJob.objects.exists()

    other = client_for(users[Role.APP_DEVELOPER]).post(
        "/api/v1/finetunes/",
        {"base_model": gemma.pk, "dataset_version": train_version.pk},
        content_type="application/json",
    )
    assert other.status_code == 403


def test_a_trained_adapter_deploys_only_when_approved_and_on_its_base(
    users, gemma, train_version, training_worker
):
    from apps.deployments.placement import replica_spec
    from apps.deployments.services import deployment_create
    from apps.registry.services import model_version_approve

    dana, ada = users[Role.DATA_SCIENTIST], users[Role.ADMIN]
    job = wait_for(launch(dana, gemma, train_version, max_steps=1).json()["id"], "succeeded")
    adapter = job.adapter
    with pytest.raises(ValidationError, match="only approved adapters"):
        deployment_create(actor=ada, name="secret-bot", model_version=gemma, adapter=adapter)
    with pytest.raises(ValidationError, match="not a GGUF LoRA adapter"):
        deployment_create(
            actor=ada, name="secret-bot", model_version=gemma, adapter=job.peft_adapter
        )
    model_version_approve(actor=users[Role.COMPLIANCE_OFFICER], version=adapter, reason="Tested.")
    deployment = deployment_create(
        actor=ada, name="secret-bot", model_version=gemma, adapter=adapter, adapter_scale=0.5
    )
    # What a worker is told to load: the adapter too, fetched and verified like the model.
    spec = replica_spec(Replica(deployment=deployment, index=0, worker="w@host", generation=1))
    assert spec.adapter_sha256 == adapter.sha256 and spec.adapter_scale == 0.5
    assert Path(spec.adapter_source_path).name == adapter.sha256


def test_redis_never_redelivers_a_fine_tune_that_is_still_running():
    """Redis hands an unacknowledged task to another worker after the visibility timeout;
    a training run may take its whole time limit, so the timeout must outlast it."""
    from django.conf import settings

    from apps.finetune.tasks import finetune_run

    visibility = settings.CELERY_BROKER_TRANSPORT_OPTIONS["visibility_timeout"]
    assert visibility > finetune_run.time_limit
