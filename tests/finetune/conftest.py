"""Fine-tunes run for real: a training worker (the ``training`` queue, one job at a
time) next to the control worker, both on the test database, training Gemma 3 270M."""

from __future__ import annotations

from pathlib import Path

import pytest

from apps.accounts.models import Role
from apps.accounts.services import system_user
from apps.datasets.models import DatasetVersion
from apps.datasets.services import dataset_create
from apps.registry.bundled import model_register_bundled
from apps.registry.models import ModelVersion
from tests.datasets.conftest import jsonl, upload, wait_validated


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
