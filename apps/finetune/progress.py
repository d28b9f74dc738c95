"""How a running fine-tune's reports travel: the worker appends them to a Redis stream
per job and asks for them to be applied; the control plane applies each stream entry
once, in order, under the job's row lock (see runs.finetune_progress_apply).

Cancellation travels the other way: a flag in Redis that the runner polls every step.

Liveness: while a job runs, a thread in its worker refreshes a per-job key with a short
time to live (``Heartbeat``). A worker that dies (killed, out of memory, its machine
gone) stops refreshing it, the key expires, and the control plane marks the job failed
(runs.finetune_job_fail_if_silent). A second key remembers when it was last seen.

Redis may go away mid-run and come back empty (restarted without its data): the
runner keeps its reports until Redis takes them and sends again those it lost before
they were applied (``Reporter``); a heartbeat lost with Redis's data is not taken for a
silent worker (``heartbeat_lost``); the training queue's lost messages are sent again
(``queue_lost``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import redis
from django.conf import settings

from aibox.redis_clients import sync_client
from workers import redis_keys

log = logging.getLogger(__name__)

STREAM_MAX = 20_000  # entries kept per job; applied ones are trimmed as it goes
FLUSH_SECONDS = 1.0
# While Redis is unreachable the runner tries again at most this often (each try may
# cost redis-py's own retries), and waits this long for it at the end of a run.
RETRY_SECONDS = 1.0
FLUSH_WAIT_SECONDS = 300.0


def client() -> redis.Redis:
    # With timeouts: a Redis that hangs must not hang a training run with it.
    return sync_client()


def queue_lost() -> bool:
    """True once after Redis lost its data (and on first use): the training queue's
    messages may have gone with it."""
    return bool(client().set(redis_keys.FINETUNE_QUEUE_MARK, "1", nx=True))


def request_cancel(job_id: int) -> None:
    client().set(redis_keys.finetune_cancel_key(job_id), "1", ex=7 * 24 * 3600)


def clear_cancel(job_id: int) -> None:
    client().delete(redis_keys.finetune_cancel_key(job_id))


def cancel_requested(job_id: int) -> bool:
    return bool(client().exists(redis_keys.finetune_cancel_key(job_id)))


SEEN_KEPT_S = 7 * 24 * 3600


def beat(job_id: int, worker: str, ttl: float) -> None:
    """Say the job's worker is alive for the next ``ttl`` seconds."""
    seen = json.dumps({"worker": worker, "at": time.time()})
    pipe = client().pipeline()
    pipe.set(redis_keys.finetune_alive_key(job_id), seen, px=max(1, int(ttl * 1000)))
    pipe.set(redis_keys.finetune_seen_key(job_id), seen, ex=SEEN_KEPT_S)
    pipe.execute()


def alive(job_id: int) -> bool:
    return bool(client().exists(redis_keys.finetune_alive_key(job_id)))


def silent(job_id: int) -> bool:
    """The job's worker stopped beating: its liveness key expired while the one that
    remembers its last beat remains (and any grace ``heartbeat_lost`` gave is over)."""
    pipe = client().pipeline()
    pipe.exists(redis_keys.finetune_alive_key(job_id))
    pipe.get(redis_keys.finetune_seen_key(job_id))
    is_alive, raw = pipe.execute()
    if is_alive or raw is None:
        return False
    return time.time() >= json.loads(raw).get("grace_until", 0)


def heartbeat_lost(job_id: int, *, ttl: float) -> bool:
    """A running job has neither key: Redis lost them (it restarted without its data).
    Its silence counts from now, so a live worker has ``ttl`` seconds to beat again (it
    does within a fifth of that) and a dead one is silent after it. False if a key is
    there after all."""
    if client().exists(redis_keys.finetune_alive_key(job_id)):
        return False
    now = time.time()
    record = json.dumps({"lost_at": now, "grace_until": now + ttl})
    return bool(client().set(redis_keys.finetune_seen_key(job_id), record, ex=SEEN_KEPT_S, nx=True))


def last_seen(job_id: int) -> dict[str, Any] | None:
    """{"worker", "at" (a Unix time)} of the job's last heartbeat, if one was sent; or
    {"lost_at", "grace_until"} when Redis had lost it (``heartbeat_lost``)."""
    raw = client().get(redis_keys.finetune_seen_key(job_id))
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
            client().delete(redis_keys.finetune_alive_key(self.job_id))

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
    second (and on ``flush``) ask the control plane to apply what is new.

    Should Redis go away, reports wait here, in order, and training goes on. Each report
    sent is remembered with its entry id until it is applied (``applied()`` gives the
    last entry id the control plane applied): when Redis answers again having lost the
    stream, the reports it lost unapplied are sent again, so every step is recorded
    once. A stream that vanished (XADD NOMKSTREAM refuses) says Redis lost its data
    even when no request failed, as after a restart between two steps.
    """

    def __init__(
        self, job_id: int, apply: Callable[[int], None], applied: Callable[[], str]
    ) -> None:
        self.job_id = job_id
        self.apply = apply
        self.applied = applied
        self.last_sent = 0.0
        self.lock = threading.Lock()
        self.waiting: deque[str] = deque()  # reports Redis has not taken yet
        self.sent: deque[tuple[str, str]] = deque(maxlen=STREAM_MAX)  # (entry id, report)
        self.unreachable = False  # since the last request that failed
        self.next_try = 0.0

    def __call__(self, event: dict[str, Any]) -> None:
        payload = json.dumps({**event, "at": time.time()}, default=str)
        now = time.monotonic()
        with self.lock:
            self.waiting.append(payload)
            if now < self.next_try or not self._send():
                return
            due = now - self.last_sent >= FLUSH_SECONDS or event.get("event") != "progress"
            if due:
                self.last_sent = now
        if due:
            self.apply(self.job_id)

    def flush(self, *, wait: float = FLUSH_WAIT_SECONDS) -> None:
        """Send what waits, waiting up to ``wait`` seconds for Redis, and have it applied."""
        deadline = time.monotonic() + wait
        while True:
            with self.lock:
                if self._send():
                    break
            if time.monotonic() >= deadline:
                raise redis.ConnectionError(
                    f"Redis was unreachable for {wait:.0f} s at the end of the run."
                )
            time.sleep(RETRY_SECONDS)
        self.apply(self.job_id)

    def _send(self) -> bool:
        """Append the waiting reports in order; False (keeping them) if Redis is away."""
        try:
            if self.unreachable:
                self._resend_lost()
            while self.waiting:
                entry_id = client().xadd(
                    redis_keys.finetune_events_key(self.job_id),
                    {"e": self.waiting[0]},
                    maxlen=STREAM_MAX,
                    nomkstream=bool(self.sent),
                )
                if entry_id is None:  # the stream is gone with Redis's data
                    self._resend_lost()
                    continue
                self.sent.append((entry_id.decode(), self.waiting.popleft()))
        except redis.RedisError:
            self.unreachable = True
            self.next_try = time.monotonic() + RETRY_SECONDS
            return False
        self.unreachable = False
        return True

    def _resend_lost(self) -> None:
        """Queue again, ahead of the waiting ones, the reports that are neither applied
        nor in the stream any more. The stream is read before the applied position, so
        an entry applied (and trimmed) in between is never taken for a lost one."""
        present = {
            entry_id.decode()
            for entry_id, _ in client().xrange(redis_keys.finetune_events_key(self.job_id))
        }
        applied = _entry_order(self.applied())
        unapplied = [(i, report) for i, report in self.sent if _entry_order(i) > applied]
        lost = [report for i, report in unapplied if i not in present]
        self.sent = deque(((i, r) for i, r in unapplied if i in present), maxlen=STREAM_MAX)
        self.waiting.extendleft(reversed(lost))
        if lost:
            log.warning(
                "fine-tune %s: Redis lost %d reports; sending them again", self.job_id, len(lost)
            )


def _entry_order(entry_id: str) -> tuple[int, int]:
    """A stream entry id ("<ms>-<seq>", or "0" for none yet) as something to compare."""
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def read_after(job_id: int, last_id: str) -> list[tuple[str, dict[str, Any]]]:
    """Stream entries after ``last_id`` ("0" for all), oldest first."""
    start = f"({last_id}" if last_id and last_id != "0" else "-"
    entries = client().xrange(redis_keys.finetune_events_key(job_id), min=start, max="+")
    return [(entry_id.decode(), json.loads(fields[b"e"])) for entry_id, fields in entries]


def trim(job_id: int, upto_id: str) -> None:
    client().xtrim(redis_keys.finetune_events_key(job_id), minid=upto_id)


def drop(job_id: int) -> None:
    client().delete(
        redis_keys.finetune_events_key(job_id),
        redis_keys.finetune_cancel_key(job_id),
        redis_keys.finetune_alive_key(job_id),
        redis_keys.finetune_seen_key(job_id),
    )
