"""Bridges between optimisation rows and ``workers.optimise``.

Quantise, export and evaluation jobs go to the ``optimise`` queue: they are long,
CPU/GPU-heavy and need the model tooling, like fine-tunes, and a training worker with the
database (``--queues training,optimise``) runs one at a time. ``optimise.reap`` (Celery
beat) fails jobs whose worker went silent.
"""

from __future__ import annotations

from celery import shared_task

from apps.optimise import runs

# A 70B model quantises in well under an hour on a server; evaluations are capped in
# chunks and items. Past this the job fails with its reason instead of hanging.
TIME_LIMIT = 6 * 3600


@shared_task(
    name="optimise.model_job_run",
    bind=True,
    acks_late=True,
    soft_time_limit=TIME_LIMIT,
    time_limit=TIME_LIMIT + 300,
)
def model_job_run(self, job_id: int) -> None:
    runs.model_job_run(job_id=job_id, worker=self.request.hostname or "")


@shared_task(
    name="optimise.evaluation_run",
    bind=True,
    acks_late=True,
    soft_time_limit=TIME_LIMIT,
    time_limit=TIME_LIMIT + 300,
)
def evaluation_run(self, evaluation_id: int) -> None:
    runs.evaluation_run(evaluation_id=evaluation_id, worker=self.request.hostname or "")


@shared_task(name="optimise.reap")
def reap() -> None:
    runs.jobs_reap()
