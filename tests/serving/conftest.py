"""The live serving stack: uvicorn on a local port, a real Celery worker, real Gemma.

Both processes run against the test database, so the rows they need are committed
(``django_db_blocker.unblock()``) and the whole database is flushed when the package's
tests end, as Django's transactional tests do.
"""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from django.conf import settings
from django.core.management import call_command

from apps.accounts.models import Role, Scope, User
from apps.accounts.services import api_key_create, system_user
from apps.deployments import services
from apps.deployments.models import Deployment, State
from apps.registry.bundled import model_register_bundled
from apps.registry.models import ModelVersion
from tests.conftest import PASSWORD, make_user
from tests.live import (
    process_env,
    start_celery_worker,
    start_web_server,
    stop_processes,
    wait_for_state,
    wait_until,
)

ROOT = Path(__file__).resolve().parents[2]
OFFLINE_AFTER = 4.0


@dataclass
class Stack:
    url: str
    env: dict[str, str]
    worker: str
    version: ModelVersion
    admin: User
    keys: dict[str, str] = field(default_factory=dict)
    processes: list[subprocess.Popen] = field(default_factory=list)
    logs: Path | None = None

    def start_worker(self, name: str) -> subprocess.Popen:
        log = self.logs / f"{name.split('@')[0]}.log"
        process = start_celery_worker(env=self.env, name=name, log=log)
        self.processes.append(process)
        return process

    def deploy(self, name: str, *, timeout: float = 120, **values) -> Deployment:
        deployment = services.deployment_create(
            actor=self.admin, name=name, model_version=self.version, **values
        )
        return wait_for_state(deployment, State.READY, timeout=timeout)

    def key(self, label: str = "inference") -> str:
        return self.keys[label]


@pytest.fixture(scope="package")
def stack(test_database, django_db_blocker, tmp_path_factory) -> Iterator[Stack]:
    logs = tmp_path_factory.mktemp("serving-logs")
    artifacts = tmp_path_factory.mktemp("artifacts")
    cache = tmp_path_factory.mktemp("model-cache")
    env = process_env(
        AIBOX_ARTIFACT_ROOT=str(artifacts),
        AIBOX_MODEL_CACHE_DIR=str(cache),
        AIBOX_WORKER_OFFLINE_AFTER=str(OFFLINE_AFTER),
    )
    original = (settings.ARTIFACT_ROOT, settings.WORKER_OFFLINE_AFTER)
    settings.ARTIFACT_ROOT, settings.WORKER_OFFLINE_AFTER = artifacts, OFFLINE_AFTER
    # The web server runs with production static files (whitenoise's manifest).
    subprocess.run(
        [sys.executable, "manage.py", "collectstatic", "--no-input", "-v", "0"],
        cwd=ROOT,
        env=env,
        check=True,
    )
    with django_db_blocker.unblock():
        admin = make_user(Role.ADMIN, username="serve-admin")
        version = model_register_bundled(actor=system_user()).version
        stack = Stack(
            url="",
            env=env,
            worker=f"serve-{uuid.uuid4().hex[:6]}@localhost",
            version=version,
            admin=admin,
            logs=logs,
        )
        developer = make_user(Role.APP_DEVELOPER, username="serve-dev")
        auditor = make_user(Role.COMPLIANCE_OFFICER, username="serve-cora")
        stack.keys["inference"] = api_key_create(
            actor=developer, owner=developer, name="app", scopes=[Scope.INFERENCE]
        ).secret
        stack.keys["registry-only"] = api_key_create(
            actor=developer, owner=developer, name="reader", scopes=[Scope.REGISTRY_READ]
        ).secret
        stack.keys["compliance"] = api_key_create(
            actor=auditor, owner=auditor, name="audit", scopes=[Scope.REGISTRY_READ]
        ).secret
        stack.start_worker(stack.worker)
        server, stack.url = start_web_server(env=env, log=logs / "uvicorn.log")
        stack.processes.append(server)
        stack.deploy("gemma", context_length=512, preset="precise", logging_level="hashed")
        try:
            yield stack
        finally:
            stop_processes(stack.processes)
            call_command("flush", interactive=False, verbosity=0)
            settings.ARTIFACT_ROOT, settings.WORKER_OFFLINE_AFTER = original


@pytest.fixture
def openai_client(stack):
    from openai import OpenAI

    return OpenAI(base_url=f"{stack.url}/v1", api_key=stack.key(), max_retries=0, timeout=60)


__all__ = ["PASSWORD", "Stack", "wait_for_state", "wait_until"]


@pytest.fixture(autouse=True)
def committed_db(django_db_blocker):
    """The worker and the web server are other processes: tests here write committed rows
    (no test transaction to roll back; the package flushes the database at its end)."""
    with django_db_blocker.unblock():
        yield
