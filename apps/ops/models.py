from __future__ import annotations

from django.contrib.postgres.fields import ArrayField
from django.db import models
from django.utils import timezone

# Upper bounds (seconds) of the request latency histogram on /metrics. UsageCarry rows
# hold counts per bound, so changing these starts the carried buckets afresh.
LATENCY_BUCKETS_SECONDS: tuple[float, ...] = (
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
)


class UsageCarry(models.Model):
    """What retention removed: the totals of pruned usage records, per deployment, worker
    and outcome. /metrics adds them to the records still kept, so its counters never go
    down when old records are pruned (Prometheus would read a drop as a restart)."""

    deployment_name = models.CharField(max_length=100)
    worker = models.CharField(max_length=200, blank=True)
    outcome = models.CharField(max_length=16)
    requests = models.BigIntegerField(default=0)
    prompt_tokens = models.BigIntegerField(default=0)
    completion_tokens = models.BigIntegerField(default=0)
    latency_sum_ms = models.FloatField(default=0.0)
    # Requests at or under each bound of LATENCY_BUCKETS_SECONDS (cumulative, as Prometheus).
    latency_buckets = ArrayField(models.BigIntegerField(), default=list, blank=True)
    updated_at = models.DateTimeField(default=timezone.now)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["deployment_name", "worker", "outcome"], name="ops_usage_carry_key"
            )
        ]

    def __str__(self) -> str:
        return f"{self.deployment_name}/{self.worker}/{self.outcome}: {self.requests}"
