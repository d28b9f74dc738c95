import json

from django.conf import settings
from django.contrib.postgres.indexes import GinIndex, OpClass
from django.db import models
from django.db.models.functions import Cast, Upper


class Outcome(models.TextChoices):
    SUCCESS = "success", "Success"
    FAILURE = "failure", "Failure"
    DENIED = "denied", "Denied"


class AuditEvent(models.Model):
    """One append-only, hash-chained record of something that happened on the box.

    Rows are written only by ``apps.audit.services.audit_record``. PostgreSQL refuses
    UPDATE and DELETE on this table (a trigger, see migration 0002), except the
    ``actor`` link being cleared when a user row is removed: the copied ``actor_label``
    and the hash chain do not depend on it.
    """

    seq = models.BigIntegerField(unique=True, help_text="Position in the chain, from 1.")
    created_at = models.DateTimeField()
    actor = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="+",
    )
    actor_label = models.CharField(max_length=200)
    action = models.CharField(max_length=100)
    target_type = models.CharField(max_length=100, blank=True)
    target_id = models.CharField(max_length=100, blank=True)
    target_label = models.CharField(max_length=300, blank=True)
    outcome = models.CharField(max_length=16, choices=Outcome.choices)
    source_ip = models.GenericIPAddressField(null=True, blank=True)
    user_agent = models.CharField(max_length=400, blank=True)
    details = models.JSONField(default=dict, blank=True)
    prev_hash = models.CharField(max_length=64)
    hash = models.CharField(max_length=64, unique=True)

    class Meta:
        ordering = ["-seq"]
        indexes = [
            models.Index(fields=["action", "-seq"]),
            models.Index(fields=["actor_label", "-seq"]),
            models.Index(fields=["created_at"]),
            # For the filters of the audit page and exports (apps.audit.selectors).
            models.Index(Upper("actor_label"), "seq", name="audit_actor_upper_seq"),
            models.Index(fields=["outcome", "-seq"], name="audit_outcome_seq"),
            models.Index(fields=["target_type", "target_id", "-seq"], name="audit_target_seq"),
            models.Index(
                OpClass("action", name="varchar_pattern_ops"), "seq", name="audit_action_prefix"
            ),
            GinIndex(
                OpClass(Upper(Cast("details", models.TextField())), name="gin_trgm_ops"),
                name="audit_details_trgm",
            ),
        ]

    def __str__(self) -> str:
        return f"#{self.seq} {self.action} by {self.actor_label}"

    @property
    def details_text(self) -> str:
        return json.dumps(self.details, ensure_ascii=False, sort_keys=True) if self.details else ""
