"""Derived dataset versions: split, de-duplicate or filter a valid version. A Celery job
streams the source once through ``workers.datasets`` and stores each output as a new
version whose parent and transformation record how it was made.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Any

from django.core.exceptions import ValidationError
from django.db import transaction
from django.utils import timezone

from aibox.celery import app as celery_app
from apps.accounts.models import User
from apps.accounts.services import system_user
from apps.audit.models import Outcome
from apps.audit.services import audit_record
from apps.datasets.models import (
    DatasetTransform,
    DatasetVersion,
    JobState,
    Operation,
    SourceKind,
    State,
)
from apps.datasets.services import dataset_version_ingest, reading_options, require_dataset_writer
from apps.registry.artifacts import artifact_store
from workers import datasets as data
from workers.artifacts import Staged

log = logging.getLogger(__name__)


def _clean_params(operation: str, params: dict[str, Any]) -> dict[str, Any]:
    if operation == Operation.SPLIT:
        try:
            fraction = float(params.get("validation_fraction", 0.1))
            seed = int(params.get("seed", 42))
        except (TypeError, ValueError) as exc:
            raise ValidationError(
                "The split needs a numeric validation fraction and seed."
            ) from exc
        if not 0 < fraction < 1:
            raise ValidationError("The validation fraction must be between 0 and 1 (e.g. 0.1).")
        return {"validation_fraction": fraction, "seed": seed}
    if operation == Operation.DEDUPE:
        return {}
    if operation == Operation.FILTER:
        return {"drop_invalid": True, "drop_pii": bool(params.get("drop_pii", False))}
    raise ValidationError(
        f"{operation!r} is not an operation; use one of: {', '.join(Operation.values)}."
    )


@transaction.atomic
def dataset_transform_request(
    *, actor: User, version: DatasetVersion, operation: str, params: dict[str, Any]
) -> DatasetTransform:
    """Queue the derivation of new versions (split, de-duplication, filtering)."""
    require_dataset_writer(actor, version.dataset, "derive dataset versions")
    params = _clean_params(operation, params or {})
    if version.state == State.VALIDATING:
        raise ValidationError("Wait for this version's validation to finish first.")
    if not version.valid_rows:
        raise ValidationError("This version has no valid rows to derive anything from.")
    job = DatasetTransform.objects.create(
        source_version=version, operation=operation, params=params, created_by=actor
    )
    audit_record(
        actor=actor,
        action="dataset_transform.request",
        target=job,
        details={"version": version.pk, "operation": operation, "params": params},
    )
    transaction.on_commit(lambda: _enqueue_transform(job.pk))
    return job


def _enqueue_transform(job_id: int) -> None:
    celery_app.send_task("datasets.transform_run", args=[job_id])


def dataset_transform_run(*, job_id: int) -> DatasetTransform | None:
    """Run a derivation (the job's body): stream the source once, store each output
    as a new version whose parent and transformation record how it was made."""
    claimed = DatasetTransform.objects.filter(pk=job_id, state=JobState.QUEUED).update(
        state=JobState.RUNNING, started_at=timezone.now()
    )
    job = DatasetTransform.objects.select_related(
        "source_version__dataset", "source_version__artifact", "created_by"
    ).get(pk=job_id)
    if not claimed:
        return job  # another delivery of this task has it
    source = job.source_version
    store = artifact_store()
    work = store.tmp / f"transform-{job.pk}-{int(time.time())}"
    actor = job.created_by or system_user()
    try:
        path = store.verify(source.sha256)
        params = {**job.params, "valid_rows": source.valid_rows}
        work.mkdir(parents=True)
        outputs = data.transform(
            path,
            data.FileFormat(source.format),
            # Lengths matter to a transform only when rows over a token limit are failures.
            reading_options(source, tokenize=bool(source.max_tokens)),
            job.operation,
            params,
            work,
        )
        versions = []
        for derived in outputs:
            staged = Staged(path=Path(derived.path), sha256=derived.sha256, size=derived.size)
            versions.append(
                dataset_version_ingest(
                    actor=actor,
                    dataset=source.dataset,
                    staged=staged,
                    file_name=f"{source.dataset.name}-v{source.number}-{derived.name}.jsonl",
                    source_kind=SourceKind.DERIVED,
                    source={"parent_sha256": source.sha256, "job": job.pk},
                    declared_shape=source.shape,
                    tokenizer=source.tokenizer,
                    max_tokens=source.max_tokens,
                    parent=source,
                    transformation={
                        "operation": job.operation,
                        "params": job.params,
                        "part": derived.name,
                        "rows": derived.rows,
                        "details": derived.details,
                    },
                )
            )
    except Exception as exc:  # the job fails with the reason; the worker stays up
        log.exception("Dataset transform %s failed", job.pk)
        reason = " ".join(exc.messages) if isinstance(exc, ValidationError) else str(exc)
        return _finish_transform(job, state=JobState.FAILED, reason=reason or repr(exc))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return _finish_transform(
        job,
        state=JobState.SUCCEEDED,
        outputs=versions,
        details={d.name: {"rows": d.rows, **d.details} for d in outputs},
    )


@transaction.atomic
def _finish_transform(
    job: DatasetTransform,
    *,
    state: JobState,
    reason: str = "",
    outputs: list[DatasetVersion] | None = None,
    details: dict[str, Any] | None = None,
) -> DatasetTransform:
    job.state, job.reason, job.details = state, reason, details or {}
    job.finished_at = timezone.now()
    job.save(update_fields=["state", "reason", "details", "finished_at"])
    job.outputs.set(outputs or [])
    audit_record(
        actor=system_user(),
        action=f"dataset_transform.{state}",
        target=job,
        outcome=Outcome.SUCCESS if state == JobState.SUCCEEDED else Outcome.FAILURE,
        details={
            "reason": reason,
            "outputs": [v.pk for v in outputs or []],
            "details": details or {},
        },
    )
    return job
