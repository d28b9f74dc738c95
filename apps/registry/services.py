"""The model registry: repos and their immutable versions (ingest, approve, deprecate,
verify), the check a version passes before it is deployed, and licence overrides.

Files arrive through ``uploads`` (a browser or API upload), ``model_imports`` (Hugging
Face) or ``bundled`` (the default model); each ends in ``model_version_ingest``. The
artifact store and file-name checks are ``artifacts``; licence expressions ``licences``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from django.conf import settings
from django.core.exceptions import PermissionDenied, ValidationError
from django.db import transaction
from django.urls import reverse
from django.utils import timezone

from apps.accounts.models import Role, User
from apps.accounts.services import require_role
from apps.audit.models import Outcome
from apps.audit.services import audit_record
from apps.registry.artifacts import artifact_store, check_file_name
from apps.registry.licences import licence_check, licence_not_allowed, version_licence
from apps.registry.models import (
    APPROVER_ROLES,
    WRITER_ROLES,
    Artifact,
    Format,
    LicenceOverride,
    ModelRepo,
    ModelVersion,
    SourceKind,
    State,
)
from workers.artifacts import IntegrityError, Staged
from workers.gguf_meta import InvalidGGUF, read_metadata_cached


@transaction.atomic
def model_repo_create(
    *,
    actor: User,
    name: str,
    licence: str,
    description: str = "",
    licence_url: str = "",
    tags: Sequence[str] = (),
) -> ModelRepo:
    """Create an empty model repository that versions are then added to."""
    require_role(actor, WRITER_ROLES, "create models")
    repo = ModelRepo(
        name=name.strip().lower(),
        licence=licence_check(licence),
        description=description,
        licence_url=licence_url,
        tags=sorted({t.strip() for t in tags if t.strip()}),
        owner=actor if not actor.is_system else None,
    )
    repo.full_clean()
    repo.save()
    audit_record(
        actor=actor,
        action="model_repo.create",
        target=repo,
        details={"licence": repo.licence, "tags": repo.tags},
    )
    return repo


def repo_writable_by(user: User, repo: ModelRepo) -> bool:
    """Data scientists add to the models they created; admins (and the system) to any."""
    if user.is_system or user.role == Role.ADMIN:
        return True
    return user.has_role(*WRITER_ROLES) and repo.owner_id == user.pk


def require_repo_writer(actor: User, repo: ModelRepo, doing: str) -> None:
    require_role(actor, WRITER_ROLES, doing)
    if not repo_writable_by(actor, repo):
        raise PermissionDenied(f"Only the model's owner or an admin may {doing}.")


@dataclass(frozen=True)
class IngestResult:
    version: ModelVersion
    created: bool  # False: the same file was already a version of this repo


def model_version_ingest(
    *,
    actor: User,
    repo: ModelRepo,
    staged: Staged,
    file_name: str,
    source_kind: SourceKind,
    source: dict[str, Any],
    parents: Sequence[ModelVersion] = (),
    peft_config: dict[str, Any] | None = None,
) -> IngestResult:
    """Turn a received file into an immutable version of ``repo``.

    Checks the name and format, parses GGUF metadata (a file that does not parse is
    refused and removed), stores the content once under its sha256 and records
    provenance. The same file uploaded again returns the existing version. Whatever
    fails, no stray file or row is left behind.
    """
    newly_stored = False
    try:
        require_repo_writer(actor, repo, "add versions to it")
        if peft_config is not None:
            return _ingest_peft(
                actor=actor,
                repo=repo,
                staged=staged,
                file_name=file_name,
                config=peft_config,
                source_kind=source_kind,
                source=source,
                parents=parents,
            )
        file_name = check_file_name(file_name)
        existing = repo.versions.filter(artifact_id=staged.sha256).first()
        if existing is not None:
            return IngestResult(existing, created=False)
        try:
            meta = read_metadata_cached(staged.path, staged.sha256)
        except InvalidGGUF as exc:
            raise ValidationError(f"{file_name!r} is not a usable GGUF file: {exc}") from exc
        is_lora = meta.gguf_type == "adapter" and meta.adapter_type == "lora"
        with transaction.atomic():
            ModelRepo.objects.select_for_update().get(pk=repo.pk)
            artifact, _ = Artifact.objects.get_or_create(
                sha256=staged.sha256, defaults={"size": staged.size}
            )
            _, newly_stored = artifact_store().commit(staged)
            number = (
                repo.versions.order_by("-number").values_list("number", flat=True).first() or 0
            ) + 1
            version = ModelVersion.objects.create(
                repo=repo,
                number=number,
                artifact=artifact,
                file_name=file_name,
                format=Format.GGUF_LORA if is_lora else Format.GGUF_MODEL,
                metadata=meta.as_dict(),
                architecture=meta.architecture,
                parameter_count=meta.parameter_count,
                quantization=meta.file_type,
                context_length=meta.context_length,
                layers=meta.layers,
                embedding_size=meta.embedding_size,
                vocab_size=meta.vocab_size,
                has_chat_template=meta.has_chat_template,
                source_kind=source_kind,
                source=source,
                created_by=actor,
            )
            version.parents.set(parents)
            audit_record(
                actor=actor,
                action="model_version.create",
                target=version,
                details={
                    "sha256": staged.sha256,
                    "size": staged.size,
                    "file_name": file_name,
                    "format": version.format,
                    "source_kind": str(source_kind),
                    "source": source,
                    "parents": [p.pk for p in parents],
                    "architecture": meta.architecture,
                    "quantization": meta.file_type,
                },
            )
        return IngestResult(version, created=True)
    except BaseException:
        if newly_stored and not Artifact.objects.filter(sha256=staged.sha256).exists():
            artifact_store().remove(staged.sha256)
        raise
    finally:
        staged.discard()  # a no-op once committed


def _ingest_peft(
    *,
    actor: User,
    repo: ModelRepo,
    staged: Staged,
    file_name: str,
    config: dict[str, Any],
    source_kind: SourceKind,
    source: dict[str, Any],
    parents: Sequence[ModelVersion],
) -> IngestResult:
    """A PEFT LoRA adapter as fine-tunes produce it: safetensors weights (no code runs on
    load), its adapter_config.json kept as the version's metadata."""
    from safetensors import SafetensorError, safe_open

    if PurePosixPath(file_name).suffix != ".safetensors" or PurePosixPath(file_name).name != (
        file_name
    ):
        raise ValidationError(f"{file_name!r} is not a safetensors file name.")
    existing = repo.versions.filter(artifact_id=staged.sha256).first()
    if existing is not None:
        return IngestResult(existing, created=False)
    try:
        with safe_open(str(staged.path), framework="numpy") as weights:
            tensors = len(list(weights.keys()))
    except (SafetensorError, OSError) as exc:
        raise ValidationError(f"{file_name!r} is not a readable safetensors file: {exc}") from exc
    with transaction.atomic():
        ModelRepo.objects.select_for_update().get(pk=repo.pk)
        artifact, _ = Artifact.objects.get_or_create(
            sha256=staged.sha256, defaults={"size": staged.size}
        )
        artifact_store().commit(staged)
        latest = repo.versions.order_by("-number").values_list("number", flat=True).first()
        version = ModelVersion.objects.create(
            repo=repo,
            number=(latest or 0) + 1,
            artifact=artifact,
            file_name=file_name,
            format=Format.PEFT_SAFETENSORS,
            metadata={"adapter_config": config, "tensors": tensors},
            source_kind=source_kind,
            source=source,
            created_by=actor,
        )
        version.parents.set(parents)
        audit_record(
            actor=actor,
            action="model_version.create",
            target=version,
            details={
                "sha256": staged.sha256,
                "size": staged.size,
                "file_name": file_name,
                "format": version.format,
                "source_kind": str(source_kind),
                "source": source,
                "parents": [p.pk for p in parents],
            },
        )
    return IngestResult(version, created=True)


def model_version_import_path(*, actor: User, repo: ModelRepo, path: str) -> IngestResult:
    """Import a file that already sits on the server, under an allowed import directory."""
    require_role(actor, (Role.ADMIN,), "import files from the server")
    if "\x00" in path:
        # The filesystem cannot hold it, and os calls would raise ValueError on it.
        raise ValidationError("The path contains a NUL character.")
    requested = Path(path)
    resolved = requested.resolve()
    allowed = [d.resolve() for d in settings.IMPORT_DIRS]
    if not any(resolved.is_relative_to(d) for d in allowed):
        raise ValidationError(
            f"{path!r} is not under an allowed import directory "
            f"({', '.join(map(str, allowed)) or 'none configured: set AIBOX_IMPORT_DIRS'})."
        )
    if not resolved.is_file():
        raise ValidationError(f"{path!r} is not a file.")
    check_file_name(resolved.name)
    staged = artifact_store().stage_copy(resolved, max_bytes=settings.UPLOAD_MAX_BYTES)
    return model_version_ingest(
        actor=actor,
        repo=repo,
        staged=staged,
        file_name=resolved.name,
        source_kind=SourceKind.SERVER_PATH,
        source={"path": str(resolved)},
    )


def _set_state(*, actor: User, version: ModelVersion, state: State, reason: str, action: str):
    reason = reason.strip()
    if not reason:
        verb = "approved" if state == State.APPROVED else "deprecated"
        raise ValidationError(f"Say why this version is {verb}.")
    previous = version.state
    version.state = state
    version.state_changed_by = actor
    version.state_changed_at = timezone.now()
    version.state_reason = reason
    version.save(update_fields=["state", "state_changed_by", "state_changed_at", "state_reason"])
    audit_record(
        actor=actor,
        action=action,
        target=version,
        details={"from": previous, "to": str(state), "reason": reason},
    )
    return version


@transaction.atomic
def model_version_approve(*, actor: User, version: ModelVersion, reason: str) -> ModelVersion:
    """Approve a draft for deployment (admins and compliance officers, with a reason)."""
    require_role(actor, APPROVER_ROLES, "approve model versions")
    if version.state != State.DRAFT:
        raise ValidationError(f"Only a draft can be approved; this version is {version.state}.")
    return _set_state(
        actor=actor,
        version=version,
        state=State.APPROVED,
        reason=reason,
        action="model_version.approve",
    )


@transaction.atomic
def model_version_deprecate(*, actor: User, version: ModelVersion, reason: str) -> ModelVersion:
    """Retire a version: it stays on record but can no longer be deployed."""
    require_role(actor, APPROVER_ROLES, "deprecate model versions")
    if version.state == State.DEPRECATED:
        raise ValidationError("This version is already deprecated.")
    return _set_state(
        actor=actor,
        version=version,
        state=State.DEPRECATED,
        reason=reason,
        action="model_version.deprecate",
    )


def model_version_verify(*, actor: User, version: ModelVersion) -> Path:
    """Re-hash the stored file before it is served or trained on.

    A file that changed on disk is refused and the refusal is audited. Call this
    outside any enclosing transaction, so the audit event survives the refusal.
    """
    try:
        path = artifact_store().verify(version.sha256)
    except IntegrityError as exc:
        Artifact.objects.filter(pk=version.sha256, integrity_failed_at__isnull=True).update(
            integrity_failed_at=timezone.now(), integrity_failure=str(exc)
        )
        audit_record(
            actor=actor,
            action="artifact.integrity_failure",
            target=version,
            outcome=Outcome.FAILURE,
            details={"sha256": version.sha256, "reason": str(exc)},
        )
        raise
    Artifact.objects.filter(pk=version.sha256).update(
        last_verified_at=timezone.now(), integrity_failed_at=None, integrity_failure=""
    )
    return path


def model_version_deploy_check(*, version: ModelVersion) -> None:
    """Refuse (ValidationError, saying why and what to do) a version whose stored file
    failed its last verification, or whose licence names a term that is neither on
    AIBOX_DEPLOY_LICENCE_ALLOWLIST nor covered by an admin's licence override."""
    failed_at, failure = Artifact.objects.filter(pk=version.sha256).values_list(
        "integrity_failed_at", "integrity_failure"
    )[0]
    if failed_at is not None:
        raise ValidationError(
            f"{version} cannot be served: its stored file failed verification on "
            f"{failed_at:%Y-%m-%d %H:%M} UTC ({failure}). Restore the file; it is served "
            "again once it verifies."
        )
    licence = version_licence(version)
    blocked = licence_not_allowed(licence)
    covered = {
        t for terms in version.licence_overrides.values_list("terms", flat=True) for t in terms
    }
    missing = [t for t in blocked if t not in covered]
    if missing:
        raise ValidationError(
            f"{version} is under the licence {licence}; {', '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} not on the deployment allow-list "
            "(AIBOX_DEPLOY_LICENCE_ALLOWLIST). An admin can record a licence override with "
            f"a reason on the version's page ({reverse('registry:version', args=[version.pk])}) "
            f"or with POST /api/v1/registry/versions/{version.pk}/licence-overrides."
        )


@transaction.atomic
def licence_override_create(*, actor: User, version: ModelVersion, reason: str) -> LicenceOverride:
    """Record an admin's decision that ``version`` may be deployed although its licence
    names terms not on the deployment allow-list (audited, with the reason)."""
    require_role(actor, (Role.ADMIN,), "override licence checks")
    reason = reason.strip()
    if not reason:
        raise ValidationError("Say why this licence may be deployed.")
    licence = version_licence(version)
    terms = licence_not_allowed(licence)
    if not terms:
        raise ValidationError(
            f"{version}'s licence {licence} is on the deployment allow-list: no override is needed."
        )
    override = LicenceOverride.objects.create(
        version=version, licence=licence, terms=terms, reason=reason, created_by=actor
    )
    audit_record(
        actor=actor,
        action="model_version.licence_override",
        target=version,
        details={"override": override.pk, "licence": licence, "terms": terms, "reason": reason},
    )
    return override
