from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from django.db.models import Q, QuerySet

from apps.accounts.models import Role, User
from apps.audit.chain import HASHED_FIELDS, VerifyResult, verify_events
from apps.audit.models import AuditEvent

AUDIT_READER_ROLES = (Role.ADMIN, Role.COMPLIANCE_OFFICER)


def audit_can_view(*, user: User) -> bool:
    return user.has_role(*AUDIT_READER_ROLES)


@dataclass(frozen=True)
class AuditFilters:
    action: str = ""
    actor: str = ""
    target: str = ""
    outcome: str = ""
    text: str = ""
    since: datetime | None = None
    until: datetime | None = None


def audit_event_list(*, filters: AuditFilters, before_seq: int | None = None) -> QuerySet:
    """Events newest first, filtered; ``before_seq`` is the keyset cursor for paging."""
    qs = AuditEvent.objects.order_by("-seq")
    if filters.action:
        qs = qs.filter(action__startswith=filters.action)
    if filters.actor:
        qs = qs.filter(actor_label__iexact=filters.actor)
    if filters.target:
        qs = qs.filter(Q(target_label__icontains=filters.target) | Q(target_id=filters.target))
    if filters.outcome:
        qs = qs.filter(outcome=filters.outcome)
    if filters.text:
        qs = qs.filter(details__icontains=filters.text)
    if filters.since:
        qs = qs.filter(created_at__gte=filters.since)
    if filters.until:
        qs = qs.filter(created_at__lt=filters.until)
    if before_seq is not None:
        qs = qs.filter(seq__lt=before_seq)
    return qs


def audit_chain_verify() -> VerifyResult:
    """Recompute the whole chain from the first event, streaming in chain order."""
    events = (
        AuditEvent.objects.order_by("seq")
        .values(*HASHED_FIELDS, "prev_hash", "hash")
        .iterator(chunk_size=5000)
    )
    return verify_events(events)
