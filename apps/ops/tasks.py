"""Periodic tasks, scheduled by Celery beat (settings.CELERY_BEAT_SCHEDULE)."""

from __future__ import annotations

from celery import shared_task

from apps.accounts.services import system_user
from apps.ops import services


# Safe to run twice at once: each batch skips rows another run has locked.
@shared_task(name="ops.usage_prune", acks_late=True, ignore_result=True)
def usage_prune() -> None:
    services.usage_prune(actor=system_user())
