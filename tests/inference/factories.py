"""Usage records as the gateway writes them, at chosen times, for retention, dashboard
and metrics tests."""

from __future__ import annotations

import itertools
from datetime import datetime

from apps.inference.models import Endpoint, Outcome, UsageRecord

_STATUS = {
    Outcome.OK: 200,
    Outcome.CLIENT_ERROR: 400,
    Outcome.REJECTED: 429,
    Outcome.TIMEOUT: 504,
    Outcome.CANCELLED: 499,
    Outcome.UNAVAILABLE: 503,
    Outcome.ERROR: 500,
}
_counter = itertools.count()


def make_usage(
    *,
    at: datetime,
    deployment: str = "chat",
    worker: str = "cpu@box",
    outcome: str = Outcome.OK,
    latency_ms: float = 100.0,
    prompt_tokens: int = 10,
    completion_tokens: int = 20,
    **extra,
) -> UsageRecord:
    return UsageRecord.objects.create(
        created_at=at,
        username=f"user{next(_counter)}",
        deployment_name=deployment,
        worker=worker,
        endpoint=Endpoint.CHAT,
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        latency_ms=latency_ms,
        outcome=outcome,
        status_code=_STATUS[outcome],
        error="" if outcome == Outcome.OK else f"{outcome} happened",
        **extra,
    )
