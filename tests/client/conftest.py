"""The client and the ``aibox`` command against the real stack: uvicorn on a local port,
a serving Celery worker (llama.cpp, the bundled Gemma), the jobs worker and the training
worker, all on the test database. Nothing is mocked; the tests only speak HTTP to it, as
a notebook or a terminal would.

The package shares one stack. Its rows are committed (the processes are others), and the
database is flushed when the package's tests end.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from django.conf import settings
from django.core.management import call_command

from apps.accounts.models import Role
from apps.accounts.services import ROLE_SCOPES, api_key_create, system_user
from apps.registry.bundled import model_register_bundled
from tests.conftest import make_user
from tests.live import process_env, start_celery_worker, start_web_server, stop_processes

ROOT = Path(__file__).resolve().parents[2]
# The console script installed beside the interpreter running the tests (bin/aibox test
# installs ./client into the project's virtual environment).
AIBOX = Path(sys.executable).with_name("aibox")

TRAIN_ROWS = [
    {
        "messages": [
            {"role": "user", "content": f"What is the secret word number {i}?"},
            {"role": "assistant", "content": "The secret word is PAPAYA."},
        ]
    }
    for i in range(8)
]
# A few steps at a high constant rate: quick, and the adapter visibly learns.
FINETUNE_PARAMS = {
    "lora_rank": 4,
    "lora_alpha": 8,
    "max_seq_length": 64,
    "learning_rate": 5e-3,
    "lr_scheduler": "constant",
    "max_steps": 6,
    "checkpoint_every": 50,
}


@dataclass
class Box:
    url: str
    gemma: int  # the bundled model's version id
    keys: dict[Role, str]
    logs: Path
    processes: list[subprocess.Popen] = field(default_factory=list)

    def env(self, role: Role, **extra: str) -> dict[str, str]:
        """An environment for an ``aibox`` process acting as ``role``'s widest key."""
        clean = {k: v for k, v in os.environ.items() if not k.startswith("AIBOX_")}
        return {
            **clean,
            "AIBOX_URL": self.url,
            "AIBOX_API_KEY": self.keys[role],
            # Never the developer's own config file.
            "AIBOX_CONFIG": str(self.logs / "no-such-config.toml"),
            **extra,
        }


@pytest.fixture(scope="package")
def box(
    test_database, django_db_blocker, live_worker, training_worker, tmp_path_factory
) -> Iterator[Box]:
    logs = tmp_path_factory.mktemp("client-stack")
    artifacts = live_worker.artifact_root
    original = settings.ARTIFACT_ROOT
    settings.ARTIFACT_ROOT = artifacts
    env = process_env(
        AIBOX_ARTIFACT_ROOT=str(artifacts),
        AIBOX_MODEL_CACHE_DIR=str(tmp_path_factory.mktemp("client-model-cache")),
        PYTHONUNBUFFERED="1",
        PYTHONFAULTHANDLER="1",
    )
    processes: list[subprocess.Popen] = []
    with django_db_blocker.unblock():
        try:
            keys = {}
            for role in Role:
                user = make_user(role, username=f"client-{role}")
                keys[role] = api_key_create(
                    actor=user, owner=user, name="client", scopes=sorted(ROLE_SCOPES[role])
                ).secret
            gemma = model_register_bundled(actor=system_user()).version
            server, url = start_web_server(env=env, log=logs / "uvicorn.log")
            processes.append(server)
            name = f"serve-client-{uuid.uuid4().hex[:6]}@localhost"
            processes.append(
                start_celery_worker(env=env, name=name, log=logs / "serving-worker.log")
            )
            yield Box(url=url, gemma=gemma.pk, keys=keys, logs=logs, processes=processes)
        finally:
            stop_processes(processes)
            call_command("flush", interactive=False, verbosity=0)
            settings.ARTIFACT_ROOT = original


@pytest.fixture
def client_for(box):
    """``client_for(role)``: an ``AIBox`` with that role's widest key (no progress bars)."""
    from aibox_client import AIBox

    opened = []

    def make(role: Role, **kwargs):
        client = AIBox(box.url, box.keys[role], progress=False, poll_interval=0.5, **kwargs)
        opened.append(client)
        return client

    yield make
    for client in opened:
        client.close()


def run_aibox(box: Box, role: Role, *args: str, **extra_env: str) -> subprocess.CompletedProcess:
    """``aibox ARGS`` as a real process, acting as ``role``."""
    return subprocess.run(
        [str(AIBOX), *args],
        env=box.env(role, **extra_env),
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
