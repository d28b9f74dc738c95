"""Admission under per-key limits, against the real Redis: each test counts under a
subject of its own, and time is passed in (``now``) rather than waited for."""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta

import pytest
from django.conf import settings
from redis import Redis
from redis.asyncio import Redis as AsyncRedis

from apps.accounts.models import LimitPeriod, Role, UsageLimit
from apps.accounts.services import api_key_create
from apps.inference.limits import (
    INFLIGHT_TTL_SECONDS,
    Limits,
    limits_admit,
    limits_for,
    limits_release,
    limits_status,
)
from apps.inference.openai_api import ApiError
from tests.conftest import make_user

# Nothing listens here: a call to it fails at once.
UNREACHABLE = "redis://127.0.0.1:1/0"


@pytest.fixture
def client():
    client = Redis.from_url(settings.REDIS_URL)
    subjects: list[str] = []
    client.test_subjects = subjects
    yield client
    for subject in subjects:
        keys = list(client.scan_iter(f"aibox:limits:{subject}:*"))
        if keys:
            client.delete(*keys)
    client.close()


@pytest.fixture
def limits(client):
    """Limits under a fresh subject: ``limits(requests_per_minute=3)``."""

    def make(**values) -> Limits:
        subject = f"test:{uuid.uuid4().hex}"
        client.test_subjects.append(subject)
        return Limits(subject=subject, **values)

    return make


def admit(client, limits: Limits, now: float | None = None, request_id: str | None = None):
    return limits_admit(
        redis=client, limits=limits, request_id=request_id or uuid.uuid4().hex, now=now
    )


def refused(client, limits: Limits, now: float | None = None) -> ApiError:
    with pytest.raises(ApiError) as caught:
        admit(client, limits, now)
    assert caught.value.status == 429
    assert caught.value.type == "rate_limit_error"
    return caught.value


def release(limits: Limits, request_id: str, tokens: int, url: str | None = None) -> None:
    """``limits_release`` on an async client of its own, in a thread with its own loop
    (the browser tests keep an event loop running in the main thread)."""

    async def go() -> None:
        client = AsyncRedis.from_url(url or settings.REDIS_URL)
        try:
            await limits_release(redis=client, limits=limits, request_id=request_id, tokens=tokens)
        finally:
            await client.aclose()

    with ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, go()).result()


def test_an_unlimited_caller_costs_no_redis_call(caplog):
    unlimited = Limits(subject="user:1")
    admission = limits_admit(redis=Redis.from_url(UNREACHABLE), limits=unlimited, request_id="r1")
    assert admission.headers == {}
    with caplog.at_level(logging.WARNING):
        release(unlimited, "r1", 500, url=UNREACHABLE)
    assert caplog.records == []
    status = limits_status(redis=Redis.from_url(UNREACHABLE), limits=unlimited)
    assert status["requests_per_minute"] == {"limit": None}


def test_over_requests_per_minute_is_a_429_with_openais_headers(client, limits):
    limited = limits(requests_per_minute=3)
    t = float(int(time.time()))
    remaining = [
        admit(client, limited, now=t + i).headers["x-ratelimit-remaining-requests"]
        for i in range(3)
    ]
    assert remaining == ["2", "1", "0"]

    error = refused(client, limited, now=t + 3)
    assert error.code == "rate_limit_exceeded"
    assert "requests per minute" in error.message and "limit 3" in error.message
    # The first request leaves the 60 s window at t + 60: 57 s from t + 3.
    assert error.headers["Retry-After"] == "57"
    assert error.headers["x-ratelimit-limit-requests"] == "3"
    assert error.headers["x-ratelimit-remaining-requests"] == "0"
    assert error.headers["x-ratelimit-reset-requests"] == "57s"
    assert error.response()["Retry-After"] == "57"
    assert error.body()["error"]["code"] == "rate_limit_exceeded"

    # A sliding window: at t + 60.5 only the first request has left it.
    assert admit(client, limited, now=t + 60.5).headers["x-ratelimit-remaining-requests"] == "0"
    refused(client, limited, now=t + 60.6)


def test_over_concurrency_is_a_429_until_a_request_is_released(client, limits):
    limited = limits(max_concurrent=2)
    admit(client, limited, request_id="a")
    admit(client, limited, request_id="b")
    error = refused(client, limited)
    assert error.code == "rate_limit_exceeded"
    assert "concurrent requests" in error.message and "limit 2" in error.message
    assert error.headers["Retry-After"] == "1"

    release(limited, "a", 10)
    admit(client, limited, request_id="c")
    refused(client, limited)


def test_a_request_that_vanished_frees_its_place_by_itself(client, limits):
    limited = limits(max_concurrent=1)
    now = time.time()
    admit(client, limited, now=now - INFLIGHT_TTL_SECONDS - 1)  # never released
    admit(client, limited, now=now)


def test_tokens_per_minute_count_what_requests_were_charged(client, limits):
    limited = limits(tokens_per_minute=100)
    first = admit(client, limited, request_id="a")
    assert first.headers["x-ratelimit-limit-tokens"] == "100"
    assert first.headers["x-ratelimit-remaining-tokens"] == "100"
    release(limited, "a", 80)
    # 80 of 100 used: still under the limit, so the next request is let in.
    assert admit(client, limited, request_id="b").headers["x-ratelimit-remaining-tokens"] == "20"
    release(limited, "b", 30)

    error = refused(client, limited)
    assert error.code == "rate_limit_exceeded"
    assert "tokens per minute" in error.message and "110 used" in error.message
    assert error.headers["x-ratelimit-remaining-tokens"] == "0"
    assert 55 <= int(error.headers["Retry-After"]) <= 60
    # Once the charges leave the window, requests are let in again.
    admit(client, limited, now=time.time() + 61)


def test_a_daily_budget_is_spent_and_renews_the_next_utc_day(client, limits):
    limited = limits(token_budget=50, budget_period=LimitPeriod.DAY)
    admit(client, limited, request_id="a")
    release(limited, "a", 60)

    now = float(int(time.time()))
    error = refused(client, limited, now=now)
    assert error.code == "insufficient_quota"
    assert "Token budget exhausted: 60 of 50 tokens used this day" in error.message
    moment = datetime.fromtimestamp(now, UTC)
    midnight = (moment + timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
    assert error.headers["Retry-After"] == str(
        max(1, math.ceil((midnight - moment).total_seconds()))
    )

    status = limits_status(redis=client, limits=limited, now=now)
    assert status["budget"] | {"resets_at": None} == {
        "limit": 50,
        "period": "day",
        "used": 60,
        "remaining": 0,
        "resets_at": None,
    }
    assert status["budget"]["resets_at"] == midnight.isoformat()
    admit(client, limited, now=now + 86400)


def test_two_keys_are_counted_apart(client, limits):
    one, other = limits(requests_per_minute=1), limits(requests_per_minute=1)
    admit(client, one)
    refused(client, one)
    admit(client, other)


def test_the_counts_live_in_redis_not_in_the_process(client, limits):
    limited = limits(requests_per_minute=2, max_concurrent=5)
    admit(client, limited, request_id="a")
    client.close()

    fresh = Redis.from_url(settings.REDIS_URL)
    try:
        status = limits_status(redis=fresh, limits=limited)
        assert status["requests_per_minute"] == {"limit": 2, "used": 1, "remaining": 1}
        assert status["concurrent"] == {"limit": 5, "used": 1, "remaining": 4}
        admit(fresh, limited, request_id="b")
        assert "requests per minute" in refused(fresh, limited).message
    finally:
        fresh.close()


def test_admission_takes_places_atomically(client, limits):
    limited = limits(max_concurrent=5)

    def try_once(i: int) -> bool:
        own = Redis.from_url(settings.REDIS_URL)
        try:
            admit(own, limited, request_id=f"r{i}")
            return True
        except ApiError:
            return False
        finally:
            own.close()

    with ThreadPoolExecutor(20) as pool:
        results = list(pool.map(try_once, range(40)))
    assert results.count(True) == 5


def test_every_limit_reached_is_named(client, limits):
    limited = limits(requests_per_minute=1, token_budget=5, budget_period=LimitPeriod.MONTH)
    admit(client, limited, request_id="a")
    release(limited, "a", 5)
    error = refused(client, limited)
    assert error.code == "insufficient_quota"
    assert "requests per minute" in error.message and "this month" in error.message


def test_release_survives_an_unreachable_redis(limits, caplog):
    limited = limits(max_concurrent=1)
    with caplog.at_level(logging.WARNING, logger="apps.inference.limits"):
        release(limited, "lost", 10, url=UNREACHABLE)
    assert "not released" in caplog.text


@pytest.mark.django_db
def test_limits_come_from_the_key_then_the_user_then_the_role(django_assert_num_queries):
    owner = make_user(Role.APP_DEVELOPER, username="owner")
    key = api_key_create(actor=owner, owner=owner, name="bot", scopes=["inference"]).api_key
    UsageLimit.objects.create(
        role=Role.APP_DEVELOPER,
        requests_per_minute=10,
        tokens_per_minute=1000,
        token_budget=10_000,
        budget_period=LimitPeriod.MONTH,
    )
    UsageLimit.objects.create(role=Role.DATA_SCIENTIST, max_concurrent=99)
    UsageLimit.objects.create(user=owner, requests_per_minute=20)
    UsageLimit.objects.create(api_key=key, max_concurrent=2)
    other = make_user(Role.APP_DEVELOPER, username="other")
    UsageLimit.objects.create(user=other, tokens_per_minute=1)

    with django_assert_num_queries(1):
        limits = limits_for(user=owner, api_key=key)
    assert limits == Limits(
        subject=f"key:{key.pk}",
        requests_per_minute=20,
        tokens_per_minute=1000,
        max_concurrent=2,
        token_budget=10_000,
        budget_period="month",
    )
    session = limits_for(user=owner, api_key=None)
    assert session.subject == f"user:{owner.pk}"
    assert (session.requests_per_minute, session.max_concurrent) == (20, None)
    assert limits_for(
        user=make_user(Role.COMPLIANCE_OFFICER, username="co"), api_key=None
    ).unlimited
