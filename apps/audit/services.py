from __future__ import annotations

from typing import Any

from django.db import connection, models, transaction
from django.utils import timezone

from apps.accounts.models import User
from apps.audit.chain import GENESIS_HASH, compute_hash
from apps.audit.context import current_source
from apps.audit.models import AuditEvent, Outcome

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
    actor: User | None,
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
