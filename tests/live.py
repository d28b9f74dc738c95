"""Real processes for tests: a Celery worker (and, for serving, uvicorn) running against
the test database, so what they do is what production does.

Rows those processes must see are committed: tests that use them run as transactional
tests (``django_db(transaction=True)``) or unblock the database themselves.
"""

from __future__ import annotations

import functools
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from django.conf import settings
from django.db import connection

from apps.core.database import app_role_privileges_set

ROOT = Path(__file__).resolve().parents[1]


def process_env(**extra: str) -> dict[str, str]:
    """The environment of a child process that talks to the test database.

    It connects as the app's own role, with only the privileges ``bin/aibox run`` gives
    the running app (apps/core/database.py), so the live tests show that is enough.
    """
    return {
        **os.environ,
        "DATABASE_URL": app_database_url(),
        "AIBOX_SECRET_KEY": settings.SECRET_KEY,
        "AIBOX_LOG_LEVEL": "INFO",
        **extra,
    }


@functools.cache
def app_database_url() -> str:
    """The test database as the app's role, granted once per session on a connection of
    its own (committed whatever the calling test's transaction does, and unaudited).
    One role per test database, so concurrent runs on other databases keep theirs."""
    db = connection.settings_dict
    role = f"{db['NAME']}_app"
    params = {
        "host": db["HOST"] or "127.0.0.1",
        "port": db["PORT"] or 5432,
        "user": db["USER"],
        "password": db["PASSWORD"] or None,
        "dbname": db["NAME"],
    }
    password = secrets.token_hex(16)
    with psycopg.connect(**params, autocommit=True) as owner, owner.cursor() as cursor:
        app_role_privileges_set(cursor, role=role, password=password, database=db["NAME"])
    return f"postgres://{role}:{password}@{params['host']}:{params['port']}/{db['NAME']}"


def start_web_server(*, env: dict[str, str], log: Path) -> tuple[subprocess.Popen, str]:
    """uvicorn serving AIBox on a free local port; returns it and its URL once /healthz answers."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    process = subprocess.Popen(  # noqa: S603 - our own interpreter and arguments
        [
            sys.executable,
            "-m",
            "uvicorn",
            "aibox.asgi:application",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--lifespan",
            "off",
            "--log-level",
            "warning",
        ],
        cwd=ROOT,
        env=env,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        try:
            return httpx.get(f"{url}/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_until(healthy, what=f"uvicorn coming up (see {log})", timeout=30)
    except BaseException:
        stop_processes([process])
        raise
    return process, url


def start_celery_worker(
    *,
    env: dict[str, str],
    name: str,
    log: Path,
    pool: str = "threads",
    concurrency: int = 8,
    queues: str = "",
) -> subprocess.Popen:
    """Start ``celery worker`` and wait for its first heartbeat (every pool sends one)."""
    from apps.deployments import selectors

    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "aibox",
            "worker",
            "--pool",
            pool,
            "--concurrency",
            str(concurrency),
            "--hostname",
            name,
            "--loglevel",
            "INFO",
            "--without-mingle",
            "--without-gossip",
            *(["--queues", queues] if queues else []),
        ],
        cwd=ROOT,
        env=env,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 90
    while True:
        worker = selectors.worker_get(name)
        if worker is not None and worker.online:
            return process
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"The Celery worker {name} did not come up; see {log}")
        time.sleep(0.2)


def stop_processes(processes: Iterable[subprocess.Popen]) -> None:
    """SIGTERM (a warm shutdown for Celery), then wait; kill what does not stop."""
    processes = list(processes)
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    for process in processes:
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()


def wait_until(condition: Callable[[], Any], *, what: str, timeout: float = 60) -> Any:
    """Poll until ``condition()`` is truthy and return it. The timeout only guards
    against a hang (the test fails saying what never happened); it measures nothing."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"Never happened: {what}.")
        time.sleep(0.1)


def wait_for_state(deployment, state: str, *, timeout: float = 60):
    """Wait until ``deployment`` reaches ``state``; fail at once if it fails instead."""
    from apps.deployments.models import State

    def reached() -> bool:
        deployment.refresh_from_db()
        if deployment.state == State.FAILED and state != State.FAILED:
            pytest.fail(f"{deployment.name} failed: {deployment.state_reason}")
        return deployment.state == state

    wait_until(reached, what=f"{deployment.name} becoming {state}", timeout=timeout)
    return deployment
