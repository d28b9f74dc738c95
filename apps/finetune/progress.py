"""How a running fine-tune's reports travel: the worker appends them to a Redis stream
per job and asks for them to be applied; the control plane applies each stream entry
once, in order, under the job's row lock (see services.finetune_progress_apply).

Cancellation travels the other way: a flag in Redis that the runner polls every step.

Liveness: while a job runs, a thread in its worker refreshes a per-job key with a short
time to live (``Heartbeat``). A worker that dies (killed, out of memory, its machine
gone) stops refreshing it, the key expires, and the control plane marks the job failed
(services.finetune_job_fail_if_silent). A second key remembers when it was last seen.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Callable
from functools import lru_cache
from typing import Any

import redis
from django.conf import settings

STREAM_MAX = 20_000  # entries kept per job; applied ones are trimmed as it goes
FLUSH_SECONDS = 1.0


@lru_cache(maxsize=1)
def client() -> redis.Redis:
    return redis.Redis.from_url(settings.REDIS_URL)


def stream_key(job_id: int) -> str:
    return f"aibox:finetune:{job_id}:events"


def cancel_key(job_id: int) -> str:
    return f"aibox:finetune:{job_id}:cancel"


def alive_key(job_id: int) -> str:
    return f"aibox:finetune:{job_id}:alive"


def seen_key(job_id: int) -> str:
    return f"aibox:finetune:{job_id}:seen"


def request_cancel(job_id: int) -> None:
    client().set(cancel_key(job_id), "1", ex=7 * 24 * 3600)


def clear_cancel(job_id: int) -> None:
    client().delete(cancel_key(job_id))


def cancel_requested(job_id: int) -> bool:
    return bool(client().exists(cancel_key(job_id)))


SEEN_KEPT_S = 7 * 24 * 3600


def beat(job_id: int, worker: str, ttl: float) -> None:
    """Say the job's worker is alive for the next ``ttl`` seconds."""
    seen = json.dumps({"worker": worker, "at": time.time()})
    pipe = client().pipeline()
    pipe.set(alive_key(job_id), seen, px=max(1, int(ttl * 1000)))
    pipe.set(seen_key(job_id), seen, ex=SEEN_KEPT_S)
    pipe.execute()


def alive(job_id: int) -> bool:
    return bool(client().exists(alive_key(job_id)))


def last_seen(job_id: int) -> dict[str, Any] | None:
    """{"worker", "at" (a Unix time)} of the job's last heartbeat, if one was sent."""
    raw = client().get(seen_key(job_id))
    return json.loads(raw) if raw else None


class Heartbeat:
    """Refresh the job's liveness key from a thread, several times per time to live.

    A thread rather than the training loop: one step, the base model's conversion or the
    adapter's export can each take longer than the time to live, and the worker is
    alive through all of them. The first beat is sent before ``start`` returns, so a
    job is never seen running without one.
    """

    def __init__(self, job_id: int, worker: str, ttl: float | None = None) -> None:
        self.job_id, self.worker = job_id, worker
        self.ttl = float(ttl if ttl is not None else settings.FINETUNE_HEARTBEAT_TTL)
        self.stopped = threading.Event()
        self.thread = threading.Thread(
            target=self._run, name=f"finetune-{job_id}-heartbeat", daemon=True
        )

    def __enter__(self) -> Heartbeat:
        beat(self.job_id, self.worker, self.ttl)
        self.thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stopped.set()
        self.thread.join(timeout=5)
        # Should Redis be away, the key expires on its own; the outcome is recorded already.
        with contextlib.suppress(redis.RedisError):
            client().delete(alive_key(self.job_id))

    def _run(self) -> None:
        interval = max(0.2, self.ttl / 5)
        while not self.stopped.wait(interval):
            try:
                beat(self.job_id, self.worker, self.ttl)
            except redis.RedisError:
                # Redis away for a moment: the next beat may get through in time.
                continue


class Reporter:
    """The runner's ``report`` callback: append to the job's stream, and at most once a
    second (and on ``flush``) ask the control plane to apply what is new."""

    def __init__(self, job_id: int, apply: Callable[[int], None]) -> None:
        self.job_id = job_id
        self.apply = apply
        self.last_sent = 0.0
        self.lock = threading.Lock()

    def __call__(self, event: dict[str, Any]) -> None:
        payload = json.dumps({**event, "at": time.time()}, default=str)
        client().xadd(stream_key(self.job_id), {"e": payload}, maxlen=STREAM_MAX)
        now = time.monotonic()
        with self.lock:
            due = now - self.last_sent >= FLUSH_SECONDS or event.get("event") != "progress"
            if due:
                self.last_sent = now
        if due:
            self.apply(self.job_id)

    def flush(self) -> None:
        self.apply(self.job_id)


def read_after(job_id: int, last_id: str) -> list[tuple[str, dict[str, Any]]]:
    """Stream entries after ``last_id`` ("0" for all), oldest first."""
    start = f"({last_id}" if last_id and last_id != "0" else "-"
    entries = client().xrange(stream_key(job_id), min=start, max="+")
    return [(entry_id.decode(), json.loads(fields[b"e"])) for entry_id, fields in entries]


def trim(job_id: int, upto_id: str) -> None:
    client().xtrim(stream_key(job_id), minid=upto_id)


def drop(job_id: int) -> None:
    client().delete(stream_key(job_id), cancel_key(job_id), alive_key(job_id), seen_key(job_id))
