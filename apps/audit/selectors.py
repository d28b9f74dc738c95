from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import datetime

from django.db.models import Q, QuerySet, TextField
from django.db.models.functions import Cast, Upper
from django.db.models.lookups import Contains

from apps.audit.chain import HASHED_FIELDS, VerifyResult, format_timestamp, verify_events
from apps.audit.models import AuditEvent

# What a row of an export or a verification pass reads: the hashed fields and the links.
EVENT_COLUMNS = (*HASHED_FIELDS, "prev_hash", "hash")


@dataclass(frozen=True)
class AuditFilters:
    """One filtered view of the log; every field left empty matches everything.

    ``action`` is a prefix (``user.`` matches ``user.create`` and ``user.role_change``);
    ``actor`` is a username (any case); ``target_type``/``target_id`` name one kind of
    object or one object exactly; ``target`` matches the target's id or part of its
    label; ``text`` is a case-insensitive substring of the details JSON; ``since`` is
    inclusive and ``until`` exclusive.
    """

    action: str = ""
    actor: str = ""
    target_type: str = ""
    target_id: str = ""
    target: str = ""
    outcome: str = ""
    text: str = ""
    since: datetime | None = None
    until: datetime | None = None

    def q(self) -> Q:
        q = Q()
        if self.action:
            q &= Q(action__startswith=self.action)
        if self.actor:
            # Served by the index on UPPER(actor_label), seq (migration 0003).
            q &= Q(actor_label__iexact=self.actor)
        if self.target_type:
            q &= Q(target_type=self.target_type)
        if self.target_id:
            q &= Q(target_id=self.target_id)
        if self.target:
            q &= Q(target_label__icontains=self.target) | Q(target_id=self.target)
        if self.outcome:
            q &= Q(outcome=self.outcome)
        if self.text:
            # The same expression as the trigram GIN index (migration 0003), so a rare
            # word is found through the index instead of by reading every event.
            q &= Q(Contains(Upper(Cast("details", TextField())), self.text.upper()))
        if self.since:
            q &= Q(created_at__gte=self.since)
        if self.until:
            q &= Q(created_at__lt=self.until)
        return q

    @property
    def is_empty(self) -> bool:
        return not any(asdict(self).values())

    def as_dict(self) -> dict[str, str]:
        """The filters that are set, as plain strings (for manifests and audit details)."""
        out = {}
        for name, value in asdict(self).items():
            if isinstance(value, datetime):
                out[name] = format_timestamp(value)
            elif value:
                out[name] = str(value)
        return out


def audit_event_list(*, filters: AuditFilters, before_seq: int | None = None) -> QuerySet:
    """Events newest first, filtered; ``before_seq`` is the keyset cursor for paging.

    Keyset, not OFFSET: page N costs what page 1 costs, and nothing counts the whole log.
    """
    qs = AuditEvent.objects.filter(filters.q()).order_by("-seq")
    if before_seq is not None:
        qs = qs.filter(seq__lt=before_seq)
    return qs


def audit_seq_bounds(*, filters: AuditFilters, up_to_seq: int) -> tuple[int, int] | None:
    """The first and last seq of the events the filters match, up to ``up_to_seq``."""
    qs = AuditEvent.objects.filter(filters.q(), seq__lte=up_to_seq)
    first = qs.order_by("seq").values_list("seq", flat=True).first()
    if first is None:
        return None
    last = qs.order_by("-seq").values_list("seq", flat=True).first()
    return first, last


def audit_head_seq() -> int:
    return AuditEvent.objects.order_by("-seq").values_list("seq", flat=True).first() or 0


def audit_chain_verify() -> VerifyResult:
    """Recompute the whole chain from the first event, streaming in chain order."""
    events = AuditEvent.objects.order_by("seq").values(*EVENT_COLUMNS).iterator(chunk_size=5000)
    return verify_events(events)
