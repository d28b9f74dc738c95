"""A Hugging Face import as a job: checked, claimed by one worker, fetched with
progress, its file staged and verified, the outcome audited. Model imports (services.py)
and dataset imports (apps/datasets) run on it."""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Any, TypeVar

from celery.exceptions import SoftTimeLimitExceeded
from django.conf import settings
from django.core.exceptions import PermissionDenied, ValidationError
from django.db import transaction
from django.utils import timezone

from aibox.celery import app as celery_app
from apps.accounts.models import User
from apps.accounts.services import system_user
from apps.audit.models import Outcome
from apps.audit.services import audit_record
from apps.registry.artifacts import artifact_store
from apps.registry.models import HubImport, ImportState
from workers.artifacts import ArtifactError, Staged
from workers.hub import (
    HubError,
    HubFile,
    RepoType,
    check_filename,
    check_repo_id,
    check_revision,
    hub_download,
    hub_file_info,
)

log = logging.getLogger(__name__)

H = TypeVar("H", bound=HubImport)


# How often a running import writes its byte count to its row (the page polls it).
IMPORT_PROGRESS_INTERVAL = 0.5


# An import still running after this long is stopped (the Celery task's soft time limit).
IMPORT_TIME_LIMIT = 6 * 60 * 60


def hub_import_check(
    *, repo_id: str, filename: str, revision: str, check_name: Callable[[str], str]
) -> tuple[str, str, str]:
    """The cleaned (repo id, file name, revision) of a requested import, refused here with
    a ValidationError when malformed or when ``check_name`` refuses the file's own name
    (a pickle format above all), before a job exists or the hub is asked anything."""
    try:
        repo_id = check_repo_id(repo_id)
        filename = check_filename(filename)
        revision = check_revision(revision)
    except HubError as exc:
        raise ValidationError(str(exc)) from exc
    check_name(PurePosixPath(filename).name)
    return repo_id, filename, revision


def hub_import_requested(
    job: HubImport, *, actor: User, action: str, target: dict[str, Any], task: str
) -> None:
    """Audit a new import (``<action>.request``, with ``target``: what it is for) and send
    the task named ``task`` with its id once the enclosing transaction commits."""
    audit_record(
        actor=actor,
        action=f"{action}.request",
        target=job,
        details={
            **target,
            "hf_repo_id": job.hf_repo_id,
            "filename": job.filename,
            "revision": job.revision,
            "endpoint": job.endpoint,
        },
    )
    transaction.on_commit(lambda: celery_app.send_task(task, args=[job.pk]))


def _progress_writer(job: HubImport) -> Callable[[int, int], None]:
    last = 0.0

    def write(done: int, total: int) -> None:
        nonlocal last
        now = time.monotonic()
        if now - last < IMPORT_PROGRESS_INTERVAL and done < total:
            return
        last = now
        type(job).objects.filter(pk=job.pk).update(bytes_done=done, bytes_total=total or None)

    return write


def hub_import_fetch(
    job: HubImport, *, repo_type: RepoType, kind: str, recorded_licence: str
) -> tuple[HubFile, Staged]:
    """Bring the job's file from its hub into the artifact store's staging area.

    Resolves the revision to a commit and records on the row what the hub says (and a
    note when the card's licence is not the ``recorded_licence`` of this ``kind`` of
    thing), refuses a file over AIBOX_UPLOAD_MAX_BYTES before downloading it, downloads
    that commit's file with progress written to the row, and stages it, checking its
    sha256 against the hub's. Raises HubError or ArtifactError, worded for the job's
    reason; nothing is left behind but the returned staged file, which the caller commits
    or discards.
    """
    hub_file: HubFile = hub_file_info(
        repo_id=job.hf_repo_id,
        filename=job.filename,
        revision=job.revision,
        repo_type=repo_type,
        endpoint=job.endpoint,
        token=settings.HF_TOKEN or None,
    )
    job.resolved = {
        "commit": hub_file.commit,
        "etag": hub_file.etag,
        "sha256": hub_file.sha256,
        "size": hub_file.size,
        "licence": hub_file.licence,
        "gated": hub_file.gated,
    }
    if hub_file.licence and hub_file.licence.lower() != recorded_licence.lower():
        job.notes = (
            f"The {kind} card gives the licence {hub_file.licence}, but this {kind} records "
            f"{recorded_licence}; both are kept in the version's provenance."
        )
    type(job).objects.filter(pk=job.pk).update(
        resolved=job.resolved, notes=job.notes, bytes_total=hub_file.size
    )
    limit = settings.UPLOAD_MAX_BYTES
    if hub_file.size is not None and hub_file.size > limit:
        raise ArtifactError(
            f"{job.filename} is {hub_file.size:,} bytes, over the limit of {limit:,} bytes "
            "(AIBOX_UPLOAD_MAX_BYTES)."
        )
    workdir = Path(settings.HF_CACHE_DIR) / f"{job._meta.model_name}-{job.pk}"
    try:
        path = hub_download(
            file=hub_file,
            dest_dir=workdir,
            token=settings.HF_TOKEN or None,
            progress=_progress_writer(job),
            interval=IMPORT_PROGRESS_INTERVAL,
            max_bytes=limit,
        )
        staged = artifact_store().stage_copy(path, max_bytes=limit)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    try:
        hub_file.check_sha256(staged.sha256)
    except HubError:
        staged.discard()
        raise
    return hub_file, staged


def hub_import_source(job: HubImport, hub_file: HubFile) -> dict[str, Any]:
    """The provenance a version imported from a hub records."""
    return {
        "repo_id": hub_file.repo_id,
        "filename": hub_file.filename,
        "revision": hub_file.revision,
        "commit": hub_file.commit,
        "etag": hub_file.etag,
        "sha256_hub": hub_file.sha256,
        "endpoint": hub_file.endpoint,
        "licence": hub_file.licence,
        "import": job.pk,
    }


def _import_finish(
    job: HubImport,
    *,
    action: str,
    target: dict[str, Any],
    state: ImportState,
    reason: str = "",
    version: Any = None,
) -> None:
    with transaction.atomic():
        job.state = state
        job.reason = reason
        job.version = version
        job.finished_at = timezone.now()
        job.save(update_fields=["state", "reason", "version", "finished_at", "notes", "resolved"])
        details: dict[str, Any] = {
            **target,
            "hf_repo_id": job.hf_repo_id,
            "filename": job.filename,
            "revision": job.revision,
            "endpoint": job.endpoint,
            "commit": job.resolved.get("commit", ""),
            "requested_by": job.created_by.username if job.created_by else "",
        }
        if version is not None:
            details |= {"version": version.pk, "sha256": version.sha256}
        if reason:
            details["reason"] = reason
        if job.notes:
            details["notes"] = job.notes
        succeeded = state == ImportState.SUCCEEDED
        audit_record(
            actor=system_user(),
            action=f"{action}.{state}",
            target=job,
            outcome=Outcome.SUCCESS if succeeded else Outcome.FAILURE,
            details=details,
        )


def _failure_reason(exc: Exception, job: HubImport) -> str:
    if isinstance(exc, HubError | ArtifactError | PermissionDenied):
        return str(exc)
    if isinstance(exc, ValidationError):
        return " ".join(exc.messages)
    if isinstance(exc, SoftTimeLimitExceeded):
        return f"Stopped: still running after {IMPORT_TIME_LIMIT // 3600} hours."
    log.exception("%s %s failed", job._meta.verbose_name, job.pk)
    return f"The import failed unexpectedly ({type(exc).__name__}); see the worker log."


def hub_import_claim(job_model: type[H], import_id: int, *related: str) -> H | None:
    """Claim a queued import for this worker (queued → running) with a conditional
    UPDATE; None when another delivery of the task has it or it has ended."""
    claimed = job_model.objects.filter(pk=import_id, state=ImportState.QUEUED).update(
        state=ImportState.RUNNING, started_at=timezone.now()
    )
    return job_model.objects.select_related(*related).get(pk=import_id) if claimed else None


def hub_import_execute(
    job: HubImport,
    *,
    action: str,
    target: dict[str, Any],
    ingest: Callable[[User], tuple[Any, bool]],
) -> None:
    """Carry a claimed (running) import to its end.

    ``ingest(requester)`` brings the file in as the person who asked for it (their role
    is checked again now) and returns (version, created). The end is recorded on the
    row and audited by the system actor as ``<action>.succeeded`` or ``.failed``, with
    ``target`` (what the import was for) in the details. Whatever fails, the job ends
    failed with a reason a person can act on.
    """
    try:
        if job.created_by is None:
            raise PermissionDenied("The user who asked for this import no longer exists.")
        version, created = ingest(job.created_by)
    except Exception as exc:
        reason = _failure_reason(exc, job)
        _import_finish(job, action=action, target=target, state=ImportState.FAILED, reason=reason)
        return
    job.bytes_done = job.bytes_total = version.size
    type(job).objects.filter(pk=job.pk).update(
        bytes_done=job.bytes_done, bytes_total=job.bytes_total
    )
    if not created:
        job.notes = " ".join(filter(None, [job.notes, f"The same file was already {version}."]))
    _import_finish(job, action=action, target=target, state=ImportState.SUCCEEDED, version=version)
