"""Retention: usage records and the prompts and outputs they hold are pruned after a
configurable number of days. Audit events are never deleted by the app."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.conf import settings
from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from apps.accounts.models import User
from apps.audit.models import Outcome
from apps.audit.services import audit_record
from apps.inference.models import UsageRecord
from apps.ops.models import UsageCarry
from apps.ops.selectors import usage_totals

log = logging.getLogger(__name__)

# Rows per transaction: each batch locks only its own rows, briefly, so requests that
# write usage records meanwhile never wait on a long delete.
PRUNE_BATCH_SIZE = 5000


@dataclass(frozen=True)
class PruneResult:
    usage_cutoff: datetime
    prompt_cutoff: datetime
    records_deleted: int
    prompts_cleared: int
    batches: int


def _carry(ids: list[int]) -> None:
    """Add the totals of the records about to be deleted to the carried totals."""
    now = timezone.now()
    for row in usage_totals(UsageRecord.objects.filter(pk__in=ids)):
        carry, _ = UsageCarry.objects.select_for_update().get_or_create(
            deployment_name=row["deployment_name"], worker=row["worker"], outcome=row["outcome"]
        )
        buckets = row["latency_buckets"]
        if len(carry.latency_buckets) == len(buckets):
            buckets = [a + b for a, b in zip(carry.latency_buckets, buckets, strict=True)]
        carry.requests += row["requests"]
        carry.prompt_tokens += row["prompt_tokens"]
        carry.completion_tokens += row["completion_tokens"]
        carry.latency_sum_ms += row["latency_sum_ms"]
        carry.latency_buckets = buckets
        carry.updated_at = now
        carry.save()


def _delete_batch(cutoff: datetime, batch_size: int) -> int:
    with transaction.atomic():
        # SKIP LOCKED: a second prune running at the same time takes other rows, so no
        # record is carried twice.
        ids = list(
            UsageRecord.objects.filter(created_at__lt=cutoff)
            .order_by("created_at")
            .select_for_update(skip_locked=True)
            .values_list("pk", flat=True)[:batch_size]
        )
        if not ids:
            return 0
        _carry(ids)
        deleted, _ = UsageRecord.objects.filter(pk__in=ids).delete()
        return deleted


def _clear_batch(cutoff: datetime, batch_size: int) -> int:
    stored = Q(prompt_text__gt="") | Q(output_text__gt="")
    with transaction.atomic():
        ids = list(
            UsageRecord.objects.filter(stored, created_at__lt=cutoff)
            .order_by("created_at")
            .select_for_update(skip_locked=True)
            .values_list("pk", flat=True)[:batch_size]
        )
        if not ids:
            return 0
        return UsageRecord.objects.filter(pk__in=ids).update(prompt_text="", output_text="")


def usage_prune(
    *, actor: User, now: datetime | None = None, batch_size: int = PRUNE_BATCH_SIZE
) -> PruneResult:
    """Delete usage records older than ``USAGE_RETENTION_DAYS`` and blank the prompts and
    outputs stored in full on records older than ``PROMPT_RETENTION_DAYS``, in batches of
    ``batch_size`` rows, each its own transaction. sha256 digests stay with their record.

    Deleted records' totals are carried into UsageCarry (counters on /metrics never go
    down). One audit event says how many went and the cut-offs, also when a batch
    fails (outcome failure, with what was done until then).
    """
    now = now or timezone.now()
    usage_days = settings.USAGE_RETENTION_DAYS
    prompt_days = min(settings.PROMPT_RETENTION_DAYS, usage_days)
    usage_cutoff = now - timedelta(days=usage_days)
    prompt_cutoff = now - timedelta(days=prompt_days)
    deleted = cleared = batches = 0
    outcome, error = Outcome.SUCCESS, ""
    try:
        # Delete first, so no text is blanked on a record about to go anyway.
        while count := _delete_batch(usage_cutoff, batch_size):
            deleted += count
            batches += 1
        while count := _clear_batch(prompt_cutoff, batch_size):
            cleared += count
            batches += 1
    except Exception as exc:
        outcome, error = Outcome.FAILURE, f"{type(exc).__name__}: {exc}"[:500]
        log.exception("usage retention failed after %d batches", batches)
        raise
    finally:
        audit_record(
            actor=actor,
            action="usage.prune",
            target_type="inference.usagerecord",
            target_label="usage records",
            outcome=outcome,
            details={
                "records_deleted": deleted,
                "usage_cutoff": usage_cutoff.isoformat(),
                "usage_retention_days": usage_days,
                "prompts_cleared": cleared,
                "prompt_cutoff": prompt_cutoff.isoformat(),
                "prompt_retention_days": prompt_days,
                "batches": batches,
                **({"error": error} if error else {}),
            },
        )
    return PruneResult(
        usage_cutoff=usage_cutoff,
        prompt_cutoff=prompt_cutoff,
        records_deleted=deleted,
        prompts_cleared=cleared,
        batches=batches,
    )
