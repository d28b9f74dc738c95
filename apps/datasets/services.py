"""Datasets: bring training data in, validate it, derive versions from it.

Every version is an immutable file in the content-addressed artifact store. Validation
and derivations run as Celery jobs that stream the file once through ``workers.datasets``
(no Django there); these services hold the rules, the rows and the audit trail.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from django.core.exceptions import PermissionDenied, ValidationError
from django.db import transaction
from django.utils import timezone

from aibox.celery import app as celery_app
from apps.accounts.models import Role, User
from apps.accounts.services import require_role, system_user
from apps.audit.models import Outcome
from apps.audit.services import audit_record
from apps.datasets.models import (
    WRITER_ROLES,
    Dataset,
    DatasetVersion,
    Shape,
    SourceKind,
    State,
)
from apps.registry.artifacts import artifact_store, checked_file_name
from apps.registry.models import Artifact, ModelVersion
from apps.registry.models import Format as ModelFormat
from workers import datasets as data
from workers.artifacts import Staged

log = logging.getLogger(__name__)

ACCEPTED_SUFFIXES = frozenset({".jsonl", ".json", ".csv", ".parquet"})
MAX_ERRORS_SHOWN = 200
RESERVED_NAMES = frozenset({"versions", "imports"})  # URL segments under /datasets/
PROGRESS_EVERY_SECONDS = 0.5


def check_file_name(name: str) -> str:
    """A data file's display name; it never becomes a path on disk."""
    return checked_file_name(
        name,
        accepted=ACCEPTED_SUFFIXES,
        advice="Export the data as JSON Lines, CSV or Parquet.",
        kinds="data file: use JSON Lines (.jsonl), CSV (.csv) or Parquet (.parquet)",
    )


def require_dataset_writer(actor: User, dataset: Dataset, doing: str) -> None:
    """Data scientists change their own datasets; admins (and the system) any."""
    require_role(actor, WRITER_ROLES, doing)
    if actor.is_system or actor.role == Role.ADMIN or dataset.owner_id == actor.pk:
        return
    raise PermissionDenied(f"Only the dataset's owner or an admin may {doing}.")


def clean_column_mapping(mapping: dict[str, Any] | None) -> dict[str, str]:
    fields = {"messages", "instruction", "input", "output", "prompt", "completion", "text"}
    mapping = mapping or {}
    if not isinstance(mapping, dict):
        raise ValidationError("The column mapping must map field names to column names.")
    cleaned: dict[str, str] = {}
    for field, column in mapping.items():
        if field not in fields:
            raise ValidationError(
                f"{field!r} is not a dataset field; map one of: {', '.join(sorted(fields))}."
            )
        if not isinstance(column, str) or not column.strip():
            raise ValidationError(f"Name the column that holds {field!r}.")
        cleaned[field] = column.strip()
    return cleaned


def parse_column_mapping(text: str) -> dict[str, str]:
    """``prompt=question, completion=answer`` → ``{"prompt": "question", …}``."""
    mapping: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in text.replace("\n", ",").split(","))):
        field, sep, column = part.partition("=")
        if not sep:
            raise ValidationError(f"Write each mapping as field=column; {part!r} has no '='.")
        mapping[field.strip()] = column.strip()
    return clean_column_mapping(mapping)


@transaction.atomic
def dataset_create(
    *, actor: User, name: str, licence: str, description: str = "", source: str = ""
) -> Dataset:
    """Create an empty dataset owned by ``actor``; versions are then added to it."""
    require_role(actor, WRITER_ROLES, "create datasets")
    dataset = Dataset(
        name=name.strip().lower(),
        licence=licence.strip(),
        description=description,
        source=source,
        owner=None if actor.is_system else actor,
    )
    if dataset.name in RESERVED_NAMES:
        raise ValidationError(f"{dataset.name!r} is a reserved name; choose another.")
    dataset.full_clean()
    dataset.save()
    audit_record(
        actor=actor,
        action="dataset.create",
        target=dataset,
        details={"licence": dataset.licence, "source": dataset.source},
    )
    return dataset


def tokenizer_check(tokenizer: ModelVersion | None, max_tokens: int | None) -> None:
    """Raise ValidationError unless rows can be counted with ``tokenizer`` (a GGUF model)
    against ``max_tokens`` (positive, within its context)."""
    if tokenizer is not None and tokenizer.format != ModelFormat.GGUF_MODEL:
        raise ValidationError(f"{tokenizer} is not a model: pick a GGUF model for token counts.")
    if max_tokens is not None:
        if tokenizer is None:
            raise ValidationError("A token limit needs a model whose tokenizer counts the tokens.")
        if max_tokens < 1:
            raise ValidationError("The token limit must be a positive number.")
        if tokenizer.context_length and max_tokens > tokenizer.context_length:
            raise ValidationError(
                f"The token limit {max_tokens:,} is above {tokenizer}'s context of "
                f"{tokenizer.context_length:,} tokens."
            )


def dataset_version_ingest(
    *,
    actor: User,
    dataset: Dataset,
    staged: Staged,
    file_name: str,
    source_kind: SourceKind,
    source: dict[str, Any],
    declared_shape: str = "",
    column_mapping: dict[str, str] | None = None,
    tokenizer: ModelVersion | None = None,
    max_tokens: int | None = None,
    parent: DatasetVersion | None = None,
    transformation: dict[str, Any] | None = None,
) -> DatasetVersion:
    """Store a received file as a new version of ``dataset`` and queue its validation.

    The name, format and settings are checked first: a file that is not data (binary,
    empty, an unsupported format) is refused with the reason and nothing is kept.
    Whatever fails, no stray file or row is left behind.
    """
    newly_stored = False
    try:
        require_dataset_writer(actor, dataset, "add dataset versions")
        file_name = check_file_name(file_name)
        if declared_shape and declared_shape not in Shape.values:
            raise ValidationError(f"{declared_shape!r} is not a dataset shape.")
        column_mapping = clean_column_mapping(column_mapping)
        tokenizer_check(tokenizer, max_tokens)
        try:
            fmt = data.sniff_format(staged.path, file_name)
        except data.DatasetError as exc:
            raise ValidationError(f"{file_name!r} was refused: {exc}") from exc
        with transaction.atomic():
            Dataset.objects.select_for_update().get(pk=dataset.pk)
            artifact, _ = Artifact.objects.get_or_create(
                sha256=staged.sha256, defaults={"size": staged.size}
            )
            _, newly_stored = artifact_store().commit(staged)
            number = (
                dataset.versions.order_by("-number").values_list("number", flat=True).first() or 0
            ) + 1
            version = DatasetVersion.objects.create(
                dataset=dataset,
                number=number,
                artifact=artifact,
                file_name=file_name,
                format=str(fmt),
                declared_shape=declared_shape,
                column_mapping=column_mapping,
                tokenizer=tokenizer,
                max_tokens=max_tokens,
                source_kind=source_kind,
                source=source,
                parent=parent,
                transformation=transformation or {},
                created_by=actor,
            )
            audit_record(
                actor=actor,
                action="dataset_version.create",
                target=version,
                details={
                    "sha256": staged.sha256,
                    "size": staged.size,
                    "file_name": file_name,
                    "format": version.format,
                    "source_kind": str(source_kind),
                    "source": source,
                    "parent": parent.pk if parent else None,
                    "transformation": transformation or {},
                    "column_mapping": column_mapping,
                },
            )
            transaction.on_commit(lambda: _enqueue_validation(version.pk))
        return version
    except BaseException:
        if newly_stored and not Artifact.objects.filter(sha256=staged.sha256).exists():
            artifact_store().remove(staged.sha256)
        raise
    finally:
        staged.discard()  # a no-op once committed


def _enqueue_validation(version_id: int) -> None:
    # Sent by name (apps/datasets/tasks.py): the tasks import this module, not the reverse.
    celery_app.send_task("datasets.version_validate", args=[version_id])


def reading_options(version: DatasetVersion, *, tokenize: bool = True) -> data.ValidationOptions:
    """How ``workers.datasets`` should read this version (its shape, mapping, limits)."""
    counter = None
    if tokenize and version.tokenizer is not None:
        from workers.datasets.tokens import llama_token_counter

        counter = llama_token_counter(artifact_store().verify(version.tokenizer.sha256))
    return data.ValidationOptions(
        shape=data.Shape(version.declared_shape) if version.declared_shape else None,
        column_mapping=dict(version.column_mapping),
        tokenize=counter,
        max_tokens=version.max_tokens if counter else None,
        max_errors_kept=MAX_ERRORS_SHOWN,
    )


def _rejection_reason(report: data.Report) -> str:
    first = report.errors[0] if report.errors else None
    where = f" The first: line {first.line}: {first.message}" if first else ""
    rows = "row" if report.error_count == 1 else "rows"
    return f"{report.error_count:,} {rows} failed validation.{where}"


def dataset_version_validate(*, version_id: int) -> DatasetVersion | None:
    """Validate a version's file (the validation job's body).

    Streams the file once; writes the report, the counts and the state. Running it
    twice (a redelivered task) is harmless: only a version still validating is updated.
    """
    version = (
        DatasetVersion.objects.select_related("artifact", "tokenizer", "dataset")
        .filter(pk=version_id)
        .first()
    )
    if version is None or version.state != State.VALIDATING:
        return version
    path = artifact_store().path_for(version.sha256)
    last = 0.0

    def progress(done: int, total: int) -> None:
        nonlocal last
        now = time.monotonic()
        if now - last >= PROGRESS_EVERY_SECONDS or done >= total:
            last = now
            DatasetVersion.objects.filter(pk=version_id, state=State.VALIDATING).update(
                progress_bytes=done
            )

    try:
        report = data.validate(
            path, data.FileFormat(version.format), reading_options(version), progress
        )
    except (data.DatasetError, ValidationError, OSError) as exc:
        reason = " ".join(exc.messages) if isinstance(exc, ValidationError) else str(exc)
        return _finish_validation(version, state=State.REJECTED, reason=reason, report=None)
    state = State.VALID if report.error_count == 0 else State.REJECTED
    reason = "" if state == State.VALID else _rejection_reason(report)
    return _finish_validation(version, state=state, reason=reason, report=report)


@transaction.atomic
def _finish_validation(
    version: DatasetVersion, *, state: State, reason: str, report: data.Report | None
) -> DatasetVersion:
    values: dict[str, Any] = {
        "state": state,
        "state_reason": reason,
        "validated_at": timezone.now(),
        "progress_bytes": version.artifact.size,
    }
    if report is not None:
        values |= {
            "shape": str(report.shape) if report.shape else "",
            "rows": report.rows,
            "valid_rows": report.valid_rows,
            "error_count": report.error_count,
            "pii_rows": report.pii_rows,
            "duplicate_rows": report.duplicate_rows,
            "report": report.as_dict(),
        }
    updated = DatasetVersion.objects.filter(pk=version.pk, state=State.VALIDATING).update(**values)
    version.refresh_from_db()
    if not updated:
        return version
    audit_record(
        actor=system_user(),
        action="dataset_version.validated",
        target=version,
        outcome=Outcome.SUCCESS if state == State.VALID else Outcome.FAILURE,
        details={
            "state": str(state),
            "reason": reason,
            "rows": version.rows,
            "valid_rows": version.valid_rows,
            "errors": version.error_count,
            "errors_by_code": (report.errors_by_code if report else {}),
            "personal_data": {k: v["count"] for k, v in (report.pii if report else {}).items()},
            "duplicate_rows": version.duplicate_rows,
        },
    )
    return version


def dataset_version_export_csv(*, actor: User, version: DatasetVersion, out) -> int:
    """Write the version's valid rows as CSV (formula-like cells escaped); audited."""
    if not actor.has_role(Role.COMPLIANCE_OFFICER):
        require_dataset_writer(actor, version.dataset, "export datasets")
    if version.state != State.VALID:
        raise ValidationError(
            f"{version} is {version.get_state_display().lower()}: only a valid version can be "
            "exported (derive a filtered version to drop the rows that failed)."
        )
    path = artifact_store().verify(version.sha256)
    rows = data.export_csv(
        path, data.FileFormat(version.format), reading_options(version, tokenize=False), out
    )
    audit_record(
        actor=actor,
        action="dataset_version.export",
        target=version,
        details={"format": "csv", "rows": rows, "sha256": version.sha256},
    )
    return rows
