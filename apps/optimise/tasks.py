"""Bridges between optimisation rows and ``workers.optimise``.

Quantise, export and evaluation jobs go to the ``optimise`` queue: they are long,
CPU/GPU-heavy and need the model tooling, like fine-tunes, and a training worker
(``--queues training,optimise``) runs one at a time. ``optimise.reap`` (Celery beat)
fails jobs whose worker went silent.

A worker reaches the control plane through a channel, as for fine-tunes: ``LocalChannel``
when it has the database and the shared artifact store (one host), ``RemoteChannel``
over HTTP when it runs on another host with only Redis and a worker credential
(``AIBOX_CONTROL_PLANE_URL``; ``workers/optimise/channel.py``). Either way the worker
claims the job, gets its order (inputs by sha256, plain parameters), fetches and checks
its inputs, runs the ``workers.optimise`` function with a heartbeat and progress, and
hands back the new GGUF file or the figures, which the control plane records.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from celery import shared_task
from django.conf import settings

from apps.optimise import runs
from apps.optimise.models import Evaluation, ModelJob
from apps.registry.artifacts import artifact_store
from workers.inference.cache import RemoteSource, pull_by_sha256
from workers.optimise import channel
from workers.optimise.order import (
    EVALUATIONS,
    JOBS,
    EvaluationOrder,
    Fetch,
    ModelJobOrder,
    Progress,
)

log = logging.getLogger(__name__)

# A 70B model quantises in well under an hour on a server; evaluations are capped in
# chunks and items. Past this the job fails with its reason instead of hanging.
TIME_LIMIT = 6 * 3600
MODELS = {JOBS: ModelJob, EVALUATIONS: Evaluation}


@shared_task(
    name="optimise.model_job_run",
    bind=True,
    acks_late=True,
    soft_time_limit=TIME_LIMIT,
    time_limit=TIME_LIMIT + 300,
)
def model_job_run(self, job_id: int) -> None:
    _run(_channel(), JOBS, job_id, self.request.hostname or "")


@shared_task(
    name="optimise.evaluation_run",
    bind=True,
    acks_late=True,
    soft_time_limit=TIME_LIMIT,
    time_limit=TIME_LIMIT + 300,
)
def evaluation_run(self, evaluation_id: int) -> None:
    _run(_channel(), EVALUATIONS, evaluation_id, self.request.hostname or "")


@shared_task(name="optimise.reap")
def reap() -> None:
    runs.jobs_reap()


class LocalChannel:
    """The line to the control plane of a worker that has the database and the shared
    artifact store: the same calls as ``workers.optimise.channel.RemoteChannel``, made
    in process."""

    def claim(self, kind: str, job_id: int, worker: str) -> ModelJobOrder | EvaluationOrder | None:
        if kind == EVALUATIONS:
            return runs.evaluation_claim(evaluation_id=job_id, worker=worker)
        return runs.model_job_claim(job_id=job_id, worker=worker)

    def fetch(self, order: ModelJobOrder | EvaluationOrder) -> Fetch:
        return runs.input_verified  # hashed where they are in the store: never copied

    def work_dir(self, name: str) -> Path:
        # Inside the artifact store's tmp/, so the new file is staged by a rename.
        return artifact_store().tmp / name

    def report(
        self, kind: str, job_id: int, worker: str, percent: int | None = None, message: str = ""
    ) -> None:
        runs.job_report(
            model=MODELS[kind], pk=job_id, worker=worker, percent=percent, message=message
        )

    def finish(self, kind: str, job_id: int, worker: str, outcome: _Outcome) -> None:
        if kind == EVALUATIONS:
            runs.evaluation_finish(
                evaluation_id=job_id,
                worker=worker,
                reason=outcome.reason,
                figures=outcome.figures,
                result=outcome.result,
            )
        else:
            runs.model_job_finish(
                job_id=job_id,
                worker=worker,
                reason=outcome.reason,
                result=outcome.result,
                output=outcome.output,
            )


class RemoteChannel(channel.RemoteChannel):
    """A worker on another host: no database, no shared disk. Inputs are pulled by sha256
    into its cache; the new file, the figures and the outcome are sent back over HTTP."""

    def fetch(self, order: ModelJobOrder | EvaluationOrder) -> Fetch:
        return pull_by_sha256(
            settings.MODEL_CACHE_DIR,
            RemoteSource(self.url, self.token),
            max_bytes=settings.MODEL_CACHE_MAX_BYTES,
            keep=order.inputs,
        )

    def work_dir(self, name: str) -> Path:
        return Path(settings.FINETUNE_WORK_DIR) / name

    def finish(self, kind: str, job_id: int, worker: str, outcome: _Outcome) -> None:
        body: dict[str, Any] = {
            "worker": worker,
            "state": "failed" if outcome.reason else "succeeded",
            "reason": outcome.reason,
            "result": outcome.result,
        }
        if kind == EVALUATIONS:
            body["figures"] = outcome.figures
        elif outcome.output is not None and not outcome.reason:
            body["sha256"] = self.send_output(job_id, worker, outcome.output)
        state = super().finish(kind, job_id, body)
        log.info("%s %s ended %s %s", kind, job_id, state["state"], state["reason"])


def _channel() -> LocalChannel | RemoteChannel:
    if settings.CONTROL_PLANE_URL:
        return RemoteChannel(settings.CONTROL_PLANE_URL, settings.WORKER_TOKEN)
    return LocalChannel()


@dataclass(frozen=True)
class _Outcome:
    """How the work ended: a reason when it failed; else the new file or the figures."""

    reason: str = ""
    result: dict[str, Any] = field(default_factory=dict)
    output: Path | None = None
    figures: dict[str, Any] = field(default_factory=dict)


@contextmanager
def _heartbeat(beat: Callable[[], None]) -> Iterator[None]:
    """Call ``beat`` every HEARTBEAT_SECONDS while the work runs (native calls give no
    callbacks), and while its outcome is sent and recorded."""
    from django.db import connection

    stop = threading.Event()

    def loop() -> None:
        try:
            while not stop.wait(runs.HEARTBEAT_SECONDS):
                beat()
        finally:
            connection.close()  # this thread's own connection, where it has one

    thread = threading.Thread(target=loop, name="optimise-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=runs.HEARTBEAT_SECONDS + 5)


def _progress_writer(send: Callable[[int, str], None]) -> Progress:
    """A progress callback that reports at most once a second (and always the end)."""
    last = {"at": 0.0}

    def write(done: int, total: int, message: str) -> None:
        now = time.monotonic()
        if done < total and now - last["at"] < 1.0:
            return
        last["at"] = now
        send(min(100, done * 100 // total) if total else 0, message)

    return write


def _run(line: LocalChannel | RemoteChannel, kind: str, job_id: int, worker: str) -> None:
    """Claim the job, do its work in a folder of its own with a heartbeat, and hand back
    the outcome: the one frame of quantise, export and evaluation, local or remote."""
    from workers.optimise.order import evaluate, make_model_file

    order = line.claim(kind, job_id, worker)
    if order is None:
        return  # another delivery has it, or it was reaped
    folder = line.work_dir(f"optimise-{kind}-{job_id}")
    folder.mkdir(parents=True, exist_ok=True)
    progress = _progress_writer(
        lambda percent, message: line.report(kind, job_id, worker, percent, message)
    )
    try:
        with _heartbeat(lambda: line.report(kind, job_id, worker)):
            try:
                fetch = line.fetch(order)
                if isinstance(order, EvaluationOrder):
                    figures, result = evaluate(order, fetch=fetch, work=folder, progress=progress)
                    outcome = _Outcome(result=result, figures=figures)
                else:
                    output, result = make_model_file(
                        order, fetch=fetch, work=folder, progress=progress
                    )
                    outcome = _Outcome(result=result, output=output)
            except Exception as exc:
                log.exception("optimise %s %s failed", kind, job_id)
                outcome = _Outcome(reason=runs.failure_reason(exc))
            line.finish(kind, job_id, worker, outcome)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
