"""Optimisation jobs as the control plane keeps them: a worker claims a job and gets its
order (inputs by sha256, plain parameters; ``workers.optimise.order``), reports progress
and a heartbeat, and ends it. A quantise or export job adds a draft version to the
registry with its provenance; an evaluation stores its figures; every outcome is
audited. Beat fails jobs whose worker went silent.

The worker is the running one's alone: a report or an end is taken only while the job
runs, on the worker that claimed it (the fence), so a job reaped and requested again is
not ended by the silent worker that comes back. A worker with the database calls these
functions in process; one on another host calls them through the internal endpoints
(``apps/deployments/internal_optimise.py``). The job itself runs in ``tasks``.

The requests that create these jobs are checked in ``services``.
"""

from __future__ import annotations

import dataclasses
import logging
from datetime import timedelta
from pathlib import Path
from typing import Any

from django.core.exceptions import ValidationError
from django.db import transaction
from django.utils import timezone

from apps.accounts.services import system_user
from apps.audit.models import Outcome
from apps.audit.services import audit_record
from apps.finetune.runs import dataset_ref
from apps.optimise.models import (
    Evaluation,
    Job,
    JobState,
    ModelJob,
    Operation,
)
from apps.registry.artifacts import artifact_store
from apps.registry.models import ModelRepo, ModelVersion, SourceKind
from apps.registry.services import (
    model_repo_create,
    model_version_ingest,
    model_version_verify,
)
from workers.artifacts import ArtifactError
from workers.control_plane import ControlPlaneError
from workers.datasets import DatasetError
from workers.optimise.order import FIGURES, EvaluationOrder, ModelJobOrder

log = logging.getLogger(__name__)

# A running job touches its heartbeat this often; beat fails one silent for SILENT_AFTER.
HEARTBEAT_SECONDS = 15
SILENT_AFTER = timedelta(minutes=3)
REASON_MAX_CHARS = 4000


def _claim(model: type[Job], pk: int, worker: str) -> bool:
    now = timezone.now()
    return bool(
        model.objects.filter(pk=pk, state=JobState.QUEUED).update(
            state=JobState.RUNNING, worker=worker, started_at=now, heartbeat_at=now
        )
    )


def _running(model: type[Job], pk: int, worker: str):
    """The job, while it runs on ``worker``: what the fence lets through."""
    return model.objects.filter(pk=pk, state=JobState.RUNNING, worker=worker)


def model_job_claim(*, job_id: int, worker: str) -> ModelJobOrder | None:
    """Take a queued quantise or export job for ``worker``; its order, or None when
    another delivery has it or it was given up."""
    if not _claim(ModelJob, job_id, worker):
        return None
    job = ModelJob.objects.select_related("source", "imatrix_dataset__dataset").get(pk=job_id)
    return ModelJobOrder(
        job_id=job.pk,
        operation=job.operation,
        source_sha256=job.source.sha256,
        source_label=str(job.source),
        source_quantization=job.source.quantization,
        source_parameter_count=job.source.parameter_count or 0,
        params=dict(job.params),
        adapter_sha256=job.adapter.sha256 if job.adapter_id else None,
        imatrix=dataset_ref(job.imatrix_dataset) if job.imatrix_dataset_id else None,
    )


def evaluation_claim(*, evaluation_id: int, worker: str) -> EvaluationOrder | None:
    """Take a queued evaluation for ``worker``; its order, or None as for a job."""
    if not _claim(Evaluation, evaluation_id, worker):
        return None
    evaluation = Evaluation.objects.select_related(
        "model_version", "adapter", "reference", "dataset_version__dataset"
    ).get(pk=evaluation_id)
    dataset = evaluation.dataset_version
    return EvaluationOrder(
        job_id=evaluation.pk,
        model_sha256=evaluation.model_version.sha256,
        model_label=str(evaluation.model_version),
        architecture=evaluation.model_version.architecture,
        # The sha256 copied at request time: the fetch checks the bytes against it, so
        # the figures hold for exactly the content the evaluation asked for.
        dataset=dataclasses.replace(dataset_ref(dataset), sha256=evaluation.dataset_sha256),
        shape=dataset.shape,
        params=dict(evaluation.params),
        adapter_sha256=evaluation.adapter.sha256 if evaluation.adapter_id else None,
        reference_sha256=evaluation.reference.sha256 if evaluation.reference_id else None,
    )


def input_verified(sha256: str) -> Path:
    """A job's input in the shared store, re-hashed where it is (never copied). A model
    file that changed on disk is refused and recorded against its version, as before it
    is served."""
    version = ModelVersion.objects.filter(artifact_id=sha256).first()
    if version is not None:
        return model_version_verify(actor=system_user(), version=version)
    return artifact_store().verify(sha256)


def job_report(
    *,
    model: type[Job],
    pk: int,
    worker: str,
    percent: int | None = None,
    message: str = "",
) -> bool:
    """Touch the running job's heartbeat, with its progress when given; False when it no
    longer runs on ``worker`` (reaped, or ended)."""
    fields: dict[str, Any] = {"heartbeat_at": timezone.now()}
    if percent is not None:
        fields |= {"progress": max(0, min(100, percent)), "progress_message": message[:300]}
    return bool(_running(model, pk, worker).update(**fields))


def _finish(
    job: Job, *, worker: str, state: JobState, reason: str = "", action: str, details: dict
) -> None:
    updated = _running(type(job), job.pk, worker).update(
        state=state,
        reason=reason,
        finished_at=timezone.now(),
        progress=100 if state == JobState.SUCCEEDED else job.progress,
    )
    if not updated:  # reaped while it ran: what it reports now changes nothing
        log.warning("%s ended after it was given up", job)
        return
    audit_record(
        actor=system_user(),
        action=action,
        target=job,
        outcome=Outcome.SUCCESS if state == JobState.SUCCEEDED else Outcome.FAILURE,
        details={"reason": reason, **details},
    )


def failure_reason(exc: BaseException) -> str:
    """What a job's failure says to the user: the worker's own message for the errors it
    explains, a pointer to the worker log for any other."""
    if isinstance(exc, ValidationError):
        return " ".join(exc.messages)
    if isinstance(exc, ArtifactError | DatasetError | ControlPlaneError):
        return str(exc)
    # By name: the control plane never imports the llama.cpp and torch behind these.
    known = ("QuantizeError", "MergeError", "EvaluationError", "ImatrixError", "DataError")
    if type(exc).__name__ in known:
        return str(exc)
    return f"The job failed unexpectedly ({type(exc).__name__}: {exc}); see the worker log."


def model_job_finish(
    *,
    job_id: int,
    worker: str,
    reason: str = "",
    result: dict[str, Any] | None = None,
    output: Path | None = None,
) -> ModelJob:
    """End a quantise or export job that runs on ``worker``: failed with ``reason``, or
    succeeded with ``output`` (the new GGUF file, moved into the store) registered as a
    draft version with its provenance. A registration that fails fails the job."""
    job = ModelJob.objects.select_related(
        "source__repo", "adapter__repo", "finetune_job", "imatrix_dataset__dataset"
    ).get(pk=job_id)
    action = f"optimise.{job.operation}"
    if not _running(ModelJob, job_id, worker).exists():
        log.warning("%s ended after it was given up", job)
        return job
    if output is None:
        reason = reason or "The worker sent no file."
    if not reason and output is not None:
        result = result or {}
        try:
            version = _register(job, output, result)
        except Exception as exc:
            log.exception("%s: registering its file failed", job)
            reason = failure_reason(exc)
        else:
            with transaction.atomic():
                ModelJob.objects.filter(pk=job_id).update(output_version=version, result=result)
                _finish(
                    job,
                    worker=worker,
                    state=JobState.SUCCEEDED,
                    action=f"{action}.succeeded",
                    details={"output_version": version.pk, "sha256": version.sha256, **result},
                )
            return ModelJob.objects.get(pk=job_id)
    _finish(
        job,
        worker=worker,
        state=JobState.FAILED,
        reason=reason[:REASON_MAX_CHARS],
        action=f"{action}.failed",
        details={},
    )
    return ModelJob.objects.get(pk=job_id)


def evaluation_finish(
    *,
    evaluation_id: int,
    worker: str,
    reason: str = "",
    figures: dict[str, float | None] | None = None,
    result: dict[str, Any] | None = None,
) -> Evaluation:
    """End an evaluation that runs on ``worker``: failed with ``reason``, or succeeded
    with its figures (``FIGURES`` only) and the rest of its result."""
    evaluation = Evaluation.objects.get(pk=evaluation_id)
    if reason:
        _finish(
            evaluation,
            worker=worker,
            state=JobState.FAILED,
            reason=reason[:REASON_MAX_CHARS],
            action="optimise.evaluation.failed",
            details={},
        )
        return Evaluation.objects.get(pk=evaluation_id)
    figures = {name: value for name, value in (figures or {}).items() if name in FIGURES}
    with transaction.atomic():
        if _running(Evaluation, evaluation_id, worker).update(result=result or {}, **figures):
            _finish(
                evaluation,
                worker=worker,
                state=JobState.SUCCEEDED,
                action="optimise.evaluation.succeeded",
                details={"dataset_sha256": evaluation.dataset_sha256, **figures},
            )
        else:
            log.warning("%s ended after it was given up", evaluation)
    return Evaluation.objects.get(pk=evaluation_id)


def _register(job: ModelJob, output: Path, result: dict[str, Any]) -> ModelVersion:
    actor = job.created_by or system_user()
    repo = ModelRepo.objects.filter(name=job.output_repo).first()
    source = job.adapter or job.source
    if repo is None:
        repo = model_repo_create(
            actor=actor,
            name=job.output_repo,
            licence=source.repo.licence,
            description=f"Made by AIBox from {job.source}"
            + (f" with {job.adapter} merged in." if job.adapter else "."),
            tags=[job.source.architecture, str(job.operation)],
        )
    provenance = provenance_of(job, result)
    staged_path = artifact_store().tmp / f"optimise-out-{job.pk}.gguf"
    output.rename(staged_path)
    staged = artifact_store().stage_in_place(staged_path)
    label = (
        job.params["quant_type"].lower()
        if job.operation == Operation.QUANTIZE
        else ("merged-" if job.adapter else "") + job.params["out_type"]
    )
    stem = Path(job.source.file_name).stem
    return model_version_ingest(
        actor=actor,
        repo=repo,
        staged=staged,
        file_name=f"{stem}-{label}.gguf"[:255],
        source_kind=SourceKind.QUANTIZED
        if job.operation == Operation.QUANTIZE
        else SourceKind.EXPORTED,
        source=provenance,
        parents=[v for v in (job.source, job.adapter) if v is not None],
    ).version


def provenance_of(job: ModelJob, result: dict[str, Any]) -> dict[str, Any]:
    """What a new version records about how it was made."""
    data: dict[str, Any] = {
        "optimise_job": job.pk,
        "operation": job.operation,
        "source_version": job.source.pk,
        "source_sha256": job.source.sha256,
        "source_quantization": job.source.quantization,
        "params": job.params,
        "llama_cpp": result.get("llama_cpp", {}).get("llama_cpp_python"),
        "seconds": result.get("seconds"),
    }
    if job.operation == Operation.QUANTIZE:
        data["requantized"] = bool(result.get("requantized"))
    if job.imatrix_dataset is not None:
        d = job.imatrix_dataset
        data["imatrix"] = {
            "dataset_version": d.pk,
            "dataset": d.dataset.name,
            "number": d.number,
            "sha256": d.sha256,
            **result.get("imatrix", {}),
        }
    if job.adapter is not None:
        data["adapter_version"] = job.adapter.pk
        data["adapter_sha256"] = job.adapter.sha256
    ft = job.finetune_job
    if ft is not None:
        data["finetune_job"] = ft.pk
        # Not "dataset_versions": the adapter's own fine-tune already links those.
        data["trained_on"] = [
            {"id": d.pk, "dataset": d.dataset.name, "number": d.number, "sha256": d.sha256}
            for d in (ft.dataset_version, ft.validation_version)
            if d is not None
        ]
    return data


def jobs_reap() -> list[str]:
    """Fail running jobs whose worker went silent (beat): their heartbeat stopped."""
    cutoff = timezone.now() - SILENT_AFTER
    reaped = []
    for model, action in (
        (ModelJob, "optimise.job.reaped"),
        (Evaluation, "optimise.evaluation.reaped"),
    ):
        for job in model.objects.filter(state=JobState.RUNNING, heartbeat_at__lt=cutoff):
            reason = (
                f"The worker {job.worker} went silent (no heartbeat since "
                f"{job.heartbeat_at:%Y-%m-%d %H:%M:%S} UTC); request the job again."
            )
            with transaction.atomic():
                if model.objects.filter(pk=job.pk, state=JobState.RUNNING).update(
                    state=JobState.FAILED, reason=reason, finished_at=timezone.now()
                ):
                    audit_record(
                        actor=system_user(),
                        action=action,
                        target=job,
                        outcome=Outcome.FAILURE,
                        details={"reason": reason, "worker": job.worker},
                    )
                    reaped.append(str(job))
    return reaped
