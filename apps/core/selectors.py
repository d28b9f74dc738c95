from __future__ import annotations

from dataclasses import dataclass

import redis
from django.core.cache import cache
from django.db import connection

from aibox.celery import app as celery_app
from aibox.redis_clients import sync_client


@dataclass(frozen=True)
class Readiness:
    database: str
    redis: str
    workers: list[str]

    @property
    def ready(self) -> bool:
        return self.database == "ok" and self.redis == "ok"


def _check_database() -> str:
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
        return "ok"
    except Exception as exc:  # noqa: BLE001 - any failure means not ready; say which
        return f"error: {type(exc).__name__}"


def _check_redis() -> str:
    try:
        sync_client().ping()
        return "ok"
    except redis.RedisError as exc:
        return f"error: {type(exc).__name__}"


def live_workers(timeout: float = 0.5) -> list[str]:
    """Names of Celery workers that answer a broadcast ping within ``timeout`` seconds."""
    try:
        replies = celery_app.control.ping(timeout=timeout) or []
    except Exception:  # noqa: BLE001 - broker down: no worker is reachable
        return []
    return sorted(name for reply in replies for name in reply)


LIVE_WORKERS_CACHE_KEY = "core:live_workers"


def live_workers_recent(max_age: int = 10) -> list[str]:
    """The workers for a page: a ping waits its whole timeout, so reuse a recent answer."""
    try:
        workers = cache.get(LIVE_WORKERS_CACHE_KEY)
    except redis.RedisError:
        return []
    if workers is None:
        workers = live_workers()
        cache.set(LIVE_WORKERS_CACHE_KEY, workers, max_age)
    return workers


def readiness() -> Readiness:
    redis_state = _check_redis()
    workers = live_workers() if redis_state == "ok" else []
    return Readiness(database=_check_database(), redis=redis_state, workers=workers)
