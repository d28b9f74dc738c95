from __future__ import annotations

import uuid

from django.conf import settings
from django.db import models
from django.utils import timezone


class Endpoint(models.TextChoices):
    CHAT = "chat", "/v1/chat/completions"
    COMPLETION = "completion", "/v1/completions"
    EMBEDDING = "embedding", "/v1/embeddings"


class Outcome(models.TextChoices):
    OK = "ok", "Answered"
    CLIENT_ERROR = "client_error", "Refused (bad request)"
    REJECTED = "rejected", "Rejected (queue full)"
    TIMEOUT = "timeout", "Timed out"
    CANCELLED = "cancelled", "Cancelled by the client"
    UNAVAILABLE = "unavailable", "Deployment unavailable"
    ERROR = "error", "Failed"


class UsageRecord(models.Model):
    """One inference request. Names are copied, so a record outlives its key or deployment."""

    request_id = models.UUIDField(default=uuid.uuid4, unique=True)
    created_at = models.DateTimeField(default=timezone.now, db_index=True)
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+"
    )
    username = models.CharField(max_length=150)
    api_key = models.ForeignKey(
        "accounts.ApiKey", null=True, on_delete=models.SET_NULL, related_name="usage"
    )
    api_key_prefix = models.CharField(max_length=32, blank=True)
    deployment = models.ForeignKey(
        "deployments.Deployment", null=True, on_delete=models.SET_NULL, related_name="usage"
    )
    deployment_name = models.CharField(max_length=100)
    # The exact weights that answered: provenance down to each request.
    model_sha256 = models.CharField(max_length=64, blank=True)
    # The LoRA adapter applied on top, when the deployment has one.
    adapter_sha256 = models.CharField(max_length=64, blank=True, db_index=True)
    # The deployment's revision (its setup at the time) that served the request.
    revision = models.PositiveIntegerField(null=True, blank=True)
    worker = models.CharField(max_length=200, blank=True)
    endpoint = models.CharField(max_length=16, choices=Endpoint.choices)
    stream = models.BooleanField(default=False)
    prompt_tokens = models.PositiveIntegerField(default=0)
    # Of the prompt tokens, those found in the replica's prompt cache (not read again).
    cached_tokens = models.PositiveIntegerField(default=0)
    completion_tokens = models.PositiveIntegerField(default=0)
    queue_ms = models.FloatField(null=True)
    # How long the request waited for its deployment to load (load on demand): None when
    # it was loaded already. Latency and time to first token include the wait.
    load_ms = models.FloatField(null=True, blank=True)
    time_to_first_token_ms = models.FloatField(null=True)
    latency_ms = models.FloatField()
    outcome = models.CharField(max_length=16, choices=Outcome.choices)
    status_code = models.PositiveSmallIntegerField()
    error = models.TextField(blank=True)
    # Filled only as the deployment's logging level allows (metadata / hashed / full).
    prompt_sha256 = models.CharField(max_length=64, blank=True)
    output_sha256 = models.CharField(max_length=64, blank=True)
    prompt_text = models.TextField(blank=True)
    output_text = models.TextField(blank=True)

    class Meta:
        ordering = ["-created_at"]
        indexes = [
            models.Index(fields=["deployment", "-created_at"]),
            # Each user's own usage page and API, newest first.
            models.Index(fields=["user", "-created_at"]),
        ]

    def __str__(self) -> str:
        return f"{self.deployment_name} {self.request_id}"
