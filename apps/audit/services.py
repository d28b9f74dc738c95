"""Writing the audit log. The log sits below every app, accounts included
(docs/architecture.md, Layers), so an actor is any Django user; an event copies its name."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.contrib.auth.models import AbstractUser
from django.core.exceptions import ValidationError
from django.db import connection, models, transaction
from django.utils import timezone

from apps.audit.chain import GENESIS_HASH, compute_hash, format_timestamp
from apps.audit.context import current_source
from apps.audit.exports import FORMATS, ExportPlan
from apps.audit.models import AuditEvent, Outcome
from apps.audit.selectors import AuditFilters, audit_head_seq, audit_seq_bounds
from apps.audit.signing import PublicKey, create_key

SIGNING_KEY_CREATED = "audit.signing_key.create"
# pg_advisory_xact_lock key that serialises appends to the chain ("AUDIT" in ASCII).
AUDIT_CHAIN_LOCK = 0x4155444954

# Keys whose values never belong in an audit record, at any depth of ``details``.
_SECRET_KEYS = frozenset({"password", "secret", "token", "api_key", "key", "authorization"})


def _scrub(value: Any) -> Any:
    if isinstance(value, dict):
        return {
            k: ("[redacted]" if str(k).lower() in _SECRET_KEYS else _scrub(v))
            for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return [_scrub(v) for v in value]
    return value


def audit_record(
    *,
    actor: AbstractUser | None,
    action: str,
    target: models.Model | None = None,
    target_type: str = "",
    target_id: str = "",
    target_label: str = "",
    outcome: Outcome = Outcome.SUCCESS,
    details: dict[str, Any] | None = None,
    actor_label: str = "",
) -> AuditEvent:
    """Append one event to the audit chain; the only way to write an audit event.

    Call it inside the service's transaction so the event commits or rolls back with
    the change it describes. Appends are serialised by a transaction-scoped advisory
    lock, so concurrent writers always extend the chain from its committed head.
    ``actor=None`` records an anonymous actor (a failed login, say); pass
    ``actor_label`` to say who it claimed to be.
    """
    if target is not None:
        target_type = target_type or target._meta.label_lower
        target_id = target_id or str(target.pk)
        target_label = target_label or str(target)
    source = current_source()
    label = actor_label or (actor.username if actor is not None else "anonymous")
    with transaction.atomic():
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_xact_lock(%s)", [AUDIT_CHAIN_LOCK])
        head = AuditEvent.objects.order_by("-seq").values("seq", "hash").first()
        fields: dict[str, Any] = {
            "seq": head["seq"] + 1 if head else 1,
            "created_at": timezone.now(),
            "actor_label": label[:200],
            "action": action,
            "target_type": target_type[:100],
            "target_id": str(target_id)[:100],
            "target_label": target_label[:300],
            "outcome": str(outcome),
            "source_ip": source.ip if source else None,
            "user_agent": source.user_agent if source else "",
            "details": _scrub(details or {}),
        }
        prev_hash = head["hash"] if head else GENESIS_HASH
        return AuditEvent.objects.create(
            actor=actor if actor is not None and actor.pk else None,
            prev_hash=prev_hash,
            hash=compute_hash(prev_hash, fields),
            **fields,
        )


def audit_export_begin(*, actor: AbstractUser, filters: AuditFilters, fmt: str) -> ExportPlan:
    """Record an export of a filtered view and fix what it covers.

    The export lists matching events up to the head of the log as it is now; its own
    ``audit.export`` event, written here, comes after that head. Returns the
    ``ExportPlan`` that ``apps.audit.exports.stream_export`` writes out.
    """
    if fmt not in FORMATS:
        raise ValueError(f"Unknown export format {fmt!r}; use one of {', '.join(FORMATS)}.")
    with transaction.atomic():
        head = audit_head_seq()
        bounds = audit_seq_bounds(filters=filters, up_to_seq=head)
        event = audit_record(
            actor=actor,
            action="audit.export",
            details={
                "format": fmt,
                "filters": filters.as_dict(),
                "log_head_seq": head,
                "range": list(bounds) if bounds else None,
            },
        )
    return ExportPlan(
        fmt=fmt,
        filters=filters,
        head_seq=head,
        bounds=bounds,
        export_event_seq=event.seq,
        generated_at=format_timestamp(event.created_at),
        generated_by=event.actor_label,
    )


def audit_signing_key_create(*, actor: AbstractUser, replace_lost_key: bool = False) -> PublicKey:
    """Create the box's audit signing key (``settings.AUDIT_SIGNING_KEY_FILE``); audited
    as ``audit.signing_key.create`` with its fingerprint.

    Refused while the file exists. Refused too when the log records an earlier key, whose
    file must then have been lost: restoring it keeps old exports and checkpoints
    verifiable, so a new key needs ``replace_lost_key`` and names the key it replaces.
    """
    path = settings.AUDIT_SIGNING_KEY_FILE
    if path.exists():
        raise ValidationError(f"The audit signing key {path} exists already.")
    earlier = (
        AuditEvent.objects.filter(action=SIGNING_KEY_CREATED)
        .order_by("-seq")
        .values("details", "created_at")
        .first()
    )
    if earlier is not None and not replace_lost_key:
        raise ValidationError(
            f"The audit signing key created on {earlier['created_at']:%Y-%m-%d} (sha256 "
            f"{earlier['details']['fingerprint'][:16]}…) is missing from {path}. Restore it "
            "from backup; only if it is lost for good, replace it with --replace-lost-key."
        )
    with transaction.atomic():
        key = create_key(path)
        audit_record(
            actor=actor,
            action=SIGNING_KEY_CREATED,
            target_type="audit_signing_key",
            target_id=key.fingerprint,
            target_label=str(path),
            details={
                "fingerprint": key.fingerprint,
                "replaces": earlier["details"]["fingerprint"] if earlier else None,
            },
        )
    return key
