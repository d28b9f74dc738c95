"""Redis restarted mid-fine-tune, on a private Redis that the test kills and starts again.

A web server, a control worker and a training worker of their own run on that Redis
(and the test database), so everything that crosses Redis (the task queues, the job's
progress stream, its heartbeat, its cancel flag) goes through the one that dies, and
comes back empty. The control worker is held up (SIGSTOP) before Redis dies, so
reports it had not applied yet die with Redis, and so does the message of a job queued
behind the running one. The running job must still succeed with every step's loss
recorded once, its page must answer meanwhile, the queued job and one launched after
the restart must both run, with nobody's help.
"""

from __future__ import annotations

import signal
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from subprocess import Popen

import httpx
import pytest
import redis

from aibox.celery import app as celery_app
from apps.accounts.models import Role, Scope
from apps.accounts.services import api_key_create
from apps.finetune.models import FineTuneJob, JobState
from apps.finetune.runs import finetune_jobs_reap
from apps.finetune.tasks import finetune_reap
from tests.conftest import CONVERT_CACHE, HEARTBEAT_TTL, client_for
from tests.faults import free_port, kill_redis, start_redis
from tests.finetune.test_jobs import TINY, wait_for
from tests.live import (
    process_env,
    start_celery_worker,
    start_web_server,
    stop_processes,
    wait_until,
)
from workers import redis_keys

pytestmark = pytest.mark.django_db(transaction=True)

STEPS = 3


@dataclass
class PrivateBox:
    url: str
    key: str
    port: int
    redis: Popen
    control: Popen | None = None

    @property
    def redis_url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def beat_reap(self) -> None:
        """Send ``finetune.reap`` through this box's Redis, as beat does every 30 s."""
        with celery_app.connection_for_write(self.redis_url) as connection:
            finetune_reap.apply_async(connection=connection)


@pytest.fixture
def private_box(users, train_version, live_worker, settings, tmp_path):
    """Web server, control worker and training worker on a private Redis. The training
    data was validated by the session's workers first."""
    port = free_port()
    box = PrivateBox(url="", key="", port=port, redis=start_redis(port))
    env = process_env(
        REDIS_URL=box.redis_url,
        AIBOX_ARTIFACT_ROOT=str(live_worker.artifact_root),
        AIBOX_FINETUNE_WORK_DIR=str(tmp_path / "finetune-work"),
        AIBOX_FINETUNE_CACHE_DIR=str(CONVERT_CACHE),
        AIBOX_FINETUNE_DEVICE="cpu",
        AIBOX_FINETUNE_HEARTBEAT_TTL=HEARTBEAT_TTL,
        AIBOX_WORKER_SERVING="false",
    )
    # This process reads the workers' heartbeats and renders job pages from that Redis.
    settings.REDIS_URL = box.redis_url
    settings.FINETUNE_HEARTBEAT_TTL = float(HEARTBEAT_TTL)
    dana = users[Role.DATA_SCIENTIST]
    box.key = api_key_create(actor=dana, owner=dana, name="ci", scopes=[Scope.DATASETS]).secret
    suffix = uuid.uuid4().hex[:6]

    def worker(name: str, **options) -> Popen:
        log = tmp_path / f"{name}.log"
        return start_celery_worker(
            env=env, name=f"fault-{name}-{suffix}@localhost", log=log, **options
        )

    # The three start side by side (each spends seconds on its imports).
    with ThreadPoolExecutor() as starter:
        control = starter.submit(worker, "ctl", pool="threads", concurrency=2)
        training = starter.submit(
            worker, "train", pool="solo", concurrency=1, queues="training,optimise"
        )
        web = starter.submit(start_web_server, env=env, log=tmp_path / "uvicorn.log")
    started = [
        future.result()[0] if future is web else future.result()
        for future in (control, training, web)
        if future.exception() is None
    ]
    try:
        box.control, _ = control.result(), training.result()
        box.url = web.result()[1]
        yield box
    finally:
        if box.control is not None:
            box.control.send_signal(signal.SIGCONT)
        stop_processes(started)
        if box.redis.poll() is None:
            box.redis.kill()


def launch(box: PrivateBox, gemma, version, *, max_steps: int) -> int:
    response = httpx.post(
        f"{box.url}/api/v1/finetunes/",
        headers={"Authorization": f"Bearer {box.key}"},
        json={
            "base_model": gemma.pk,
            "dataset_version": version.pk,
            "params": TINY | {"max_steps": max_steps},
        },
        timeout=30,
    )
    assert response.status_code == 201, response.text
    return response.json()["id"]


def test_redis_restarted_mid_fine_tune_loses_no_step(users, gemma, train_version, private_box):
    dana = client_for(users[Role.DATA_SCIENTIST])
    job_id = launch(private_box, gemma, train_version, max_steps=STEPS)
    private_box.beat_reap()  # has run before, on any box
    wait_until(
        lambda: FineTuneJob.objects.filter(pk=job_id, step__gte=1).exists(),
        what="the job training",
        timeout=300,
    )
    queued = launch(private_box, gemma, train_version, max_steps=1)  # its message: in Redis
    # The control plane falls behind: what the runner reports now is in Redis only.
    private_box.control.send_signal(signal.SIGSTOP)
    stream = redis.Redis(port=private_box.port)

    def unapplied() -> int:
        position = FineTuneJob.objects.values_list("stream_pos", flat=True).get(pk=job_id)
        return len(stream.xrange(redis_keys.finetune_events_key(job_id), min=f"({position}"))

    wait_until(lambda: unapplied() >= 2, what="reports waiting in Redis", timeout=120)

    kill_redis(private_box.redis)
    # Meanwhile the job's page still answers, from PostgreSQL.
    page = dana.get(f"/finetunes/{job_id}/")
    assert page.status_code == 200 and b"job-progress" in page.content
    time.sleep(2)  # Redis stays away for a few seconds: a step or two
    private_box.redis = start_redis(private_box.port)
    # The reap, at the worst moment: Redis is back, empty, and the worker's heartbeat has
    # not reached it yet. A silent worker and a lost key must not look the same.
    finetune_jobs_reap()
    assert FineTuneJob.objects.get(pk=job_id).state == JobState.RUNNING
    after = launch(private_box, gemma, train_version, max_steps=1)
    private_box.control.send_signal(signal.SIGCONT)
    private_box.beat_reap()  # the next one beat sends

    job = wait_for(job_id, JobState.SUCCEEDED, JobState.FAILED, timeout=300)
    assert job.state == JobState.SUCCEEDED, job.reason
    assert job.attempts == 1 and job.step == STEPS
    # Every step's loss once, in order: none lost with Redis, none sent twice.
    assert [p["step"] for p in job.history if "train_loss" in p] == list(range(1, STEPS + 1))
    checkpoints = [line["message"] for line in job.logs if line["message"].startswith("Check")]
    assert checkpoints == [f"Checkpoint at step {step}." for step in range(1, STEPS + 1)]
    assert job.adapter is not None and job.adapter.source["steps"] == STEPS

    # The box works again untouched: the job whose message Redis lost and the one
    # launched after the restart both train.
    for pk in (queued, after):
        job = wait_for(pk, JobState.SUCCEEDED, JobState.FAILED, timeout=300)
        assert job.state == JobState.SUCCEEDED, job.reason
        assert [p["step"] for p in job.history if "train_loss" in p] == [1]
