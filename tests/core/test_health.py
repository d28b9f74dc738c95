import os
import subprocess
import sys
import time
import uuid

import pytest
from django.test import Client

from apps.core.selectors import live_workers


def test_liveness():
    response = Client().get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


@pytest.fixture(scope="module")
def celery_worker():
    """A real Celery worker process on the real Redis broker."""
    name = f"test-{uuid.uuid4().hex[:8]}@localhost"
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "aibox",
            "worker",
            "--pool",
            "solo",
            "--hostname",
            name,
            "--loglevel",
            "WARNING",
            "--without-mingle",
            "--without-gossip",
        ],
        env={**os.environ},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 60
    while name not in live_workers(timeout=1.0):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            output = process.stdout.read().decode() if process.stdout else ""
            pytest.fail(f"Celery worker did not come up:\n{output}")
    yield name
    process.terminate()
    process.wait(timeout=30)


@pytest.mark.django_db
def test_readiness_reports_database_redis_and_live_workers(celery_worker):
    response = Client().get("/readyz")
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "ready"
    assert body["database"] == "ok" and body["redis"] == "ok"
    assert body["workers"] >= 1
    assert celery_worker in live_workers(timeout=2.0)


@pytest.mark.django_db
def test_readiness_fails_when_redis_is_unreachable(settings):
    settings.REDIS_URL = "redis://127.0.0.1:1/0"  # nothing listens on port 1
    response = Client().get("/readyz")
    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "not ready"
    assert body["redis"].startswith("error")
    assert body["workers"] == 0
