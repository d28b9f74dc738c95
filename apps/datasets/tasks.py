"""Thin bridges: dataset jobs take ids and call the services, which call ``workers/``."""

from __future__ import annotations

from celery import shared_task

from apps.datasets import hub_imports, services, transforms
from apps.registry.hub_imports import IMPORT_TIME_LIMIT


@shared_task(name="datasets.version_validate", acks_late=True)
def dataset_version_validate(version_id: int) -> None:
    # Safe to run twice: only a version that is still validating is written.
    services.dataset_version_validate(version_id=version_id)


@shared_task(name="datasets.transform_run", acks_late=True)
def dataset_transform_run(job_id: int) -> None:
    # A duplicate delivery finds the job claimed and does nothing.
    transforms.dataset_transform_run(job_id=job_id)


# As the registry's import: not retried (a failed import ends failed with its reason), a
# duplicate delivery finds the job claimed, and a large file may need hours.
@shared_task(
    name="datasets.import_run",
    acks_late=True,
    ignore_result=True,
    soft_time_limit=IMPORT_TIME_LIMIT,
    time_limit=IMPORT_TIME_LIMIT + 120,
)
def dataset_import_run(import_id: int) -> None:
    hub_imports.dataset_import_run(import_id=import_id)
