"""The registry's artifact store: where files live, which names may come in, and
the periodic care of what is stored (staging left by crashes, re-verification)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import PurePosixPath, PureWindowsPath

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured, ValidationError
from django.db import transaction
from django.db.models import F
from django.utils import timezone

from apps.accounts.models import Role, User
from apps.accounts.services import require_role
from apps.audit.models import Outcome
from apps.audit.services import audit_record
from apps.registry.models import Artifact, ModelVersion
from workers.artifacts import ArtifactStore, IntegrityError

# Formats that run code when loaded (Python pickle): never accepted.
PICKLE_SUFFIXES = frozenset({".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib"})


ACCEPTED_SUFFIXES = frozenset({".gguf"})


def artifact_store() -> ArtifactStore:
    return ArtifactStore(settings.ARTIFACT_ROOT)


def checked_file_name(name: str, *, accepted: frozenset[str], advice: str, kinds: str) -> str:
    """A display name for an incoming file (a model's or a dataset's); it never becomes
    a path on disk. ``accepted`` suffixes; ``kinds`` names them for a refused file; a
    pickle-based file is refused with ``advice`` on what to send instead."""
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
            f"loaded. {advice}"
        )
    if suffix not in accepted:
        raise ValidationError(f"{name!r} is not a supported {kinds}.")
    return name


def check_file_name(name: str) -> str:
    """A model file's display name (GGUF only)."""
    return checked_file_name(
        name,
        accepted=ACCEPTED_SUFFIXES,
        advice="AIBox refuses it: convert the model to GGUF.",
        kinds="model file: AIBox accepts GGUF (.gguf) files",
    )


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
    require_role(actor, (Role.ADMIN,), "re-verify stored files")
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
            "apps.registry.artifacts.artifact_users_source; it is not installed."
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
