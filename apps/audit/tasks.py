"""Celery beat's audit task: a signed checkpoint of the chain's head, outside the database."""

from __future__ import annotations

from celery import shared_task
from django.conf import settings

from apps.audit.checkpoints import checkpoint_write


# Every AUDIT_CHECKPOINT_EVERY seconds (CELERY_BEAT_SCHEDULE). Two runs at once at worst
# write the same head twice; the file only ever grows.
@shared_task(name="audit.checkpoint", ignore_result=True)
def audit_checkpoint() -> None:
    checkpoint_write(path=settings.AUDIT_CHECKPOINT_FILE)
