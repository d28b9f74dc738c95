"""Bridges between fine-tune rows and ``workers.finetune``.

``finetune.run`` goes to the ``training`` queue; a training worker runs one at a time
(``--concurrency 1``), so jobs wait in order. The runner's reports go to a Redis
stream and ``finetune.progress`` (on the control queue) applies them to the row.
While it runs, the job's heartbeat (progress.Heartbeat) says its worker is alive;
``finetune.reap`` (Celery beat) fails running jobs whose heartbeat expired.

A training worker reaches the control plane through a channel: ``LocalChannel`` when it
has the database and the shared artifact store (one host), ``RemoteChannel`` over HTTP
when it runs on another host with only Redis and a worker credential
(``AIBOX_CONTROL_PLANE_URL``; ``workers/finetune/channel.py``). Either way the worker
claims the job, gets a ``TrainingOrder`` (inputs by sha256, plain parameters), fetches
and checks its inputs, trains, and hands back the outcome with the adapters, which the
control plane registers.

A run outlives a Redis restart: reports wait in the Reporter until Redis is back, a
request to apply them that cannot be sent is left to the next one, and the cancel flag
is read from the control plane (the job's row) while Redis is away.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import redis
from celery import shared_task
from celery.exceptions import SoftTimeLimitExceeded
from django.conf import settings
from kombu.exceptions import OperationalError

from apps.finetune import progress, runs, selectors, services
from apps.finetune.models import JobState
from apps.registry.artifacts import artifact_store
from workers.artifacts import ArtifactError
from workers.datasets import DatasetError
from workers.finetune import channel
from workers.finetune.order import TrainingOrder, prepare
from workers.finetune.spec import TrainResult
from workers.inference.cache import RemoteSource, pull_by_sha256

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
    channel = _channel()
    order = channel.claim(job_id, worker)
    if order is None:
        return  # cancelled while queued, or another delivery has it
    # The heartbeat lives as long as the run, the recording of its outcome included.
    with progress.Heartbeat(job_id, worker):
        _run(channel, order)


@shared_task(name="finetune.reap")
def finetune_reap() -> None:
    """Fail running jobs whose training worker went silent, and queue again the jobs
    whose messages Redis lost (Celery beat, every 30 s)."""
    runs.finetune_jobs_reap()
    services.finetune_queue_restore()


class LocalChannel:
    """The line to the control plane of a training worker that has the database and the
    shared artifact store (one host, or a shared filesystem): the same calls as
    ``workers.finetune.channel.RemoteChannel``, made in process."""

    def claim(self, job_id: int, worker: str) -> TrainingOrder | None:
        job = runs.finetune_job_claim(job_id=job_id, worker=worker)
        return runs.training_order(job) if job is not None else None

    def fetch(self, order: TrainingOrder) -> Callable[[str], Path]:
        # Hashed where they are in the store: never copied.
        return lambda sha256: artifact_store().verify(sha256)

    def cancel_requested(self, job_id: int) -> bool:
        return selectors.finetune_job_cancel_requested(job_id=job_id)

    def stream_position(self, job_id: int) -> str:
        return selectors.finetune_job_stream_position(job_id=job_id)

    def finish(self, order: TrainingOrder, outcome: Outcome) -> str:
        """Record the outcome; returns the job's state after it (a registration that
        fails makes it "failed")."""
        return runs.finetune_job_finish(
            job_id=order.job_id,
            attempt=order.attempt,
            state=JobState(outcome.state),
            reason=outcome.reason,
            result=outcome.result.as_dict() if outcome.result else None,
            outputs=runs.AdapterFiles.from_peft_dir(
                outcome.result.peft_dir, outcome.result.gguf_path
            )
            if outcome.state == JobState.SUCCEEDED
            else None,
        ).state


class RemoteChannel(channel.RemoteChannel):
    """A training worker on another host: no database, no shared disk. Inputs are pulled
    by sha256 into its cache, the outcome and the adapters are sent back over HTTP."""

    def fetch(self, order: TrainingOrder) -> Callable[[str], Path]:
        inputs = {order.base_sha256, order.train.sha256}
        if order.validation is not None:
            inputs.add(order.validation.sha256)
        return pull_by_sha256(
            settings.MODEL_CACHE_DIR,
            RemoteSource(self.url, self.token),
            max_bytes=settings.MODEL_CACHE_MAX_BYTES,
            keep=inputs,
        )

    def cancel_requested(self, job_id: int) -> bool:
        try:
            return progress.cancel_requested(job_id)
        except redis.RedisError:
            return bool(self.status(job_id)["cancel_requested"])

    def stream_position(self, job_id: int) -> str:
        return str(self.status(job_id)["stream_pos"])

    def finish(self, order: TrainingOrder, outcome: Outcome) -> str:
        return self.send_outcome(order, outcome.state, outcome.reason, outcome.result)


def _channel() -> LocalChannel | RemoteChannel:
    if settings.CONTROL_PLANE_URL:
        return RemoteChannel(settings.CONTROL_PLANE_URL, settings.WORKER_TOKEN)
    return LocalChannel()


@dataclass(frozen=True)
class Outcome:
    state: str
    reason: str = ""
    result: TrainResult | None = None


def _run(line: LocalChannel | RemoteChannel, order: TrainingOrder) -> None:
    job_id = order.job_id
    reporter = progress.Reporter(
        job_id, apply=_send_progress, applied=lambda: line.stream_position(job_id)
    )
    work_dir = Path(settings.FINETUNE_WORK_DIR) / f"job-{job_id}"
    outcome = _train(line, order, reporter, work_dir)
    # The adapters are in the registry now; checkpoints are no longer needed.
    if line.finish(order, outcome) == JobState.SUCCEEDED:
        shutil.rmtree(work_dir, ignore_errors=True)


def _train(
    line: LocalChannel | RemoteChannel,
    order: TrainingOrder,
    reporter: progress.Reporter,
    work_dir: Path,
) -> Outcome:
    job_id = order.job_id
    try:
        from workers.finetune import FinetuneError, ParamError, train
        from workers.finetune.data import DataError

        spec = prepare(
            order,
            fetch=line.fetch(order),
            work_dir=work_dir,
            cache_dir=Path(settings.FINETUNE_CACHE_DIR),
            device=settings.FINETUNE_DEVICE,
            report=reporter,
        )
        result = train(spec, report=reporter, should_stop=lambda: line.cancel_requested(job_id))
    except (FinetuneError, ParamError, DataError, ArtifactError, DatasetError) as exc:
        reporter.flush()
        return Outcome(JobState.FAILED, str(exc))
    except SoftTimeLimitExceeded:
        return Outcome(
            JobState.FAILED, f"Stopped after {TRAINING_TIME_LIMIT // 3600} hours; retry to resume."
        )
    except Exception as exc:  # the job fails with its reason; the worker goes on
        log.exception("fine-tune %s failed", job_id)
        return Outcome(
            JobState.FAILED,
            f"The run failed unexpectedly ({type(exc).__name__}: {exc}); see the "
            "worker log. Retrying resumes from the last checkpoint.",
        )
    reporter.flush()
    if result.state == "cancelled":
        return Outcome(
            JobState.CANCELLED,
            f"Cancelled at step {result.steps}; the last checkpoint is kept.",
            result,
        )
    return Outcome(JobState.SUCCEEDED, "", result)
