"""The inference runtime of one worker process: its resident replicas and their events.

One ``Runtime`` per worker process (``runtime()``), configured once at worker start
with the Redis URL, the local cache directory and its limit, and, for a worker on
another host, where it pulls artifacts from (``RemoteSource``). Celery task bridges call
``load``/``unload``/``submit``; the heartbeat reads ``snapshot``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis

from workers import redis_keys
from workers.hardware import inventory
from workers.inference import protocol
from workers.inference.cache import ModelCache, RemoteSource
from workers.inference.engine import LoadError, Replica
from workers.inference.protocol import ReplicaSpec, RequestSpec
from workers.probe import probe

log = logging.getLogger(__name__)


class RedisSink:
    """Writes request events to Redis streams from a background thread.

    A replica's decode loop only queues an event and goes on with the next token; the
    publisher thread writes whatever has queued in one pipelined round trip, merging
    consecutive text deltas of a request when it has fallen behind (fewer, larger SSE
    chunks rather than a slower decode). It reads the cancel flags of the requests it
    wrote for in the same round trip; ``send`` answers from the latest of those.
    """

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self._pending: queue.SimpleQueue[tuple[str, dict[str, Any]]] = queue.SimpleQueue()
        self._cancelled: set[str] = set()
        self._thread = threading.Thread(target=self._publish, name="event-publisher", daemon=True)
        self._thread.start()

    def send(self, request_id: str, event: dict[str, Any]) -> bool:
        self._pending.put((request_id, event))
        return request_id in self._cancelled

    def cancelled(self, request_id: str) -> bool:
        if self.client.exists(redis_keys.cancel_key(request_id)):
            self._cancelled.add(request_id)
        return request_id in self._cancelled

    def _publish(self) -> None:
        while True:
            batch = [self._pending.get()]
            while True:
                try:
                    batch.append(self._pending.get_nowait())
                except queue.Empty:
                    break
            try:
                self._write(_merge_deltas(batch))
            except redis.RedisError:
                log.warning("could not publish %d inference events", len(batch), exc_info=True)

    def _write(self, batch: list[tuple[str, dict[str, Any]]]) -> None:
        pipe = self.client.pipeline(transaction=False)
        finished = set()
        for request_id, event in batch:
            key = redis_keys.events_key(request_id)
            pipe.xadd(key, {"e": json.dumps(event)})
            if event["type"] in (protocol.START, protocol.END, protocol.ERROR):
                pipe.expire(key, protocol.EVENT_STREAM_TTL_SECONDS)
            if event["type"] in (protocol.END, protocol.ERROR):
                finished.add(request_id)
        watched = sorted({request_id for request_id, _ in batch} - finished)
        for request_id in watched:
            pipe.exists(redis_keys.cancel_key(request_id))
        results = pipe.execute()
        for request_id, flag in zip(watched, results[len(results) - len(watched) :], strict=True):
            if flag:
                self._cancelled.add(request_id)
        self._cancelled -= finished
        if len(self._cancelled) > 10_000:  # requests cancelled long ago never send an end
            self._cancelled.clear()


def _merge_deltas(batch: list[tuple[str, dict[str, Any]]]) -> list[tuple[str, dict[str, Any]]]:
    merged: list[tuple[str, dict[str, Any]]] = []
    for request_id, event in batch:
        if (
            event["type"] == protocol.DELTA
            and merged
            and merged[-1][0] == request_id
            and merged[-1][1]["type"] == protocol.DELTA
        ):
            previous = merged[-1][1]
            merged[-1] = (request_id, {**previous, "text": previous["text"] + event["text"]})
        else:
            merged.append((request_id, event))
    return merged


# A replaced replica unloads after this long without work (requests routed to it before
# the switch may still arrive), and at the latest after the timeout.
RETIRE_QUIET_SECONDS = 2.0
RETIRE_TIMEOUT_SECONDS = 600.0
RETIRE_POLL_SECONDS = 0.05


class Runtime:
    def __init__(
        self,
        redis_url: str,
        cache_dir: str | os.PathLike[str],
        *,
        remote: RemoteSource | None = None,
        cache_max_bytes: int = 0,
    ) -> None:
        self.redis = redis.Redis.from_url(redis_url)
        self.sink = RedisSink(self.redis)
        self.cache = ModelCache(
            cache_dir, remote=remote, max_bytes=cache_max_bytes, in_use=self.files_in_use
        )
        self._replicas: dict[int, Replica] = {}
        self._lock = threading.Lock()
        # Files of loads in progress (sha256 -> count): not evicted while they load.
        self._loading_files: dict[str, int] = {}
        # Highest generation of each replica that was unloaded: a load of that generation
        # (or older) still in progress when the unload came is dropped once it finishes.
        self._unloaded: dict[int, int] = {}
        self._loading: dict[int, threading.Lock] = {}
        # Called after a replica is loaded or unloaded (the heartbeat: the control plane
        # learns at once what this worker holds, before it is told the replica is ready).
        self.on_change: Callable[[], None] = lambda: None
        self._cpu_cores = inventory().cpu_cores

    def load(self, spec: ReplicaSpec) -> Replica:
        """Fetch, verify and load a replica; an older generation of it is stopped first."""
        with self._lock:
            loading = self._loading.setdefault(spec.replica_id, threading.Lock())
        with loading:
            current = self._replicas.get(spec.replica_id)
            if current is not None and current.spec.generation >= spec.generation:
                return current  # a duplicate delivery of the same load
            self.unload(spec.replica_id, reason="The deployment is restarting.")
            files = [sha for sha in (spec.sha256, spec.adapter_sha256) if sha]
            self._pin(files, 1)
            try:
                path = self.cache.fetch(spec.sha256, Path(spec.source_path))
                adapter = (
                    self.cache.fetch(spec.adapter_sha256, Path(spec.adapter_source_path))
                    if spec.adapter_sha256
                    else None
                )
                replica = Replica(spec, path, self.sink, self._cpu_cores, adapter_path=adapter)
                replica.load()
            finally:
                self._pin(files, -1)
            with self._lock:
                if self._unloaded.get(spec.replica_id, 0) >= spec.generation:
                    cancelled = True
                else:
                    cancelled = False
                    self._replicas[spec.replica_id] = replica
            if cancelled:
                replica.stop()
                raise LoadError("The deployment was stopped while it was loading.")
            self._changed()
            return replica

    def _pin(self, files: list[str], delta: int) -> None:
        with self._lock:
            for sha256 in files:
                count = self._loading_files.get(sha256, 0) + delta
                if count > 0:
                    self._loading_files[sha256] = count
                else:
                    self._loading_files.pop(sha256, None)

    def files_in_use(self) -> set[str]:
        """The sha256s of the files that loaded or loading replicas hold (the cache
        never evicts them)."""
        with self._lock:
            held = set(self._loading_files)
            for replica in self._replicas.values():
                held.add(replica.spec.sha256)
                if replica.spec.adapter_sha256:
                    held.add(replica.spec.adapter_sha256)
        return held

    def unload(
        self,
        replica_id: int,
        *,
        generation: int | None = None,
        reason: str = "The deployment was stopped.",
    ) -> bool:
        with self._lock:
            if generation is not None:
                self._unloaded[replica_id] = max(self._unloaded.get(replica_id, 0), generation)
            replica = self._replicas.get(replica_id)
            if replica is None or (generation is not None and replica.spec.generation > generation):
                return False
            del self._replicas[replica_id]
        replica.stop(reason)
        self._changed()
        return True

    def retire(
        self,
        replica_id: int,
        *,
        generation: int,
        quiet_seconds: float = RETIRE_QUIET_SECONDS,
        timeout: float = RETIRE_TIMEOUT_SECONDS,
        reason: str = "The deployment switched to another setup.",
    ) -> bool:
        """Unload a replica that no longer takes requests (another one replaced it, or it
        sat idle), once it has finished its work.

        It keeps serving what reaches it until it has been idle for ``quiet_seconds``:
        requests routed to it just before it was taken out may still be on their way.
        After ``timeout`` it unloads whatever it holds (a stream that long is cut, with
        ``reason``).
        """
        with self._lock:
            replica = self._replicas.get(replica_id)
        if replica is None or replica.spec.generation > generation:
            return False
        deadline = time.monotonic() + timeout
        quiet_since = time.monotonic()
        while time.monotonic() < deadline:
            if replica.busy():
                quiet_since = time.monotonic()
            elif time.monotonic() - quiet_since >= quiet_seconds:
                break
            time.sleep(RETIRE_POLL_SECONDS)
        return self.unload(replica_id, generation=generation, reason=reason)

    def _changed(self) -> None:
        try:
            self.on_change()
        except Exception:  # noqa: BLE001 - a missed beat is retried by the next one
            log.warning("heartbeat after a change failed", exc_info=True)

    def submit(self, request: RequestSpec) -> None:
        with self._lock:
            replica = self._replicas.get(request.replica_id)
        if replica is None or replica.spec.generation != request.generation:
            self.sink.send(
                request.request_id,
                {
                    "type": protocol.ERROR,
                    "code": protocol.REPLICA_UNAVAILABLE,
                    "message": "The model is not loaded on this worker (it was stopped or "
                    "the worker restarted).",
                },
            )
            return
        replica.submit(request)

    def snapshot(self) -> list[dict[str, Any]]:
        with self._lock:
            replicas = list(self._replicas.values())
        return [replica.snapshot() for replica in replicas]

    def shutdown(self) -> None:
        for replica_id in list(self._replicas):
            self.unload(replica_id, reason="The worker is shutting down.")


_runtime: Runtime | None = None


def configure(
    redis_url: str,
    cache_dir: str | os.PathLike[str],
    *,
    remote: RemoteSource | None = None,
    cache_max_bytes: int = 0,
) -> Runtime:
    global _runtime
    if _runtime is None:
        _runtime = Runtime(redis_url, cache_dir, remote=remote, cache_max_bytes=cache_max_bytes)
    return _runtime


def shutdown() -> None:
    """Unload every replica of this process's runtime, if it has one."""
    if _runtime is not None:
        _runtime.shutdown()


def runtime() -> Runtime:
    if _runtime is None:
        raise RuntimeError("The inference runtime is not configured in this process.")
    return _runtime


def heartbeat_payload(
    hostname: str, *, pool: str, serving: bool, labels: list[str] | None = None
) -> dict[str, Any]:
    payload = inventory().as_dict()
    payload.update(
        probe=probe(),
        hostname=hostname,
        pool=pool,
        serving=serving,
        labels=list(labels or []),
        pid=os.getpid(),
        sent_at=time.time(),
        replicas=_runtime.snapshot() if _runtime is not None else [],
    )
    return payload


class Heartbeat:
    """Rewrites this worker's heartbeat key every few seconds from a daemon thread."""

    def __init__(
        self,
        redis_url: str,
        hostname: str,
        *,
        pool: str,
        serving: bool,
        labels: list[str] | None = None,
    ) -> None:
        self.redis = redis.Redis.from_url(redis_url)
        self.hostname = hostname
        self.pool = pool
        self.serving = serving
        # AIBOX_WORKER_LABELS, checked by the settings: placement matches deployments by them.
        self.labels = list(labels or [])
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)

    def start(self) -> None:
        self.beat()
        self._thread.start()

    def beat(self) -> None:
        payload = heartbeat_payload(
            self.hostname, pool=self.pool, serving=self.serving, labels=self.labels
        )
        pipe = self.redis.pipeline(transaction=False)
        # Kept for a day so the UI can say since when a worker is offline.
        pipe.set(redis_keys.heartbeat_key(self.hostname), json.dumps(payload), ex=86400)
        pipe.sadd(redis_keys.WORKERS_SET, self.hostname)
        pipe.execute()

    def _run(self) -> None:
        while not self._stop.wait(protocol.HEARTBEAT_INTERVAL_SECONDS):
            try:
                self.beat()
            except redis.RedisError as exc:
                log.warning("heartbeat failed: %s", exc)

    def stop(self) -> None:
        """A last beat that says the worker left, so it shows offline at once."""
        self._stop.set()
        self.serving = False
        payload = heartbeat_payload(
            self.hostname, pool=self.pool, serving=False, labels=self.labels
        )
        payload.update(stopped=True, replicas=[])
        with contextlib.suppress(redis.RedisError):
            self.redis.set(redis_keys.heartbeat_key(self.hostname), json.dumps(payload), ex=86400)
