"""Per-key and per-user limits on the inference API, counted in Redis.

Admins set limits on an API key, and as defaults on a user or a role
(``apps.accounts.models.UsageLimit``); ``limits_for`` resolves a caller's, field by field.
Every web process shares the counts, and they survive a restart, because they live in
Redis under ``aibox:limits:<subject>:``, where the subject is the key (``key:<id>``) or,
for a browser session, the user (``user:<id>``). A user's defaults therefore apply to each
of their keys separately.

- requests per minute: a sorted set of admitted request ids scored by time, a sliding
  60 s window;
- tokens per minute: a hash of tokens charged per second; a request is admitted while
  the last 60 s hold fewer than the limit (a request's cost is known only at its end);
- concurrent requests: a sorted set of request ids in flight, scored by when each is
  forgotten, so a request whose process vanished frees its place by itself;
- token budget: a counter per UTC day or month of the tokens charged.

``limits_admit`` checks all four and takes the request's places in one Lua script, so
concurrent requests cannot both take the last place; ``limits_release`` gives the place
back and charges the request's tokens.

Over 400 lines on purpose: the Lua script and the Python that reads its answers are
kept side by side, so a change to one is seen with the other.
"""

from __future__ import annotations

import calendar
import logging
import math
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from redis import Redis
from redis.asyncio import Redis as AsyncRedis
from redis.exceptions import RedisError

from apps.accounts import selectors as account_selectors
from apps.accounts.models import ApiKey, LimitPeriod, User
from apps.inference.openai_api import ApiError
from workers import redis_keys

logger = logging.getLogger(__name__)

WINDOW_SECONDS = 60
# A request in flight is forgotten this long after its admission if it is never
# released (its web process died): longer than any queue timeout plus generation.
INFLIGHT_TTL_SECONDS = 900
# A period's budget counter outlives the period by this long, for a late release.
BUDGET_GRACE_SECONDS = 3600
# Concurrency frees when some request ends, which no clock predicts.
CONCURRENCY_RETRY_SECONDS = 1


@dataclass(frozen=True)
class Limits:
    """A caller's effective limits; ``None`` is no limit. ``subject`` names its counters."""

    subject: str
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    max_concurrent: int | None = None
    token_budget: int | None = None
    budget_period: str | None = None  # "day" or "month" (UTC), set with token_budget

    @property
    def unlimited(self) -> bool:
        return (
            self.requests_per_minute is None
            and self.tokens_per_minute is None
            and self.max_concurrent is None
            and self.token_budget is None
        )


def limits_for(*, user: User, api_key: ApiKey | None) -> Limits:
    """The limits on ``user`` calling with ``api_key`` (None: a browser session), in one
    query: each field from the key's row, else the user's, else the role's."""
    effective = account_selectors.usage_limit_effective(user=user, api_key=api_key)
    subject = f"key:{api_key.pk}" if api_key is not None else f"user:{user.pk}"
    return Limits(subject=subject, **effective.values)


def _key(limits: Limits, name: str) -> str:
    return redis_keys.limits_key(limits.subject, name)


def _budget_period(period: str, now: float) -> tuple[str, float]:
    """The UTC period ``now`` falls in, as a key suffix, and the seconds until it ends."""
    moment = datetime.fromtimestamp(now, UTC)
    start_of_day = moment.replace(hour=0, minute=0, second=0, microsecond=0)
    if period == LimitPeriod.DAY:
        return moment.strftime("day:%Y-%m-%d"), (
            start_of_day + timedelta(days=1) - moment
        ).total_seconds()
    days = calendar.monthrange(moment.year, moment.month)[1]
    end = start_of_day.replace(day=1) + timedelta(days=days)
    return moment.strftime("month:%Y-%m"), (end - moment).total_seconds()


def _duration(seconds: float) -> str:
    """A duration as OpenAI writes its reset headers: ``20ms``, ``1.5s``, ``6m0s``."""
    # Rounded first: a time computed from two clock readings carries float noise.
    ms = max(0, math.ceil(round(seconds * 1000, 3)))
    if ms < 1000:
        return f"{ms}ms"
    hours, rest = divmod(ms, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    secs = f"{rest / 1000:.3f}".rstrip("0").rstrip(".")
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    return f"{minutes}m{secs}s" if minutes else f"{secs}s"


def _retry_after(seconds: float) -> str:
    return str(max(1, math.ceil(round(seconds, 3))))


# KEYS: requests (zset), tokens (hash: second -> tokens), in flight (zset), budget counter.
# ARGV: now, request id, rpm, tpm, max concurrent, budget (-1: no limit), the in-flight
# entry's expiry, the window's length in seconds.
# Returns: admitted (0/1), the refused limits (space-separated), requests in the window,
# seconds until the window frees a request, tokens in the window, seconds until it frees
# tokens, requests in flight, tokens of the budget spent. Lua turns numbers into integers
# on the way out, so the times go back as strings.
_ADMIT = """
local now = tonumber(ARGV[1])
local rid = ARGV[2]
local rpm, tpm = tonumber(ARGV[3]), tonumber(ARGV[4])
local conc, budget = tonumber(ARGV[5]), tonumber(ARGV[6])
local window = tonumber(ARGV[8])
local refused = {}

local req_used = 0
if rpm >= 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
  req_used = redis.call('ZCARD', KEYS[1])
  if req_used >= rpm then table.insert(refused, 'requests') end
end

local tok_used, buckets = 0, {}
if tpm >= 0 then
  local flat = redis.call('HGETALL', KEYS[2])
  for i = 1, #flat, 2 do
    local second, tokens = tonumber(flat[i]), tonumber(flat[i + 1])
    if second + window <= now then
      redis.call('HDEL', KEYS[2], flat[i])
    else
      table.insert(buckets, {second, tokens})
      tok_used = tok_used + tokens
    end
  end
  if tok_used >= tpm then table.insert(refused, 'tokens') end
end

local inflight = 0
if conc >= 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
  inflight = redis.call('ZCARD', KEYS[3])
  if inflight >= conc then table.insert(refused, 'concurrent') end
end

local spent = 0
if budget >= 0 then
  spent = tonumber(redis.call('GET', KEYS[4]) or '0')
  if spent >= budget then table.insert(refused, 'budget') end
end

local admitted = #refused == 0
if admitted then
  if rpm >= 0 then
    redis.call('ZADD', KEYS[1], ARGV[1], rid)
    redis.call('EXPIRE', KEYS[1], window + 1)
    req_used = req_used + 1
  end
  if conc >= 0 then
    redis.call('ZADD', KEYS[3], ARGV[7], rid)
    redis.call('EXPIRE', KEYS[3], math.ceil(tonumber(ARGV[7]) - now) + 1)
    inflight = inflight + 1
  end
end

-- When a request (or some tokens) frees: at the limit, when the count falls below it;
-- below, when the oldest counted one leaves the window.
local req_reset = 0
if rpm >= 0 and req_used > 0 then
  local index = math.max(0, req_used - rpm)
  local entry = redis.call('ZRANGE', KEYS[1], index, index, 'WITHSCORES')
  if entry[2] then req_reset = tonumber(entry[2]) + window - now end
end
local tok_reset = 0
if tpm >= 0 and #buckets > 0 then
  table.sort(buckets, function(a, b) return a[1] < b[1] end)
  local left = tok_used
  for _, bucket in ipairs(buckets) do
    left = left - bucket[2]
    tok_reset = bucket[1] + window - now
    if left < tpm then break end
  end
end

return {admitted and 1 or 0, table.concat(refused, ' '), req_used, tostring(req_reset),
        tok_used, tostring(tok_reset), inflight, spent}
"""


@dataclass(frozen=True)
class Admission:
    """What admission counted for a request, for its ``x-ratelimit-*`` headers."""

    limits: Limits
    requests_used: int = 0
    requests_reset: float = 0.0
    tokens_used: int = 0
    tokens_reset: float = 0.0
    in_flight: int = 0
    budget_spent: int = 0

    @property
    def headers(self) -> dict[str, str]:
        """OpenAI's rate-limit headers for the limits that are set (none when unlimited).
        ``remaining-requests`` counts this request as made."""
        headers: dict[str, str] = {}
        rpm, tpm = self.limits.requests_per_minute, self.limits.tokens_per_minute
        if rpm is not None:
            headers["x-ratelimit-limit-requests"] = str(rpm)
            headers["x-ratelimit-remaining-requests"] = str(max(0, rpm - self.requests_used))
            headers["x-ratelimit-reset-requests"] = _duration(self.requests_reset)
        if tpm is not None:
            headers["x-ratelimit-limit-tokens"] = str(tpm)
            headers["x-ratelimit-remaining-tokens"] = str(max(0, tpm - self.tokens_used))
            headers["x-ratelimit-reset-tokens"] = _duration(self.tokens_reset)
        return headers


def _limit_arg(value: int | None) -> int:
    return -1 if value is None else value


def limits_admit(
    *, redis: Redis, limits: Limits, request_id: str, now: float | None = None
) -> Admission:
    """Admit a request under ``limits`` and take its places, or raise a 429 ``ApiError``.

    One Lua script checks every limit and, only if all allow it, counts the request
    (requests per minute) and holds its place in flight until ``limits_release``. The
    refusal names each limit reached, with ``Retry-After`` for when all of them allow a
    request again; a spent budget is ``insufficient_quota``, the rest
    ``rate_limit_exceeded``. An unlimited caller costs no Redis call. A RedisError rises:
    the caller decides what an unreachable Redis means.
    """
    if limits.unlimited:
        return Admission(limits=limits)
    now = time.time() if now is None else now
    period, period_left = (
        _budget_period(limits.budget_period, now) if limits.token_budget is not None else ("", 0.0)
    )
    reply = redis.eval(
        _ADMIT,
        4,
        _key(limits, "requests"),
        _key(limits, "tokens"),
        _key(limits, "inflight"),
        _key(limits, f"budget:{period}"),
        repr(now),
        request_id,
        _limit_arg(limits.requests_per_minute),
        _limit_arg(limits.tokens_per_minute),
        _limit_arg(limits.max_concurrent),
        _limit_arg(limits.token_budget),
        repr(now + INFLIGHT_TTL_SECONDS),
        WINDOW_SECONDS,
    )
    admitted, refused, req_used, req_reset, tok_used, tok_reset, in_flight, spent = reply
    admission = Admission(
        limits=limits,
        requests_used=int(req_used),
        requests_reset=float(req_reset),
        tokens_used=int(tok_used),
        tokens_reset=float(tok_reset),
        in_flight=int(in_flight),
        budget_spent=int(spent),
    )
    if admitted:
        return admission
    reasons = refused.decode() if isinstance(refused, bytes) else str(refused)
    raise _refusal(admission, reasons.split(), period_left)


def _refusal(admission: Admission, refused: list[str], period_left: float) -> ApiError:
    limits = admission.limits
    messages: list[str] = []
    waits: list[float] = []
    if "requests" in refused:
        messages.append(
            f"Rate limit reached for requests per minute: limit {limits.requests_per_minute}, "
            f"{admission.requests_used} made in the last {WINDOW_SECONDS} s."
        )
        waits.append(admission.requests_reset)
    if "tokens" in refused:
        messages.append(
            f"Rate limit reached for tokens per minute: limit {limits.tokens_per_minute}, "
            f"{admission.tokens_used} used in the last {WINDOW_SECONDS} s."
        )
        waits.append(admission.tokens_reset)
    if "concurrent" in refused:
        messages.append(
            f"Too many concurrent requests: limit {limits.max_concurrent} in flight at once."
        )
        waits.append(CONCURRENCY_RETRY_SECONDS)
    if "budget" in refused:
        messages.append(
            f"Token budget exhausted: {admission.budget_spent} of {limits.token_budget} "
            f"tokens used this {limits.budget_period} (UTC); it renews in "
            f"{_duration(period_left)}."
        )
        waits.append(period_left)
    wait = max(waits)
    messages.append(f"Retry after {_retry_after(wait)} s, or ask an admin to raise the limit.")
    return ApiError(
        429,
        " ".join(messages),
        type="rate_limit_error",
        code="insufficient_quota" if "budget" in refused else "rate_limit_exceeded",
        headers={"Retry-After": _retry_after(wait), **admission.headers},
    )


async def limits_release(
    *, redis: AsyncRedis, limits: Limits, request_id: str, tokens: int
) -> None:
    """Give back the request's place in flight and charge its prompt and completion
    ``tokens`` to the tokens-per-minute window and the budget period.

    Called once the request is over, whatever its outcome. An unreachable Redis is
    logged, not raised: the place expires by itself, and the request's answer must not
    turn into an error after the fact.
    """
    if limits.unlimited:
        return
    now = time.time()
    pipe = redis.pipeline(transaction=True)
    pipe.zrem(_key(limits, "inflight"), request_id)
    if tokens > 0 and limits.tokens_per_minute is not None:
        tokens_key = _key(limits, "tokens")
        pipe.hincrby(tokens_key, str(int(now)), tokens)
        pipe.expire(tokens_key, WINDOW_SECONDS + 1)
    if tokens > 0 and limits.token_budget is not None:
        period, period_left = _budget_period(limits.budget_period, now)
        budget_key = _key(limits, f"budget:{period}")
        pipe.incrby(budget_key, tokens)
        pipe.expire(budget_key, math.ceil(period_left) + BUDGET_GRACE_SECONDS)
    try:
        await pipe.execute()
    except RedisError:
        logger.warning(
            "Redis unreachable: limits of %s not released for request %s (%d tokens)",
            limits.subject,
            request_id,
            tokens,
        )


def limits_status(*, redis: Redis, limits: Limits, now: float | None = None) -> dict:
    """Each limit with what is used of it and what remains, read without writing.

    ``{"subject", "requests_per_minute": {"limit", "used", "remaining"},
    "tokens_per_minute": {...}, "concurrent": {...}, "budget": {... "period",
    "resets_at"}}``; a limit that is not set reads ``{"limit": None}`` and costs no
    Redis call.
    """
    now = time.time() if now is None else now
    status: dict = {
        "subject": limits.subject,
        "requests_per_minute": {"limit": limits.requests_per_minute},
        "tokens_per_minute": {"limit": limits.tokens_per_minute},
        "concurrent": {"limit": limits.max_concurrent},
        "budget": {"limit": limits.token_budget, "period": limits.budget_period},
    }
    if limits.unlimited:
        return status
    period, period_left = (
        _budget_period(limits.budget_period, now) if limits.token_budget is not None else ("", 0.0)
    )
    pipe = redis.pipeline(transaction=False)
    # What admission would count: its clean-up drops scores up to and including the
    # bound, so the bounds here exclude it.
    pipe.zcount(_key(limits, "requests"), f"({now - WINDOW_SECONDS}", "+inf")
    pipe.hgetall(_key(limits, "tokens"))
    pipe.zcount(_key(limits, "inflight"), f"({now}", "+inf")
    pipe.get(_key(limits, f"budget:{period}"))
    requests, buckets, in_flight, spent = pipe.execute()
    tokens = sum(int(n) for second, n in buckets.items() if int(second) + WINDOW_SECONDS > now)
    used = {
        "requests_per_minute": requests,
        "tokens_per_minute": tokens,
        "concurrent": in_flight,
        "budget": int(spent or 0),
    }
    for name, count in used.items():
        limit = status[name]["limit"]
        if limit is not None:
            status[name] |= {"used": count, "remaining": max(0, limit - count)}
    if limits.token_budget is not None:
        resets = datetime.fromtimestamp(now, UTC) + timedelta(seconds=period_left)
        status["budget"]["resets_at"] = resets.isoformat()
    return status


# How many keys a usage page shows the limits of.
MAX_KEYS_SHOWN = 20


def limits_of_keys(*, redis: Redis, keys: list[ApiKey]) -> list[tuple[ApiKey, dict]]:
    """Each key's limits in effect and what is left of them, for its owner's usage page
    and API (a key without limits reads as such, at no Redis cost)."""
    return [
        (key, limits_status(redis=redis, limits=limits_for(user=key.user, api_key=key)))
        for key in keys[:MAX_KEYS_SHOWN]
    ]
