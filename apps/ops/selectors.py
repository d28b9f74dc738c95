"""Reads for the operations dashboard and /metrics. PostgreSQL does the aggregation
(date_bin buckets, percentile_cont), so a page never pulls usage rows into Python."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from django.db.models import (
    Aggregate,
    Count,
    DateTimeField,
    F,
    FloatField,
    Func,
    Q,
    QuerySet,
    Sum,
    Value,
)
from django.db.models.functions import Coalesce
from django.utils import timezone

from apps.deployments import selectors as deployment_selectors
from apps.deployments.models import Deployment, State
from apps.finetune.models import ACTIVE_STATES, FineTuneJob, JobState
from apps.inference.models import Outcome, UsageRecord
from apps.ops.charts import line_chart
from apps.ops.models import LATENCY_BUCKETS_SECONDS

# Outcomes that count as failures: the box did not answer. A client's bad request and a
# client that hung up are not the box's failures.
FAILED_OUTCOMES = (Outcome.REJECTED, Outcome.TIMEOUT, Outcome.UNAVAILABLE, Outcome.ERROR)
BUCKET = timedelta(minutes=1)
WINDOW_MINUTES = 60


class DateBin(Func):
    """PostgreSQL's date_bin(stride, source, origin): the start of the bucket."""

    function = "date_bin"
    output_field = DateTimeField()


class PercentileCont(Aggregate):
    """percentile_cont(fraction) WITHIN GROUP (ORDER BY expression), interpolated."""

    function = "percentile_cont"
    template = "%(function)s(%(fraction)s) WITHIN GROUP (ORDER BY %(expressions)s)"
    output_field = FloatField()

    def __init__(self, expression: str, *, fraction: float, **extra: Any) -> None:
        super().__init__(expression, fraction=float(fraction), **extra)


def _figures() -> dict[str, Any]:
    return {
        "requests": Count("pk"),
        "failed": Count("pk", filter=Q(outcome__in=FAILED_OUTCOMES)),
        "prompt_tokens": Coalesce(Sum("prompt_tokens"), 0),
        "completion_tokens": Coalesce(Sum("completion_tokens"), 0),
        "p50_ms": PercentileCont("latency_ms", fraction=0.5),
        "p95_ms": PercentileCont("latency_ms", fraction=0.95),
    }


def usage_totals(queryset: QuerySet[UsageRecord]) -> list[dict[str, Any]]:
    """Totals per (deployment name, worker, outcome): requests, tokens, latency sum and
    the cumulative latency histogram over LATENCY_BUCKETS_SECONDS, in one scan."""
    buckets = {
        f"le_{i}": Count("pk", filter=Q(latency_ms__lte=bound * 1000))
        for i, bound in enumerate(LATENCY_BUCKETS_SECONDS)
    }
    rows = (
        queryset.order_by()
        .values("deployment_name", "worker", "outcome")
        .annotate(
            requests=Count("pk"),
            prompt_tokens=Coalesce(Sum("prompt_tokens"), 0),
            completion_tokens=Coalesce(Sum("completion_tokens"), 0),
            latency_sum_ms=Coalesce(Sum("latency_ms"), 0.0),
            **buckets,
        )
    )
    return [
        {
            **{k: v for k, v in row.items() if not k.startswith("le_")},
            "latency_buckets": [row[k] for k in buckets],
        }
        for row in rows
    ]


@dataclass(frozen=True)
class Window:
    start: datetime
    end: datetime

    @property
    def seconds(self) -> float:
        return max(1.0, (self.end - self.start).total_seconds())


def traffic_window(now: datetime | None = None, minutes: int = WINDOW_MINUTES) -> Window:
    """The last ``minutes`` clock minutes, the current (partial) one included."""
    now = now or timezone.now()
    this_minute = now.replace(second=0, microsecond=0)
    return Window(start=this_minute - BUCKET * (minutes - 1), end=now)


def _rate(count: int | None, seconds: float) -> float:
    return (count or 0) / seconds


def _summary(row: dict[str, Any], seconds: float) -> dict[str, Any]:
    requests = row["requests"] or 0
    return {
        **row,
        "rps": _rate(requests, seconds),
        "prompt_tps": _rate(row["prompt_tokens"], seconds),
        "completion_tps": _rate(row["completion_tokens"], seconds),
        "error_rate": (row["failed"] / requests) if requests else None,
        "error_percent": (100 * row["failed"] / requests) if requests else None,
    }


def traffic_summary(window: Window) -> dict[str, Any]:
    """Requests/s, tokens/s, p50/p95 latency (ms) and error rate over the whole window."""
    row = UsageRecord.objects.filter(
        created_at__gte=window.start, created_at__lte=window.end
    ).aggregate(**_figures())
    return _summary(row, window.seconds)


def traffic_series(window: Window) -> list[dict[str, Any]]:
    """One entry per minute of the window (empty minutes included, with no latency)."""
    rows = (
        UsageRecord.objects.filter(created_at__gte=window.start, created_at__lte=window.end)
        .annotate(bucket=DateBin(Value(BUCKET), F("created_at"), Value(window.start)))
        .order_by()
        .values("bucket")
        .annotate(**_figures())
    )
    by_bucket = {row["bucket"]: row for row in rows}
    series = []
    start = window.start
    while start <= window.end:
        # The current minute has only lasted until now.
        seconds = min(BUCKET, window.end - start).total_seconds()
        row = by_bucket.get(start) or {
            "requests": 0,
            "failed": 0,
            "prompt_tokens": 0,
            "completion_tokens": 0,
            "p50_ms": None,
            "p95_ms": None,
        }
        series.append({"start": start, **_summary(row, max(1.0, seconds))})
        start += BUCKET
    return series


def deployment_traffic(window: Window) -> dict[str, dict[str, Any]]:
    """The window's figures per deployment name."""
    rows = (
        UsageRecord.objects.filter(created_at__gte=window.start, created_at__lte=window.end)
        .order_by()
        .values("deployment_name")
        .annotate(**_figures())
    )
    return {row["deployment_name"]: _summary(row, window.seconds) for row in rows}


def recent_failures(limit: int = 10) -> dict[str, list]:
    """Failed requests, failed deployments and failed fine-tunes, newest first."""
    return {
        "requests": list(
            UsageRecord.objects.filter(outcome__in=FAILED_OUTCOMES)
            .order_by("-created_at")
            .only("created_at", "deployment_name", "worker", "outcome", "status_code", "error")[
                :limit
            ]
        ),
        "deployments": list(
            Deployment.objects.filter(Q(state=State.FAILED) | Q(replica_set__state=State.FAILED))
            .distinct()
            .order_by("-updated_at")[:limit]
        ),
        "jobs": list(
            FineTuneJob.objects.filter(state=JobState.FAILED).order_by(
                F("finished_at").desc(nulls_last=True), "-id"
            )[:limit]
        ),
    }


def finetunes_in_progress() -> list[FineTuneJob]:
    return list(
        FineTuneJob.objects.filter(state__in=ACTIVE_STATES)
        .select_related("base_model__repo")
        .order_by("created_at", "id")
    )


def dashboard(now: datetime | None = None) -> dict[str, Any]:
    """Everything the operations dashboard shows, read afresh (the page polls it)."""
    window = traffic_window(now)
    series = traffic_series(window)
    workers = deployment_selectors.worker_list()
    per_deployment = deployment_traffic(window)
    deployments = []
    for deployment in Deployment.objects.prefetch_related("replica_set").order_by("name"):
        live = deployment_selectors.replica_live_states(deployment, workers)
        deployments.append(
            {
                "deployment": deployment,
                "replicas_ready": sum(1 for s in live.values() if s == State.READY),
                "replicas": len(live),
                "traffic": per_deployment.get(deployment.name),
            }
        )
    return {
        "window": window,
        "summary": traffic_summary(window),
        "charts": {
            "rps": line_chart({"requests": [b["rps"] for b in series]}),
            "tps": line_chart(
                {
                    "completion": [b["completion_tps"] for b in series],
                    "prompt": [b["prompt_tps"] for b in series],
                }
            ),
            "latency": line_chart(
                {"p50": [b["p50_ms"] for b in series], "p95": [b["p95_ms"] for b in series]}
            ),
            "errors": line_chart({"errors": [b["error_percent"] for b in series]}),
        },
        "workers": workers,
        "deployments": deployments,
        "finetunes": finetunes_in_progress(),
        "failures": recent_failures(),
    }
