"""A live stack for setups: a real serving Celery worker with the bundled Gemma model
registered and approved, and uvicorn for the browser test.

The worker and the web server are other processes, so rows are committed and the
database is flushed when the package's tests end.
"""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from django.conf import settings
from django.core.management import call_command
from gguf import GGUFWriter

from apps.accounts.models import Role, User
from apps.accounts.services import system_user
from apps.registry.bundled import model_register_bundled
from apps.registry.models import ModelVersion
from apps.registry.services import model_repo_create, model_version_approve
from tests.conftest import make_user
from tests.live import process_env, start_celery_worker, start_web_server, stop_processes
from tests.registry.conftest import upload_version

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class SetupStack:
    url: str
    worker: str
    version: ModelVersion
    admin: User
    env: dict[str, str]
    processes: list[subprocess.Popen] = field(default_factory=list)


@pytest.fixture(scope="package")
def stack(test_database, django_db_blocker, tmp_path_factory) -> Iterator[SetupStack]:
    logs = tmp_path_factory.mktemp("setups-logs")
    artifacts = tmp_path_factory.mktemp("artifacts")
    cache = tmp_path_factory.mktemp("model-cache")
    env = process_env(AIBOX_ARTIFACT_ROOT=str(artifacts), AIBOX_MODEL_CACHE_DIR=str(cache))
    original = settings.ARTIFACT_ROOT
    settings.ARTIFACT_ROOT = artifacts
    subprocess.run(
        [sys.executable, "manage.py", "collectstatic", "--no-input", "-v", "0"],
        cwd=ROOT,
        env=env,
        check=True,
    )
    processes: list[subprocess.Popen] = []
    with django_db_blocker.unblock():
        try:
            admin = make_user(Role.ADMIN, username="setup-admin")
            version = model_register_bundled(actor=system_user()).version
            worker = f"setups-{uuid.uuid4().hex[:6]}@localhost"
            processes.append(start_celery_worker(env=env, name=worker, log=logs / "worker.log"))
            server, url = start_web_server(env=env, log=logs / "uvicorn.log")
            processes.append(server)
            yield SetupStack(url, worker, version, admin, env, processes)
        finally:
            stop_processes(processes)
            call_command("flush", interactive=False, verbosity=0)
            settings.ARTIFACT_ROOT = original


@pytest.fixture(autouse=True)
def committed_db(django_db_blocker):
    with django_db_blocker.unblock():
        yield


def write_shaped_gguf(
    path: Path, *, context: int, blocks: int, embedding: int, arch: str = "llama"
) -> Path:
    """A few-KB GGUF whose metadata claims a model shape: the advisor sizes the KV cache
    from it, so a claimed large shape is a model no worker here can hold."""
    writer = GGUFWriter(str(path), arch=arch)
    writer.add_name("shaped-test-model")
    writer.add_context_length(context)
    writer.add_block_count(blocks)
    writer.add_embedding_length(embedding)
    writer.add_file_type(0)

    writer.add_tensor("token_embd.weight", np.zeros((32, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture
def huge_version(stack, tmp_path) -> ModelVersion:
    repo = model_repo_create(actor=stack.admin, name=f"huge-{uuid.uuid4().hex[:4]}", licence="mit")
    path = write_shaped_gguf(tmp_path / "huge.gguf", context=131_072, blocks=400, embedding=16_384)
    version = upload_version(stack.admin, repo, path)
    return model_version_approve(actor=stack.admin, version=version, reason="test")
