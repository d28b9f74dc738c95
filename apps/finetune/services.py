"""LoRA fine-tunes: check, estimate and queue a job, cancel or retry it.

The training itself runs in ``workers.finetune`` (no Django) on a worker that consumes
the ``training`` queue, one job at a time; ``apps/finetune/tasks.py`` is the bridge and
``runs`` what happens to the job there (claim, progress, finish, registration).
"""

from __future__ import annotations

import logging
import math
from dataclasses import fields
from pathlib import Path
from typing import Any

from django.core.exceptions import PermissionDenied, ValidationError
from django.db import transaction
from django.utils import timezone

from aibox.celery import app as celery_app
from apps.accounts.models import User
from apps.accounts.services import require_role
from apps.audit.services import audit_record
from apps.datasets.models import Dataset, DatasetVersion
from apps.finetune import progress
from apps.finetune.models import ACTIVE_STATES, LAUNCHER_ROLES, FineTuneJob, JobState
from apps.registry.models import REPO_NAME, Format, ModelRepo, ModelVersion
from apps.registry.models import State as VersionState
from apps.registry.services import (
    repo_writable_by,
)
from workers.finetune.spec import ParamError, TrainSpec, check_params, total_steps

log = logging.getLogger(__name__)

TRAINING_QUEUE = "training"
# Hyperparameters a job may set, with their defaults (those of workers.finetune).
PARAM_NAMES = (
    "lora_rank",
    "lora_alpha",
    "lora_dropout",
    "target_modules",
    "learning_rate",
    "lr_scheduler",
    "warmup_steps",
    "epochs",
    "max_steps",
    "batch_size",
    "gradient_accumulation",
    "max_seq_length",
    "seed",
    "checkpoint_every",
    "eval_every",
)
# Seconds per optimiser step per (batch row × 256 tokens), measured on 2 CPU cores with
# Gemma 3 270M (workers.finetune's tests); a GPU is far faster. Only for the estimate.
CPU_SECONDS_PER_ROW_256_TOKENS = 1.5


def default_params() -> dict[str, Any]:
    defaults = {f.name: f.default for f in fields(TrainSpec) if f.name in PARAM_NAMES}
    defaults["target_modules"] = list(defaults["target_modules"])
    return defaults


def _spec_for_check(
    *, params: dict[str, Any], shape: str, chat_template: str, job_id: str = "check"
) -> TrainSpec:
    placeholder = Path("/nonexistent")
    return TrainSpec(
        job_id=job_id,
        base_model_path=placeholder,
        base_sha256="",
        train_path=placeholder,
        shape=shape,
        work_dir=placeholder,
        cache_dir=placeholder,
        chat_template=chat_template or None,
        **params,
    )


def clean_params(params: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(params) - set(PARAM_NAMES))
    if unknown:
        raise ValidationError(
            f"Unknown parameter{'s' if len(unknown) > 1 else ''}: {', '.join(unknown)}. "
            f"Known: {', '.join(PARAM_NAMES)}."
        )
    merged = default_params() | {k: v for k, v in params.items() if v is not None}
    if isinstance(merged["target_modules"], str):
        merged["target_modules"] = [
            m.strip() for m in merged["target_modules"].split(",") if m.strip()
        ]
    if params.get("max_steps"):
        merged["epochs"] = None
    return merged


def licence_of(base: ModelVersion, datasets: list[DatasetVersion]) -> str:
    """An adapter is bound by its base model's licence and its training data's."""
    licences = [base.repo.licence] + [d.dataset.licence for d in datasets]
    unique = list(dict.fromkeys(x.strip() for x in licences if x.strip()))
    return " AND ".join(unique)[:100]


def _check_inputs(
    actor: User,
    base_model: ModelVersion,
    dataset_version: DatasetVersion,
    validation_version: DatasetVersion | None,
) -> None:
    if base_model.format != Format.GGUF_MODEL:
        raise ValidationError(f"{base_model} is not a base model (it is a {base_model.format}).")
    if base_model.state == VersionState.DEPRECATED:
        raise ValidationError(f"{base_model} is deprecated; choose a current version.")
    visible = Dataset.objects.visible_to(actor)
    for version in filter(None, (dataset_version, validation_version)):
        if not visible.filter(pk=version.dataset_id).exists():
            raise PermissionDenied(f"You may not use the dataset {version.dataset.name}.")
        if not version.trainable:
            raise ValidationError(
                f"{version} is {version.get_state_display().lower()}: only a version that "
                "validated without errors can be used for training"
                + (
                    f" ({version.state_reason})."
                    if version.state_reason
                    else "; wait for its validation to finish."
                )
            )
    if validation_version is not None:
        if validation_version.pk == dataset_version.pk:
            raise ValidationError("The validation set must be a different version.")
        if validation_version.shape != dataset_version.shape:
            raise ValidationError(
                f"The validation set is {validation_version.shape} rows but the training set "
                f"is {dataset_version.shape}."
            )


def finetune_estimate(
    *, base_model: ModelVersion, dataset_version: DatasetVersion, params: dict[str, Any]
) -> dict[str, Any]:
    """A rough time and memory estimate shown before launching (CPU figures)."""
    rows = dataset_version.valid_rows or 0
    per_step = params["batch_size"] * params["gradient_accumulation"]
    steps = total_steps(
        rows=rows,
        epochs=params.get("epochs"),
        max_steps=params.get("max_steps"),
        rows_per_step=per_step,
    )
    stats = (dataset_version.report or {}).get("length_stats") or {}
    unit = (dataset_version.report or {}).get("length_unit", "characters")
    mean = float(stats.get("mean") or 0)
    tokens = mean if unit == "tokens" else mean / 4  # about 4 characters a token
    tokens = min(max(tokens, 16), params["max_seq_length"])
    seconds = steps * per_step * CPU_SECONDS_PER_ROW_256_TOKENS * tokens / 256
    parameters = base_model.parameter_count or 0
    # float32 weights, plus activations for the batch; LoRA's own state is tiny.
    memory = (
        parameters * 4
        + per_step
        * params["max_seq_length"]
        * (base_model.embedding_size or 0)
        * (base_model.layers or 0)
        * 4
        * 8
    )
    return {"steps": steps, "seconds_cpu": math.ceil(seconds), "memory_bytes": memory}


@transaction.atomic
def finetune_job_create(
    *,
    actor: User,
    base_model: ModelVersion,
    dataset_version: DatasetVersion,
    params: dict[str, Any],
    validation_version: DatasetVersion | None = None,
    chat_template: str = "",
    output_repo: str = "",
    name: str = "",
) -> FineTuneJob:
    """Check a fine-tune against its model and data, then queue it for a training worker.

    Everything that can be refused before a worker spends time is refused here, with
    every reason at once: unknown target modules, a sequence length above the model's
    context, out-of-range hyperparameters, a dataset version that failed validation.
    """
    require_role(actor, LAUNCHER_ROLES, "launch fine-tunes")
    _check_inputs(actor, base_model, dataset_version, validation_version)
    params = clean_params(params)
    try:
        spec = _spec_for_check(
            params=params, shape=dataset_version.shape, chat_template=chat_template
        )
        check_params(
            spec, model_info={**base_model.metadata, "architecture": base_model.architecture}
        )
    except ParamError as exc:
        raise ValidationError(exc.messages) from exc
    except TypeError as exc:  # a value of the wrong type for a parameter
        raise ValidationError(f"A parameter has the wrong type: {exc}") from exc
    output_repo = (output_repo or f"{base_model.repo.name}-{dataset_version.dataset.name}-lora")[
        :100
    ].lower()
    REPO_NAME(output_repo)
    existing = ModelRepo.objects.filter(name=output_repo).first()
    if existing is not None and not repo_writable_by(actor, existing):
        raise ValidationError(f"The model {output_repo} belongs to someone else; pick a name.")
    job = FineTuneJob.objects.create(
        name=(name or f"{dataset_version.dataset.name} on {base_model.repo.name}")[:100],
        base_model=base_model,
        dataset_version=dataset_version,
        validation_version=validation_version,
        params=params,
        chat_template=chat_template,
        output_repo=output_repo,
        created_by=actor,
    )
    audit_record(
        actor=actor,
        action="finetune.create",
        target=job,
        details={
            "base_model": base_model.pk,
            "base_sha256": base_model.sha256,
            "dataset_version": dataset_version.pk,
            "dataset_sha256": dataset_version.sha256,
            "validation_version": validation_version.pk if validation_version else None,
            "params": params,
            "output_repo": output_repo,
        },
    )
    transaction.on_commit(lambda: _start(job.pk))
    return job


def _start(job_id: int) -> None:
    # A new job's stream starts empty, whatever a reset database's job of that id left.
    progress.drop(job_id)
    _enqueue(job_id)


def _enqueue(job_id: int) -> None:
    # Sent by name (apps/finetune/tasks.py): the tasks import this module, not the reverse.
    celery_app.send_task("finetune.run", args=[job_id], queue=TRAINING_QUEUE)


def queue_position(job: FineTuneJob) -> int | None:
    """1 for the next job a training worker takes; None when not waiting."""
    if job.state != JobState.QUEUED:
        return None
    earlier = FineTuneJob.objects.filter(state=JobState.QUEUED, created_at__lt=job.created_at)
    return earlier.count() + 1


def finetune_queue_restore() -> list[int]:
    """Send the queued jobs to the training queue again, in order, when Redis has lost
    its data (restarted empty): their messages went with it, and they would wait for
    ever. A job delivered twice is claimed once (``finetune_job_claim``), so sending
    one whose message survived does nothing. Celery beat runs this with the reap."""
    if not progress.queue_lost():
        return []
    queued = FineTuneJob.objects.filter(state=JobState.QUEUED).order_by("created_at", "pk")
    resent = list(queued.values_list("pk", flat=True))
    for job_id in resent:
        _enqueue(job_id)
    if resent:
        log.warning("Redis had lost its data (or is new): queued fine-tunes %s sent again", resent)
    return resent


@transaction.atomic
def finetune_job_cancel(*, actor: User, job: FineTuneJob) -> FineTuneJob:
    """Stop a job: a queued one at once; a running one within a training step."""
    _require_owner(actor, job, "cancel this fine-tune")
    job = FineTuneJob.objects.select_for_update().get(pk=job.pk)
    if job.state not in ACTIVE_STATES:
        raise ValidationError(f"This job is {job.get_state_display().lower()}; nothing to cancel.")
    job.cancel_requested = True
    if job.state == JobState.QUEUED:
        job.state, job.finished_at = JobState.CANCELLED, timezone.now()
        job.reason = f"Cancelled by {actor.username} before it started."
    job.save(update_fields=["cancel_requested", "state", "finished_at", "reason"])
    progress.request_cancel(job.pk)
    audit_record(actor=actor, action="finetune.cancel", target=job, details={"state": job.state})
    return job


@transaction.atomic
def finetune_job_retry(*, actor: User, job: FineTuneJob) -> FineTuneJob:
    """Queue a failed or cancelled job again; it resumes from its last checkpoint."""
    _require_owner(actor, job, "retry this fine-tune")
    job = FineTuneJob.objects.select_for_update().get(pk=job.pk)
    if job.state not in (JobState.FAILED, JobState.CANCELLED):
        raise ValidationError("Only a failed or cancelled job can be retried.")
    previous = job.state
    job.state, job.reason, job.cancel_requested = JobState.QUEUED, "", False
    job.finished_at = None
    job.save(update_fields=["state", "reason", "cancel_requested", "finished_at"])
    progress.clear_cancel(job.pk)
    audit_record(
        actor=actor,
        action="finetune.retry",
        target=job,
        details={"from": previous, "resume_from_step": job.last_checkpoint_step},
    )
    transaction.on_commit(lambda: _enqueue(job.pk))
    return job


def _require_owner(actor: User, job: FineTuneJob, doing: str) -> None:
    require_role(actor, LAUNCHER_ROLES, doing)
    if actor.is_system or actor.role == "admin" or job.created_by_id == actor.pk:
        return
    raise PermissionDenied(f"Only the person who launched it or an admin may {doing}.")
