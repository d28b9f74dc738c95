"""A registered, approved tiny model to deploy."""

from __future__ import annotations

import pytest
from rest_framework.test import APIClient

from apps.accounts.models import Role
from apps.registry.services import model_repo_create, model_version_approve
from tests.registry.conftest import upload_version, write_tiny_gguf


@pytest.fixture
def version(users, settings, tmp_path):
    settings.ARTIFACT_ROOT = tmp_path / "artifacts"
    admin = users[Role.ADMIN]
    repo = model_repo_create(actor=admin, name="tiny", licence="mit")
    version = upload_version(admin, repo, write_tiny_gguf(tmp_path / "tiny.gguf"))
    return model_version_approve(actor=admin, version=version, reason="test")


def deployment_form(version, **overrides) -> dict:
    """The deployment form as an admin fills it in."""
    data = {
        "name": "tiny-chat",
        "model_version": version.pk,
        "preset": "balanced",
        "context_length": 256,
        "replicas": 1,
        "parallel_slots": 1,
        "gpu_layers": -1,
        "batch_size": 512,
        "logging_level": "metadata",
        "queue_size": 8,
        "queue_timeout_seconds": 60,
        "stream_interval_ms": 50,
        "adapter_scale": 1.0,
    }
    return {**data, **overrides}


def admin_api(users) -> APIClient:
    """The REST API as a signed-in admin."""
    client = APIClient()
    client.force_login(users[Role.ADMIN])
    return client
