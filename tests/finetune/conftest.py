"""Fine-tunes run for real: a training worker (the ``training`` queue, one job at a
time) next to the control worker, both on the test database, training Gemma 3 270M."""

from __future__ import annotations

import os
import signal
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from apps.accounts.models import Role
from apps.accounts.services import system_user
from apps.datasets.models import DatasetVersion
from apps.datasets.services import dataset_create
from apps.registry.models import ModelVersion
from apps.registry.services import model_register_bundled
from tests.datasets.conftest import jsonl, upload, wait_validated
from tests.live import process_env, start_celery_worker, stop_processes

# The converted checkpoint (keyed by the GGUF's sha256) outlives a test run, so only the
# first run on a machine pays for converting the GGUF.
CONVERT_CACHE = Path(
    os.environ.get("AIBOX_TEST_FINETUNE_CACHE", Path.home() / ".cache" / "aibox-test-finetune")
)


# Short, so a test sees a killed worker's job fail within seconds; long enough that a
# busy two-core machine never starves the heartbeat thread that long.
HEARTBEAT_TTL = "8"


@dataclass
class TrainingWorker:
    """The session's training worker, which a test may kill and start again."""

    env: dict[str, str]
    logs: Path
    name: str = ""
    process: subprocess.Popen | None = None

    def start(self) -> None:
        self.name = f"train-{uuid.uuid4().hex[:6]}@localhost"
        self.process = start_celery_worker(
            env=self.env,
            name=self.name,
            log=self.logs / f"{self.name.split('@')[0]}.log",
            pool="solo",
            concurrency=1,
            queues="training",
        )

    def kill(self) -> None:
        """SIGKILL: no warm shutdown, no cleanup, as when a machine loses power."""
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)


@pytest.fixture(scope="session")
def training_worker(live_worker, tmp_path_factory) -> Iterator[TrainingWorker]:
    worker = TrainingWorker(
        env=process_env(
            AIBOX_ARTIFACT_ROOT=str(live_worker.artifact_root),
            # Kept across restarts, so a retried job finds its checkpoints.
            AIBOX_FINETUNE_WORK_DIR=str(tmp_path_factory.mktemp("finetune-work")),
            AIBOX_FINETUNE_CACHE_DIR=str(CONVERT_CACHE),
            AIBOX_FINETUNE_DEVICE="cpu",
            AIBOX_FINETUNE_HEARTBEAT_TTL=HEARTBEAT_TTL,
            AIBOX_WORKER_SERVING="false",
        ),
        logs=tmp_path_factory.mktemp("training-worker"),
    )
    worker.start()
    try:
        yield worker
    finally:
        stop_processes([worker.process])


@pytest.fixture(autouse=True)
def artifact_root(settings, live_worker) -> Path:
    settings.ARTIFACT_ROOT = live_worker.artifact_root
    return live_worker.artifact_root


@pytest.fixture
def gemma() -> ModelVersion:
    return model_register_bundled(actor=system_user()).version


TRAIN_ROWS = [
    {
        "messages": [
            {"role": "user", "content": f"What is the secret word number {i}?"},
            {"role": "assistant", "content": "The secret word is PAPAYA."},
        ]
    }
    for i in range(8)
]


@pytest.fixture
def train_version(users) -> DatasetVersion:
    dana = users[Role.DATA_SCIENTIST]
    dataset = dataset_create(actor=dana, name="secrets", licence="cc-by-4.0")
    response = upload(dana, dataset, "secrets.jsonl", jsonl(TRAIN_ROWS))
    return wait_validated(response.json()["id"])
