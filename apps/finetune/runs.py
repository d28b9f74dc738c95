"""A fine-tune as its training worker runs it: claim the job, relay its progress from
Redis into the row, fail it when its worker goes silent, and finish it, registering the
adapter (and merged model) in the registry with its full provenance.

The training itself runs in ``workers.finetune`` (no Django); ``apps/finetune/tasks.py``
is the bridge. Requests, cancels and retries are ``services``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import transaction
from django.db.models import F
from django.utils import timezone

from apps.accounts.services import system_user
from apps.audit.models import Outcome
from apps.audit.services import audit_record
from apps.datasets.models import DatasetVersion
from apps.finetune import progress
from apps.finetune.models import FineTuneJob, JobState
from apps.finetune.services import licence_of
from apps.registry.artifacts import artifact_store
from apps.registry.models import ModelRepo, ModelVersion, SourceKind
from apps.registry.services import model_repo_create, model_version_ingest
from workers.artifacts import Staged
from workers.finetune.order import DataRef, TrainingOrder

log = logging.getLogger(__name__)

LOG_LINES_KEPT = 500
HISTORY_POINTS_KEPT = 5000


def finetune_job_claim(*, job_id: int, worker: str) -> FineTuneJob | None:
    """A training worker takes a queued job; a duplicate delivery gets None.

    Its first heartbeat goes out before the claim, so no job is ever running without one
    (a claim that loses leaves that key to expire, or to the worker that won)."""
    progress.beat(job_id, worker, settings.FINETUNE_HEARTBEAT_TTL)
    claimed = FineTuneJob.objects.filter(
        pk=job_id, state=JobState.QUEUED, cancel_requested=False
    ).update(
        state=JobState.RUNNING,
        worker=worker,
        started_at=timezone.now(),
        attempts=F("attempts") + 1,
    )
    return FineTuneJob.objects.get(pk=job_id) if claimed else None


@transaction.atomic
def finetune_progress_apply(*, job_id: int) -> None:
    """Apply the job's new stream entries, once each and in order (under its row lock)."""
    job = FineTuneJob.objects.select_for_update().filter(pk=job_id).first()
    if job is None:
        return
    entries = progress.read_after(job_id, job.stream_pos)
    if not entries:
        return
    for entry_id, event in entries:
        _apply_event(job, event)
        job.stream_pos = entry_id
    job.history = job.history[-HISTORY_POINTS_KEPT:]
    job.logs = job.logs[-LOG_LINES_KEPT:]
    job.save()
    progress.trim(job_id, job.stream_pos)


def _apply_event(job: FineTuneJob, event: dict[str, Any]) -> None:
    kind = event.get("event")
    if kind == "progress":
        for name in ("step", "max_steps", "epoch", "train_loss", "learning_rate", "tokens_per_s"):
            if event.get(name) is not None:
                setattr(job, name, event[name])
        job.eta_s = event.get("eta_s")
        job.history.append({"step": event.get("step"), "train_loss": event.get("train_loss")})
    elif kind == "eval":
        job.validation_loss = event.get("validation_loss")
        job.history.append(
            {"step": event.get("step"), "validation_loss": event.get("validation_loss")}
        )
    elif kind == "checkpoint":
        job.last_checkpoint_step = event.get("step")
        job.logs.append({"at": event.get("at"), "message": f"Checkpoint at step {event['step']}."})
    elif kind == "log":
        job.logs.append({"at": event.get("at"), "message": str(event.get("message", ""))[:2000]})


def _when(unix_time: float) -> str:
    return timezone.localtime(datetime.fromtimestamp(unix_time, tz=UTC)).strftime(
        "%Y-%m-%d %H:%M:%S %Z"
    )


def finetune_job_fail_if_silent(*, job_id: int) -> FineTuneJob | None:
    """Mark a running job failed when its worker's heartbeat has expired.

    The worker died (killed, out of memory, its machine gone) or lost Redis for longer
    than the heartbeat's time to live. What it reported before is applied first, its
    checkpoints stay on the worker's disk, and a retry resumes from the last one.
    A job whose heartbeat Redis lost with its data (restarted empty) is given one time
    to live from the first reap that notices, for its worker to beat again; a cancel
    asked for, lost with the same data, is asked for again.
    Returns the failed job, or None when the job is alive or not running.
    """
    job = FineTuneJob.objects.filter(pk=job_id, state=JobState.RUNNING).first()
    if job is None:
        return None
    if not progress.silent(job_id):
        lost = progress.heartbeat_lost(job_id, ttl=settings.FINETUNE_HEARTBEAT_TTL)
        if lost and job.cancel_requested:
            progress.request_cancel(job_id)
        return None
    finetune_progress_apply(job_id=job_id)
    with transaction.atomic():
        job = (
            FineTuneJob.objects.select_for_update()
            .filter(pk=job_id, state=JobState.RUNNING)
            .first()
        )
        if job is None or not progress.silent(job_id):
            return None
        seen = progress.last_seen(job_id) or {}
        worker = seen.get("worker") or job.worker or "an unknown worker"
        if "lost_at" in seen:
            silence = (
                f"not heard from since Redis lost its data, {_when(seen['lost_at'])}; on {worker}"
            )
        else:
            seen_at = seen.get("at") or (job.started_at or job.created_at).timestamp()
            silence = f"last seen {_when(seen_at)} on {worker}"
        resume = (
            f"Retry resumes from the checkpoint at step {job.last_checkpoint_step}."
            if job.last_checkpoint_step
            else "It wrote no checkpoint; a retry starts from the beginning."
        )
        job.state, job.finished_at = JobState.FAILED, timezone.now()
        job.reason = (
            f"The training worker stopped responding ({silence}, at step {job.step}). {resume}"
        )
        job.save(update_fields=["state", "finished_at", "reason"])
        audit_record(
            actor=system_user(),
            action="finetune.failed",
            target=job,
            outcome=Outcome.FAILURE,
            details={
                "reason": job.reason,
                "worker": worker,
                "last_seen": seen.get("at") or seen.get("lost_at"),
                "step": job.step,
                "last_checkpoint_step": job.last_checkpoint_step,
            },
        )
    progress.drop(job_id)
    return job


def finetune_jobs_reap() -> list[int]:
    """Fail every running job whose worker went silent (Celery beat runs this)."""
    running = FineTuneJob.objects.filter(state=JobState.RUNNING).values_list("pk", flat=True)
    return [pk for pk in list(running) if finetune_job_fail_if_silent(job_id=pk) is not None]


def finetune_job_finish(
    *,
    job_id: int,
    state: JobState,
    reason: str = "",
    result: dict[str, Any] | None = None,
    outputs: AdapterFiles | None = None,
    attempt: int | None = None,
) -> FineTuneJob:
    """Record how a job ended; on success register both adapters with provenance.

    The adapters are new registry versions whose parents are the base model, and whose
    source names the job, the base and dataset sha256s, every parameter, the seed, the
    library versions, the hardware, the duration and the final metrics.

    ``attempt`` fences off a worker that was given up for dead: once its job was marked
    failed (and perhaps retried elsewhere), what it reports at the end changes nothing.
    """
    if (
        attempt is not None
        and not FineTuneJob.objects.filter(
            pk=job_id, state=JobState.RUNNING, attempts=attempt
        ).exists()
    ):
        log.warning("fine-tune %s attempt %s ended after it was given up", job_id, attempt)
        return FineTuneJob.objects.get(pk=job_id)
    finetune_progress_apply(job_id=job_id)
    job = FineTuneJob.objects.select_related(
        "base_model__repo", "dataset_version__dataset", "validation_version__dataset", "created_by"
    ).get(pk=job_id)
    result = result or {}
    adapter = peft = None
    if state == JobState.SUCCEEDED:
        try:
            adapter, peft = _register_outputs(job, result, outputs)
        except (ValidationError, OSError) as exc:
            state = JobState.FAILED
            reason = "Training finished but its adapter could not be registered: " + (
                " ".join(exc.messages) if isinstance(exc, ValidationError) else str(exc)
            )
    with transaction.atomic():
        job = FineTuneJob.objects.select_for_update().get(pk=job_id)
        job.state, job.reason, job.finished_at = state, reason, timezone.now()
        job.result = result
        job.adapter, job.peft_adapter = adapter, peft
        if state == JobState.SUCCEEDED:
            job.step = result.get("steps", job.step)
        job.save()
        audit_record(
            actor=system_user(),
            action=f"finetune.{state}",
            target=job,
            outcome=Outcome.SUCCESS if state == JobState.SUCCEEDED else Outcome.FAILURE,
            details={
                "reason": reason,
                "steps": result.get("steps"),
                "final_train_loss": result.get("final_train_loss"),
                "final_validation_loss": result.get("final_validation_loss"),
                "adapter": adapter.pk if adapter else None,
                "adapter_sha256": adapter.sha256 if adapter else None,
                "peft_adapter": peft.pk if peft else None,
            },
        )
    progress.drop(job_id)
    return job


def provenance(job: FineTuneJob, result: dict[str, Any]) -> dict[str, Any]:
    datasets = [job.dataset_version] + ([job.validation_version] if job.validation_version else [])
    return {
        "finetune_job": job.pk,
        "base_model_version": job.base_model.pk,
        "base_sha256": job.base_model.sha256,
        "dataset_versions": [
            {"id": d.pk, "dataset": d.dataset.name, "number": d.number, "sha256": d.sha256}
            for d in datasets
        ],
        "params": job.params,
        "seed": job.params.get("seed"),
        "chat_template": job.chat_template or "(the model's own, else the default)",
        "library_versions": result.get("library_versions", {}),
        "hardware": result.get("hardware", {}),
        "duration_s": result.get("duration_s"),
        "steps": result.get("steps"),
        "final_train_loss": result.get("final_train_loss"),
        "final_validation_loss": result.get("final_validation_loss"),
        "licences": {"base": job.base_model.repo.licence}
        | {d.dataset.name: d.dataset.licence for d in datasets},
    }


@dataclass(frozen=True)
class AdapterFiles:
    """A run's outputs as the control plane receives them: the llama.cpp LoRA adapter,
    the PEFT weights and their config. ``staged``: the files sit in the artifact store's
    staging folder (uploaded by a worker on another host) and are moved in, not copied."""

    gguf: Path
    safetensors: Path
    peft_config: dict[str, Any]
    staged: bool = False

    @classmethod
    def from_peft_dir(cls, peft_dir: Path, gguf_path: Path) -> AdapterFiles:
        config = json.loads((peft_dir / "adapter_config.json").read_text())
        return cls(gguf_path, peft_dir / "adapter_model.safetensors", config)

    def stage(self, path: Path) -> Staged:
        store = artifact_store()
        if self.staged:
            return store.stage_in_place(path)
        return store.stage_copy(path, max_bytes=settings.UPLOAD_MAX_BYTES)


def _register_outputs(
    job: FineTuneJob, result: dict[str, Any], outputs: AdapterFiles | None
) -> tuple[ModelVersion, ModelVersion]:
    if outputs is None:
        raise ValidationError("The run produced no adapter files.")
    datasets = [job.dataset_version] + ([job.validation_version] if job.validation_version else [])
    actor = job.created_by or system_user()
    repo = ModelRepo.objects.filter(name=job.output_repo).first()
    if repo is None:
        repo = model_repo_create(
            actor=actor,
            name=job.output_repo,
            licence=licence_of(job.base_model, datasets),
            description=f"LoRA adapters of {job.base_model} trained on {job.dataset_version}.",
            tags=["lora", "fine-tune", job.base_model.architecture],
        )
    source = provenance(job, result)
    gguf = model_version_ingest(
        actor=actor,
        repo=repo,
        staged=outputs.stage(outputs.gguf),
        file_name=f"{job.output_repo}-job{job.pk}.gguf",
        source_kind=SourceKind.FINE_TUNE,
        source=source,
        parents=[job.base_model],
    ).version
    peft = model_version_ingest(
        actor=actor,
        repo=repo,
        staged=outputs.stage(outputs.safetensors),
        file_name=f"{job.output_repo}-job{job.pk}.safetensors",
        source_kind=SourceKind.FINE_TUNE,
        source=source | {"gguf_adapter_sha256": gguf.sha256},
        parents=[job.base_model],
        peft_config=outputs.peft_config,
    ).version
    return gguf, peft


def dataset_ref(version: DatasetVersion) -> DataRef:
    """How a worker reads a dataset version, as plain values (``workers.finetune.order``)."""
    return DataRef(
        sha256=version.sha256,
        format=version.format,
        label=str(version),
        declared_shape=version.declared_shape or None,
        column_mapping=dict(version.column_mapping),
    )


def training_order(job: FineTuneJob) -> TrainingOrder:
    """What a training worker needs for a claimed job, as plain values: inputs by
    sha256, how to read the data, the parameters (``workers.finetune.order``)."""
    return TrainingOrder(
        job_id=job.pk,
        attempt=job.attempts,
        base_sha256=job.base_model.sha256,
        base_label=str(job.base_model),
        train=dataset_ref(job.dataset_version),
        validation=dataset_ref(job.validation_version) if job.validation_version else None,
        shape=job.dataset_version.shape,
        chat_template=job.chat_template or None,
        params=dict(job.params),
    )
