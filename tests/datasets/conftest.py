"""Dataset tests run their validation and derivation jobs on a real Celery worker."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from apps.accounts.models import Role, User
from apps.datasets.models import Dataset, DatasetVersion, State
from apps.datasets.services import dataset_create
from tests.conftest import client_for
from tests.live import wait_until

CHAT_ROWS = [
    {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]},
    {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Capital of France?"},
            {"role": "assistant", "content": "Paris."},
        ]
    },
]


def jsonl(rows: list) -> bytes:
    """JSON Lines; a str item is written as is (a deliberately broken line)."""
    return b"".join(
        (row if isinstance(row, str) else json.dumps(row)).encode() + b"\n" for row in rows
    )


@pytest.fixture(autouse=True)
def artifact_root(settings, live_worker) -> Path:
    # The worker process reads the files the test process stores.
    settings.ARTIFACT_ROOT = live_worker.artifact_root
    return live_worker.artifact_root


@pytest.fixture
def dataset(users) -> Dataset:
    return dataset_create(
        actor=users[Role.DATA_SCIENTIST],
        name="support-chats",
        licence="cc-by-4.0",
        source="Helpdesk export, 2026-10",
    )


def upload(user: User, dataset: Dataset, name: str, content: bytes, **fields):
    """POST a file to the REST API the way a client would (multipart)."""
    from django.core.files.uploadedfile import SimpleUploadedFile

    client = client_for(user)
    data = {"file": SimpleUploadedFile(name, content), **fields}
    return client.post(f"/api/v1/datasets/{dataset.name}/versions/", data)


def wait_validated(pk: int) -> DatasetVersion:
    def done():
        version = DatasetVersion.objects.get(pk=pk)
        return version if version.state != State.VALIDATING else None

    return wait_until(done, what=f"dataset version {pk} finishing validation", timeout=120)
