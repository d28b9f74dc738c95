"""Thin bridge: a Hugging Face import job, by id, to the service that runs it."""

from __future__ import annotations

from celery import shared_task
from django.conf import settings

from apps.accounts.services import system_user
from apps.registry import artifacts, model_imports
from apps.registry.hub_imports import IMPORT_TIME_LIMIT


# Not retried: a failed import ends failed with its reason, and asking again is one click.
# A duplicate delivery (acks_late after a lost worker) finds the job claimed and returns.
# A 50 GB file needs hours on a slow link; the broker's visibility timeout (12 h) is longer.
@shared_task(
    name="registry.model_import_run",
    acks_late=True,
    ignore_result=True,
    soft_time_limit=IMPORT_TIME_LIMIT,
    time_limit=IMPORT_TIME_LIMIT + 120,
)
def model_import_run(import_id: int) -> None:
    model_imports.model_import_run(import_id=import_id)


# Celery beat runs this every AIBOX_ARTIFACT_REVERIFY_EVERY seconds (CELERY_BEAT_SCHEDULE).
# Safe to run twice at once: each run only re-hashes files and records what it found.
@shared_task(name="registry.artifact_reverify", ignore_result=True)
def artifact_reverify(limit: int | None = None) -> None:
    artifacts.artifact_reverify(
        actor=system_user(), limit=limit or settings.ARTIFACT_REVERIFY_BATCH
    )


# Celery beat runs this hourly (CELERY_BEAT_SCHEDULE): staged files left by a crash.
@shared_task(name="registry.artifact_staging_prune", ignore_result=True)
def artifact_staging_prune() -> None:
    artifacts.artifact_staging_prune(actor=system_user())
