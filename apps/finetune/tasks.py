"""Bridges between fine-tune rows and ``workers.finetune``.

``finetune.run`` goes to the ``training`` queue; a training worker runs one at a time
(``--concurrency 1``), so jobs wait in order. The runner's reports go to a Redis
stream and ``finetune.progress`` (on the control queue) applies them to the row.
While it runs, the job's heartbeat (progress.Heartbeat) says its worker is alive;
``finetune.reap`` (Celery beat) fails running jobs whose heartbeat expired.

A run outlives a Redis restart: reports wait in the Reporter until Redis is back, a
request to apply them that cannot be sent is left to the next one, and the cancel flag
is read from the job's row while Redis is away.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from celery import shared_task
from celery.exceptions import SoftTimeLimitExceeded
from django.conf import settings
from kombu.exceptions import OperationalError

from apps.finetune import progress, runs, selectors, services
from apps.finetune.models import FineTuneJob, JobState

log = logging.getLogger(__name__)

TRAINING_TIME_LIMIT = 24 * 3600


@shared_task(name="finetune.progress", acks_late=True)
def finetune_progress(job_id: int) -> None:
    runs.finetune_progress_apply(job_id=job_id)


def _send_progress(job_id: int) -> None:
    try:
        finetune_progress.delay(job_id)
    except OperationalError as exc:
        # The broker is away: the next request (at the latest the run's end) applies
        # these reports too, as each applies everything new in the job's stream.
        log.warning("fine-tune %s: progress not relayed for now (%s)", job_id, exc)


@shared_task(
    name="finetune.run",
    bind=True,
    acks_late=True,
    soft_time_limit=TRAINING_TIME_LIMIT,
    time_limit=TRAINING_TIME_LIMIT + 300,
)
def finetune_run(self, job_id: int) -> None:
    worker = self.request.hostname or ""
    job = runs.finetune_job_claim(job_id=job_id, worker=worker)
    if job is None:
        return  # cancelled while queued, or another delivery has it
    # The heartbeat lives as long as the run, the recording of its outcome included.
    with progress.Heartbeat(job_id, worker):
        _run(job_id, attempt=job.attempts)


@shared_task(name="finetune.reap")
def finetune_reap() -> None:
    """Fail running jobs whose training worker went silent, and queue again the jobs
    whose messages Redis lost (Celery beat, every 30 s)."""
    runs.finetune_jobs_reap()
    services.finetune_queue_restore()


def _run(job_id: int, *, attempt: int) -> None:
    job = FineTuneJob.objects.get(pk=job_id)
    reporter = progress.Reporter(
        job_id,
        apply=_send_progress,
        applied=lambda: selectors.finetune_job_stream_position(job_id=job_id),
    )
    work_dir = Path(settings.FINETUNE_WORK_DIR) / f"job-{job_id}"
    try:
        from workers.finetune import FinetuneError, ParamError, train
        from workers.finetune.data import DataError

        spec = runs.train_spec(job, work_dir=work_dir, report=reporter)
        result = train(
            spec,
            report=reporter,
            should_stop=lambda: selectors.finetune_job_cancel_requested(job_id=job_id),
        )
    except (FinetuneError, ParamError, DataError) as exc:
        reporter.flush()
        runs.finetune_job_finish(
            job_id=job_id, attempt=attempt, state=JobState.FAILED, reason=str(exc)
        )
        return
    except SoftTimeLimitExceeded:
        runs.finetune_job_finish(
            job_id=job_id,
            attempt=attempt,
            state=JobState.FAILED,
            reason=f"Stopped after {TRAINING_TIME_LIMIT // 3600} hours; retry to resume.",
        )
        return
    except Exception as exc:  # the job fails with its reason; the worker goes on
        log.exception("fine-tune %s failed", job_id)
        runs.finetune_job_finish(
            job_id=job_id,
            attempt=attempt,
            state=JobState.FAILED,
            reason=f"The run failed unexpectedly ({type(exc).__name__}: {exc}); see the "
            "worker log. Retrying resumes from the last checkpoint.",
        )
        return
    reporter.flush()
    if result.state == "cancelled":
        runs.finetune_job_finish(
            job_id=job_id,
            attempt=attempt,
            state=JobState.CANCELLED,
            reason=f"Cancelled at step {result.steps}; the last checkpoint is kept.",
            result=result.as_dict(),
        )
        return
    runs.finetune_job_finish(
        job_id=job_id,
        attempt=attempt,
        state=JobState.SUCCEEDED,
        result=result.as_dict(),
        peft_dir=result.peft_dir,
        gguf_path=result.gguf_path,
    )
    # The adapters are in the artifact store now; checkpoints are no longer needed.
    if FineTuneJob.objects.filter(pk=job_id, state=JobState.SUCCEEDED).exists():
        shutil.rmtree(work_dir, ignore_errors=True)
