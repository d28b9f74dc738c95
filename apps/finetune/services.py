"""LoRA fine-tunes: validate and queue a job, relay its progress, cancel or retry it,
and register what it produced in the model registry with its full provenance.

The training itself runs in ``workers.finetune`` (no Django) on a worker that consumes
the ``training`` queue, one job at a time; ``apps/finetune/tasks.py`` is the bridge.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.exceptions import PermissionDenied, ValidationError
from django.db import transaction
from django.db.models import F
from django.utils import timezone

from aibox.celery import app as celery_app
from apps.accounts.models import User
from apps.accounts.services import require_role, system_user
from apps.audit.models import Outcome
from apps.audit.services import audit_record
from apps.datasets.models import Dataset, DatasetVersion
from apps.datasets.services import dataset_version_canonical
from apps.finetune import progress
from apps.finetune.models import ACTIVE_STATES, LAUNCHER_ROLES, FineTuneJob, JobState
from apps.registry.artifacts import artifact_store
from apps.registry.models import REPO_NAME, Format, ModelRepo, ModelVersion, SourceKind
from apps.registry.models import State as VersionState
from apps.registry.services import (
    model_repo_create,
    model_version_ingest,
    model_version_verify,
    repo_writable_by,
)
from workers.artifacts import Staged
from workers.finetune.spec import ParamError, TrainSpec, check_params, total_steps

log = logging.getLogger(__name__)

TRAINING_QUEUE = "training"
LOG_LINES_KEPT = 500
HISTORY_POINTS_KEPT = 5000
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


def _licence_of(base: ModelVersion, datasets: list[DatasetVersion]) -> str:
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


def finetune_job_finish(
    *,
    job_id: int,
    state: JobState,
    reason: str = "",
    result: dict[str, Any] | None = None,
    peft_dir: Path | None = None,
    gguf_path: Path | None = None,
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
            adapter, peft = _register_outputs(job, result, peft_dir, gguf_path)
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


def _stage(path: Path) -> Staged:

    return artifact_store().stage_copy(path, max_bytes=settings.UPLOAD_MAX_BYTES)


def _register_outputs(
    job: FineTuneJob, result: dict[str, Any], peft_dir: Path | None, gguf_path: Path | None
) -> tuple[ModelVersion, ModelVersion]:
    if peft_dir is None or gguf_path is None:
        raise ValidationError("The run produced no adapter files.")
    datasets = [job.dataset_version] + ([job.validation_version] if job.validation_version else [])
    actor = job.created_by or system_user()
    repo = ModelRepo.objects.filter(name=job.output_repo).first()
    if repo is None:
        repo = model_repo_create(
            actor=actor,
            name=job.output_repo,
            licence=_licence_of(job.base_model, datasets),
            description=f"LoRA adapters of {job.base_model} trained on {job.dataset_version}.",
            tags=["lora", "fine-tune", job.base_model.architecture],
        )
    source = provenance(job, result)
    gguf = model_version_ingest(
        actor=actor,
        repo=repo,
        staged=_stage(gguf_path),
        file_name=f"{job.output_repo}-job{job.pk}.gguf",
        source_kind=SourceKind.FINE_TUNE,
        source=source,
        parents=[job.base_model],
    ).version
    config_path = peft_dir / "adapter_config.json"
    peft = model_version_ingest(
        actor=actor,
        repo=repo,
        staged=_stage(peft_dir / "adapter_model.safetensors"),
        file_name=f"{job.output_repo}-job{job.pk}.safetensors",
        source_kind=SourceKind.FINE_TUNE,
        source=source | {"gguf_adapter_sha256": gguf.sha256},
        parents=[job.base_model],
        peft_config=json.loads(config_path.read_text()),
    ).version
    return gguf, peft


def train_spec(job: FineTuneJob, *, work_dir: Path, report) -> TrainSpec:
    """The runner's spec: verified inputs on local disk, canonical JSON Lines data."""

    base_path = model_version_verify(actor=system_user(), version=job.base_model)
    work_dir.mkdir(parents=True, exist_ok=True)

    report({"event": "log", "message": f"Preparing {job.dataset_version} for training."})
    train_path = dataset_version_canonical(job.dataset_version, work_dir, name="train")
    validation_path = (
        dataset_version_canonical(job.validation_version, work_dir, name="validation")
        if job.validation_version
        else None
    )
    return TrainSpec(
        job_id=str(job.pk),
        base_model_path=base_path,
        base_sha256=job.base_model.sha256,
        train_path=train_path,
        validation_path=validation_path,
        shape=job.dataset_version.shape,
        work_dir=work_dir,
        cache_dir=Path(settings.FINETUNE_CACHE_DIR),
        chat_template=job.chat_template or None,
        device=settings.FINETUNE_DEVICE,
        **job.params,
    )
