"""The control plane's Redis clients, in one place, so every part of the web process,
the Celery tasks and beat reach Redis (``REDIS_URL``) the same way.

Sync code (views, services, tasks) shares one client per process and URL: a thread-safe
connection pool whose calls give up after ``TIMEOUT_S`` rather than hang a request on a
Redis that does not answer. Async code (the ``/v1/`` views) gets one client per event
loop and URL, as a client's connections belong to the loop that opened them; it sets no
read timeout, because it blocks on stream reads (``XREAD BLOCK``) on purpose.

Key names stay with the code that owns them: ``workers/inference/protocol.py`` (serving),
``apps/finetune/progress.py`` and ``apps/inference/limits.py``.
"""

from __future__ import annotations

import asyncio
import weakref

import redis
import redis.asyncio as aioredis
from django.conf import settings

TIMEOUT_S = 2

_sync: dict[str, redis.Redis] = {}
_async: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, aioredis.Redis]] = (
    weakref.WeakKeyDictionary()
)


def sync_client() -> redis.Redis:
    """This process's client for ``settings.REDIS_URL``."""
    url = settings.REDIS_URL
    client = _sync.get(url)
    if client is None:
        client = redis.Redis.from_url(
            url, socket_timeout=TIMEOUT_S, socket_connect_timeout=TIMEOUT_S
        )
        _sync[url] = client
    return client


def async_client() -> aioredis.Redis:
    """The running event loop's client for ``settings.REDIS_URL``."""
    clients = _async.setdefault(asyncio.get_running_loop(), {})
    url = settings.REDIS_URL
    client = clients.get(url)
    if client is None:
        client = aioredis.Redis.from_url(url, socket_connect_timeout=TIMEOUT_S)
        clients[url] = client
    return client
