"""Reading usage records: whose a caller may see, filtered, a keyset page at a time, and
per UTC day. PostgreSQL does the sums, so a page never pulls a period's rows into Python."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

from django.db.models import Count, Q, QuerySet, Sum
from django.db.models.functions import Coalesce, TruncDate
from django.utils import timezone

from apps.accounts.models import Role, User
from apps.deployments.models import Deployment
from apps.inference.models import Outcome, UsageRecord

# Who sees every user's requests; everyone else sees only their own.
USAGE_READER_ROLES = (Role.ADMIN, Role.COMPLIANCE_OFFICER)
# What an export or the API lists of a record: never the prompt, the output or their
# hashes, which the deployment's logging level may have kept.
USAGE_COLUMNS = (
    "request_id",
    "created_at",
    "username",
    "api_key_prefix",
    "deployment_name",
    "endpoint",
    "stream",
    "prompt_tokens",
    "cached_tokens",
    "completion_tokens",
    "latency_ms",
    "time_to_first_token_ms",
    "load_ms",
    "outcome",
    "status_code",
    "error",
)
DEFAULT_DAYS = 30
MAX_DAYS = 366
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)
_MAX_ID = 2**63 - 1  # PostgreSQL's bigint


def usage_can_view_all(*, user: User) -> bool:
    return user.has_role(*USAGE_READER_ROLES)


def usage_visible_to(*, user: User) -> QuerySet[UsageRecord]:
    """Every record for admins and compliance officers; the user's own for the others.

    Filters apply on top of this, so a developer filtering on someone else's key or
    name gets no rows rather than a refusal that would confirm the key exists.
    """
    if usage_can_view_all(user=user):
        return UsageRecord.objects.all()
    return UsageRecord.objects.filter(user=user)


@dataclass(frozen=True)
class UsageFilters:
    """One filtered view of the records; a field left empty matches everything.

    ``key`` is an API key's prefix, ``user`` a username (any case), ``deployment`` a
    deployment's name: each as copied onto the record, so records of a deleted key, user
    or deployment are still found. ``since`` and ``until`` are UTC days, both included.
    """

    key: str = ""
    user: str = ""
    deployment: str = ""
    since: date | None = None
    until: date | None = None

    def q(self) -> Q:
        q = Q()
        if self.key:
            q &= Q(api_key_prefix=self.key)
        if self.user:
            q &= Q(username__iexact=self.user)
        if self.deployment:
            q &= Q(deployment_name=self.deployment)
        if self.since:
            q &= Q(created_at__gte=_day_start(self.since))
        if self.until:
            q &= Q(created_at__lt=_day_start(self.until + timedelta(days=1)))
        return q


def _day_start(day: date) -> datetime:
    return datetime.combine(day, time.min, tzinfo=UTC)


def usage_list(*, user: User, filters: UsageFilters) -> QuerySet[UsageRecord]:
    """The records ``user`` may see that match ``filters``, newest first, with the listed
    columns only (never the prompt and output text a record may hold)."""
    return (
        usage_visible_to(user=user)
        .filter(filters.q())
        .only("id", *USAGE_COLUMNS)
        .order_by("-created_at", "-id")
    )


# Keyset cursors: the last row's (created_at, id), as "<microseconds since 1970>.<id>".


def usage_recent(*, deployment: Deployment, limit: int = 20) -> QuerySet[UsageRecord]:
    """A deployment's latest requests, every caller's: whoever may see the deployment sees
    them on its page."""
    return UsageRecord.objects.filter(deployment=deployment)[:limit]


def usage_cursor(record: UsageRecord) -> str:
    return f"{(record.created_at - _EPOCH) // _MICROSECOND}.{record.pk}"


def usage_cursor_parse(cursor: str) -> tuple[datetime, int]:
    """Raise ValueError for anything that is not a cursor this module wrote."""
    micros, _, pk = cursor.partition(".")
    if not (micros.isdigit() and pk.isdigit()) or int(pk) > _MAX_ID:
        raise ValueError("Not a usage cursor.")
    try:
        return _EPOCH + int(micros) * _MICROSECOND, int(pk)
    except OverflowError:
        raise ValueError("Not a usage cursor.") from None


@dataclass(frozen=True)
class UsagePage:
    records: list[UsageRecord]
    next_cursor: str | None  # None on the last page


def usage_records(
    *, user: User, filters: UsageFilters, cursor: str | None = None, limit: int = 50
) -> UsagePage:
    """One page of ``usage_list``, after ``cursor`` (from the previous page).

    Keyset, not OFFSET: page N costs what page 1 costs, and nothing counts the table.
    ``created_at <= t`` bounds the index scan; excluding the cursor's own instant at and
    above its id breaks ties between records written in the same microsecond.
    """
    records = usage_list(user=user, filters=filters)
    if cursor:
        at, pk = usage_cursor_parse(cursor)
        records = records.filter(created_at__lte=at).exclude(created_at=at, id__gte=pk)
    rows = list(records[: limit + 1])
    if len(rows) > limit:
        return UsagePage(records=rows[:limit], next_cursor=usage_cursor(rows[limit - 1]))
    return UsagePage(records=rows, next_cursor=None)


@dataclass(frozen=True)
class DailyUsage:
    day: date
    requests: int = 0
    errors: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


def usage_today() -> date:
    return timezone.now().astimezone(UTC).date()


def usage_period(
    *, filters: UsageFilters, days: int = DEFAULT_DAYS, today: date | None = None
) -> tuple[date, date]:
    """The days a chart covers: the filters' range, else the last ``days`` up to today,
    at most MAX_DAYS long (the latest ones). Empty (start after end) for a range in the
    future."""
    end = filters.until or today or usage_today()
    start = filters.since or end - timedelta(days=max(1, days) - 1)
    return max(start, end - timedelta(days=MAX_DAYS - 1)), end


def usage_daily(
    *, user: User, filters: UsageFilters, days: int = DEFAULT_DAYS, today: date | None = None
) -> list[DailyUsage]:
    """Requests, failed requests and tokens per UTC day over ``usage_period``, oldest
    first, days without requests included (as zeros)."""
    start, end = usage_period(filters=filters, days=days, today=today)
    if start > end:
        return []
    rows = (
        usage_list(user=user, filters=filters)
        .filter(
            created_at__gte=_day_start(start), created_at__lt=_day_start(end + timedelta(days=1))
        )
        .annotate(day=TruncDate("created_at", tzinfo=UTC))
        .order_by()
        .values("day")
        .annotate(
            requests=Count("pk"),
            errors=Count("pk", filter=~Q(outcome=Outcome.OK)),
            prompt_tokens=Coalesce(Sum("prompt_tokens"), 0),
            completion_tokens=Coalesce(Sum("completion_tokens"), 0),
        )
    )
    by_day = {row.pop("day"): row for row in rows}
    return [
        DailyUsage(day=day, **by_day.get(day, {}))
        for day in (start + timedelta(days=i) for i in range((end - start).days + 1))
    ]


def usage_totals(daily: Sequence[DailyUsage]) -> DailyUsage | None:
    """The sums of a daily series (``day`` is its first day); None for an empty one."""
    if not daily:
        return None
    return DailyUsage(
        day=daily[0].day,
        requests=sum(d.requests for d in daily),
        errors=sum(d.errors for d in daily),
        prompt_tokens=sum(d.prompt_tokens for d in daily),
        completion_tokens=sum(d.completion_tokens for d in daily),
    )


def usage_errors(
    *, user: User, filters: UsageFilters, since: date, limit: int = 10
) -> list[UsageRecord]:
    """The latest requests that did not end ``ok`` from ``since`` on: bounded by the
    chart's period, so a user with few failures never has the whole table read."""
    return list(
        usage_list(user=user, filters=filters)
        .filter(created_at__gte=_day_start(since))
        .exclude(outcome=Outcome.OK)
        .only(
            "created_at",
            "username",
            "api_key_prefix",
            "deployment_name",
            "outcome",
            "status_code",
            "error",
            "request_id",
        )[:limit]
    )


@dataclass(frozen=True)
class UsageOverview:
    """What the usage page shows above its table: a period's days, their sums, the bar
    chart of them and the latest failed requests in it."""

    start: date
    end: date
    daily: list[DailyUsage]
    totals: DailyUsage | None
    chart: dict[str, Any]
    errors: list[UsageRecord]


def usage_overview(*, user: User, filters: UsageFilters, days: int = DEFAULT_DAYS) -> UsageOverview:
    today = usage_today()
    start, end = usage_period(filters=filters, days=days, today=today)
    daily = usage_daily(user=user, filters=filters, days=days, today=today)
    return UsageOverview(
        start=start,
        end=end,
        daily=daily,
        totals=usage_totals(daily),
        chart=usage_chart(daily),
        errors=usage_errors(user=user, filters=filters, since=start) if daily else [],
    )


CHART_WIDTH = 720
CHART_HEIGHT = 220
_LEFT, _RIGHT, _TOP, _BOTTOM = 64, 8, 12, 28


def usage_chart(daily: Sequence[DailyUsage]) -> dict[str, Any]:
    """Tokens per day as SVG bars (prompt below, completion on top), drawn by
    templates/inference/_usage_chart.html; each bar's title gives the day's totals. No
    bars when no day had a request."""
    if not any(d.requests for d in daily):
        return {"bars": []}
    top = max(d.tokens for d in daily) or 1
    plot_width = CHART_WIDTH - _LEFT - _RIGHT
    plot_height = CHART_HEIGHT - _TOP - _BOTTOM
    baseline = CHART_HEIGHT - _BOTTOM
    slot = plot_width / len(daily)
    bar_width = max(1.0, slot * 0.7)

    def height(tokens: int) -> float:
        return round(tokens / top * plot_height, 1)

    bars = []
    for i, d in enumerate(daily):
        prompt_h, completion_h = height(d.prompt_tokens), height(d.completion_tokens)
        bars.append(
            {
                "day": d.day,
                "tokens": d.tokens,
                "prompt_tokens": d.prompt_tokens,
                "completion_tokens": d.completion_tokens,
                "requests": d.requests,
                "errors": d.errors,
                "x": round(_LEFT + i * slot + (slot - bar_width) / 2, 1),
                "width": round(bar_width, 1),
                "center": round(_LEFT + (i + 0.5) * slot, 1),
                "prompt_y": round(baseline - prompt_h, 1),
                "prompt_height": prompt_h,
                "completion_y": round(baseline - prompt_h - completion_h, 1),
                "completion_height": completion_h,
                # A date under the first bar, the last, and every seventh between.
                "label": i in (0, len(daily) - 1) or (i % 7 == 0 and len(daily) - i > 3),
            }
        )
    return {
        "bars": bars,
        "width": CHART_WIDTH,
        "height": CHART_HEIGHT,
        "left": _LEFT,
        "right": CHART_WIDTH - _RIGHT,
        "top": _TOP,
        "baseline": baseline,
        "label_y": CHART_HEIGHT - 8,
        "max_tokens": top,
    }
