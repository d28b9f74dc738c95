"""Reads: deployments a user may see, and the workers' heartbeats from Redis."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from django.conf import settings
from django.db.models import QuerySet

from aibox.redis_clients import sync_client
from apps.accounts.models import User
from apps.deployments.models import Deployment, Replica, State, WorkerCredential
from workers import redis_keys


def deployment_list(*, user: User):
    return (
        Deployment.objects.visible_to(user)
        .select_related("model_version__repo", "model_version__artifact")
        .prefetch_related("replica_set")
    )


@dataclass(frozen=True)
class WorkerStatus:
    hostname: str
    online: bool
    last_seen: float
    serving: bool
    pool: str
    cpu_cores: int
    cpu_model: str
    ram_total_mib: int
    ram_available_mib: int
    gpus: list[dict[str, Any]] = field(default_factory=list)
    replicas: list[dict[str, Any]] = field(default_factory=list)
    # AIBOX_WORKER_LABELS (``gpu=a100``, ``spot``): what deployments are placed by.
    labels: list[str] = field(default_factory=list)
    # Memory bandwidth and matrix throughput measured when the worker started.
    probe: dict[str, float] = field(default_factory=dict)

    @property
    def seconds_since_seen(self) -> float:
        return max(0.0, time.time() - self.last_seen)

    @property
    def queue_depth(self) -> int:
        return sum(r.get("queue_depth", 0) for r in self.replicas)

    def holds(self, replica: Replica) -> bool:
        return any(
            r["replica_id"] == replica.pk and r["generation"] == replica.generation
            for r in self.replicas
        )


def parse_heartbeat(raw: bytes | str | None, *, now: float | None = None) -> WorkerStatus | None:
    if not raw:
        return None
    data = json.loads(raw)
    now = time.time() if now is None else now
    online = not data.get("stopped") and now - data["sent_at"] < settings.WORKER_OFFLINE_AFTER
    return WorkerStatus(
        hostname=data["hostname"],
        online=online,
        last_seen=data["sent_at"],
        serving=bool(data.get("serving")) and online,
        pool=data.get("pool", ""),
        cpu_cores=data.get("cpu_cores", 0),
        cpu_model=data.get("cpu_model", ""),
        ram_total_mib=data.get("ram_total_mib", 0),
        ram_available_mib=data.get("ram_available_mib", 0),
        gpus=data.get("gpus", []),
        replicas=data.get("replicas", []) if online else [],
        labels=data.get("labels", []),  # a worker from before labels has none
        probe=data.get("probe", {}),
    )


def worker_list() -> list[WorkerStatus]:
    """Every worker seen in the last day, online ones first."""
    client = sync_client()
    names = sorted(n.decode() for n in client.smembers(redis_keys.WORKERS_SET))
    if not names:
        return []
    raws = client.mget([redis_keys.heartbeat_key(n) for n in names])
    workers = [w for w in (parse_heartbeat(raw) for raw in raws) if w is not None]
    gone = [n for n, raw in zip(names, raws, strict=True) if raw is None]
    if gone:
        client.srem(redis_keys.WORKERS_SET, *gone)
    return sorted(workers, key=lambda w: (not w.online, w.hostname))


def worker_get(hostname: str) -> WorkerStatus | None:
    return parse_heartbeat(sync_client().get(redis_keys.heartbeat_key(hostname)))


def replicas_serving(replicas: Iterable[Replica]) -> list[tuple[Replica, WorkerStatus]]:
    """The ready replicas (of one deployment) whose worker is online and holds them now.

    The database says what should run; only a live heartbeat that lists the replica's
    current generation says it does (after a restart the database may still say ready).
    """
    serving = []
    for replica in replicas:
        if replica.state != State.READY:
            continue
        worker = worker_get(replica.worker)
        if worker is not None and worker.online and worker.holds(replica):
            serving.append((replica, worker))
    return serving


def replica_live_states(deployment: Deployment, workers: list[WorkerStatus]) -> dict[int, str]:
    """What clients get from each replica now: its recorded state, unless its worker is
    offline or no longer holds it (then it is unavailable, whatever the database says)."""
    by_name = {w.hostname: w for w in workers}
    states = {}
    for replica in deployment.replica_set.all():
        worker = by_name.get(replica.worker)
        if replica.state == State.READY and (worker is None or not worker.holds(replica)):
            states[replica.pk] = "unavailable"
        else:
            states[replica.pk] = replica.state
    return states


@dataclass(frozen=True)
class Activity:
    """A deployment's traffic as its idle timer sees it."""

    # When it last admitted a request (Unix time); None if Redis has no record of one.
    last_request: float | None
    # Requests admitted and not yet finished (the admission bound's live entries).
    in_flight: int


def deployment_activity(*, deployment_ids: Iterable[int]) -> dict[int, Activity]:
    """Each deployment's last request and requests in flight, in one Redis round trip.

    The admission script stamps the time with every request it admits (gateway
    ``Call.admit``), so this costs the request path nothing; the bound's entries are
    removed when a request ends and expire after their queue timeout.
    """
    ids = list(deployment_ids)
    if not ids:
        return {}
    now = time.time()
    pipe = sync_client().pipeline(transaction=False)
    for pk in ids:
        pipe.get(redis_keys.last_request_key(pk))
        pipe.zcount(redis_keys.admission_key(pk), f"({now}", "+inf")
    results = pipe.execute()
    return {
        pk: Activity(
            last_request=float(results[2 * i]) if results[2 * i] is not None else None,
            in_flight=int(results[2 * i + 1]),
        )
        for i, pk in enumerate(ids)
    }


def worker_credential_list() -> QuerySet[WorkerCredential]:
    """Every worker credential, active and revoked, with who issued it."""
    return WorkerCredential.objects.select_related("created_by")
