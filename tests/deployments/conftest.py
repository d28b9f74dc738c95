"""A registered, approved tiny model to deploy."""

from __future__ import annotations

import pytest

from apps.accounts.models import Role
from apps.registry.models import SourceKind
from apps.registry.services import (
    artifact_store,
    model_repo_create,
    model_version_approve,
    model_version_ingest,
)
from tests.registry.conftest import write_tiny_gguf


@pytest.fixture
def version(users, settings, tmp_path):
    settings.ARTIFACT_ROOT = tmp_path / "artifacts"
    admin = users[Role.ADMIN]
    repo = model_repo_create(actor=admin, name="tiny", licence="mit")
    staged = artifact_store().stage_copy(write_tiny_gguf(tmp_path / "tiny.gguf"))
    version = model_version_ingest(
        actor=admin,
        repo=repo,
        staged=staged,
        file_name="tiny.gguf",
        source_kind=SourceKind.UPLOAD,
        source={},
    ).version
    return model_version_approve(actor=admin, version=version, reason="test")
