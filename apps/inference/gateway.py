"""The path of one inference request from the HTTP endpoint to a worker and back.

1. ``route``: the deployment the client named, checked against the caller's key, and a
   ready replica on a worker whose heartbeat is fresh (else 404 / 503 at once). A
   deployment unloaded while idle is loaded again first, the request waiting for it up
   to the deployment's load timeout.
2. ``admit``: a per-deployment bound on requests in flight, kept in Redis so every
   web process shares it (else 429 with Retry-After).
3. ``dispatch``: a Celery task on the worker's own queue; the worker hands it to the
   replica's thread.
4. ``events``: the worker's events for this request, read from a Redis stream. While
   waiting, the worker's heartbeat is checked, so a dead worker ends the request with a
   clean error instead of a hang; a client that goes away sets the cancel flag, and the
   worker stops generating at the next token.

Over 400 lines on purpose: the four steps share the route and the Redis client, and
reading them in order is the point of this module.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from redis.exceptions import RedisError

from aibox.redis_clients import async_client, sync_client
from apps.accounts.models import ApiKey, Scope, User
from apps.deployments import selectors as deployment_selectors
from apps.deployments.lifecycle import deployment_load_on_demand
from apps.deployments.models import INFERENCE_ROLES, PRESET_SAMPLING, Deployment, Replica, State
from apps.deployments.placement import PlacementError
from apps.inference.openai_api import ApiError
from workers import redis_keys
from workers.inference import protocol

logger = logging.getLogger(__name__)

# A request that was admitted but whose client vanished without a trace is forgotten
# after its queue timeout plus this long.
ADMISSION_GRACE_SECONDS = 900
# How long to wait for a worker's first word beyond the deployment's queue timeout.
START_GRACE_SECONDS = 5.0
LIVENESS_CHECK_SECONDS = 1.0
# A request waiting for its deployment to load looks at the database this often.
LOAD_POLL_SECONDS = 0.25
# Retry-After when a load did not finish in time (it goes on) or could not start.
LOAD_RETRY_AFTER_SECONDS = 10

# Admission and the choice of replica in one step, so that concurrent requests from any
# web process spread over the replicas: KEYS[1] the deployment's bound, KEYS[2] its idle
# timer, KEYS[3..] each candidate replica's requests in flight (in order of preference).
# Returns the chosen candidate's position (1-based), or 0 when the bound is full.
_ADMIT = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then return 0 end
local chosen, fewest = 3, nil
for i = 3, #KEYS do
  redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', ARGV[1])
  local n = redis.call('ZCARD', KEYS[i])
  if fewest == nil or n < fewest then chosen, fewest = i, n end
end
redis.call('ZADD', KEYS[1], ARGV[4], ARGV[3])
redis.call('EXPIRE', KEYS[1], 86400)
redis.call('ZADD', KEYS[chosen], ARGV[4], ARGV[3])
redis.call('EXPIRE', KEYS[chosen], 86400)
redis.call('SET', KEYS[2], ARGV[1], 'EX', 2592000)
return chosen - 2
"""


@dataclass(frozen=True)
class Caller:
    user: User
    api_key: ApiKey | None = None


@dataclass
class Route:
    deployment_id: int
    deployment_name: str
    logging_level: str
    queue_timeout: float
    admission_limit: int
    sampling: dict[str, float]
    replica_id: int
    generation: int
    worker: str
    sha256: str
    embeddings: bool
    context_length: int = 0
    adapter_sha256: str = ""
    # The deployment's revision that serves the request (its setup at the time).
    revision: int = 0
    # How long the request waited for the deployment to load (None: it was loaded).
    load_ms: float | None = None
    # The live replicas it may go to, as (replica id, generation, worker), the least
    # busy by their workers' heartbeats first; admission picks the one with the fewest
    # requests in flight, and the route then names it (replica_id, generation, worker).
    candidates: tuple[tuple[int, int, str], ...] = ()


def check_inference_access(caller: Caller) -> None:
    if not caller.user.has_role(*INFERENCE_ROLES):
        raise ApiError(
            403,
            "Your role does not allow calling the inference API.",
            type="permission_error",
            code="insufficient_permissions",
        )
    key = caller.api_key
    if key is not None and Scope.INFERENCE not in key.scopes and Scope.ADMIN not in key.scopes:
        raise ApiError(
            403,
            "This API key lacks the 'inference' scope.",
            type="permission_error",
            code="insufficient_scope",
        )


def may_use(caller: Caller, name: str) -> bool:
    key = caller.api_key
    if key is None or Scope.ADMIN in key.scopes:
        return True
    return key.allows_deployment(name)


def not_found(name: str) -> ApiError:
    return ApiError(
        404,
        f"The model '{name}' does not exist or you do not have access to it.",
        code="model_not_found",
        param="model",
    )


def unavailable(message: str) -> ApiError:
    return ApiError(503, message, type="server_error", code="model_unavailable")


class LoadFailed(ApiError):
    """The request waited for its deployment to load, and it did not (in time): a 503
    whose usage record still shows the wait (``route`` carries it)."""

    def __init__(self, message: str, *, code: str, route: Route) -> None:
        super().__init__(
            503,
            message,
            type="server_error",
            code=code,
            headers={"Retry-After": str(LOAD_RETRY_AFTER_SECONDS)},
        )
        self.route = route


def broker_unavailable() -> ApiError:
    """Redis, which carries requests and their tokens between web and workers, is gone."""
    return ApiError(
        503,
        "AIBox lost its connection to Redis, which carries requests to the workers; the "
        "request was abandoned. Retry in a few seconds.",
        type="server_error",
        code="broker_unavailable",
        headers={"Retry-After": "5"},
    )


# What routing reads, in one query: the deployment's columns on each of its replicas'
# rows (one row of NULL replica columns if it has none). Every request pays for the
# columns, joins and queries it fetches: model instances with select_related and a
# prefetch cost 5 ms a request here, two queries of these columns 1.8 ms, one 1 ms.
_ROUTE_FIELDS = (
    "id",
    "logging_level",
    "queue_timeout_seconds",
    "queue_size",
    "parallel_slots",
    "preset",
    "embeddings",
    "context_length",
    "running",
    "state",
    "state_reason",
    "idle_unload_seconds",
    "load_timeout_seconds",
    "idle_unloaded_at",
    "model_version__artifact",  # an artifact's key is its sha256
    "adapter__artifact",
    "revision",
    "revision__number",
    "replica_set__id",
    "replica_set__revision",
    "replica_set__index",
    "replica_set__worker",
    "replica_set__generation",
    "replica_set__state",
)


def _served_replicas(rows: list[dict[str, Any]]) -> list[Replica]:
    deployment = rows[0]
    return [
        Replica(
            id=row["replica_set__id"],
            deployment_id=deployment["id"],
            index=row["replica_set__index"],
            worker=row["replica_set__worker"],
            generation=row["replica_set__generation"],
            state=row["replica_set__state"],
        )
        for row in rows
        # Only the served revision's replicas: one loading beside it for a switch, or one
        # draining after it, takes no new requests.
        if row["replica_set__id"] is not None
        and row["replica_set__revision"] in (deployment["revision"], None)
    ]


def _loads_on_demand(deployment: dict[str, Any]) -> bool:
    """Whether a request should wait for this deployment (running, nothing ready) to
    load: it was unloaded while idle, or it may be and is loading now."""
    if deployment["idle_unloaded_at"] is not None:
        return True
    return deployment["idle_unload_seconds"] is not None and deployment["state"] in (
        State.PENDING,
        State.LOADING,
    )


def _wait_for_load(
    caller: Caller, name: str, deployments, rows: list[dict[str, Any]]
) -> tuple[list[dict[str, Any]], float]:
    """Load the deployment if it is unloaded (one request of many starts it), then wait
    for a ready replica on a live worker, up to its load timeout. Returns the routing
    rows (``deployments``' values) once one is ready, and how long that took (ms)."""
    started = time.monotonic()
    deadline = started + rows[0]["load_timeout_seconds"]

    def failed(message: str, code: str) -> LoadFailed:
        waited = (time.monotonic() - started) * 1000
        return LoadFailed(message, code=code, route=_unrouted(rows[0], name, load_ms=waited))

    while True:
        deployment = rows[0]
        if not deployment["running"]:
            raise failed(f"The model '{name}' was stopped while it loaded.", "model_unavailable")
        if deployment["idle_unloaded_at"] is not None:
            try:
                deployment_load_on_demand(
                    deployment_id=deployment["id"], requested_by=caller.user.username
                )
            except PlacementError as exc:
                raise failed(
                    f"The model '{name}' was unloaded while idle and cannot be loaded now: "
                    f"{exc.message} Retry later.",
                    "model_load_failed",
                ) from exc
        replicas = _served_replicas(rows)
        if any(r.state == State.READY for r in replicas):
            try:
                if deployment_selectors.replicas_serving(replicas):
                    return rows, (time.monotonic() - started) * 1000
            except RedisError as exc:
                raise broker_unavailable() from exc
        elif deployment["state"] == State.FAILED:
            reason = deployment["state_reason"] or "its replicas failed to load"
            raise failed(f"The model '{name}' failed to load: {reason}", "model_load_failed")
        if time.monotonic() >= deadline:
            reason = deployment["state_reason"]
            raise failed(
                f"The model '{name}' was not ready within its load timeout "
                f"({deployment['load_timeout_seconds']} s)"
                + (f": {reason}" if reason else "; it goes on loading.")
                + " Retry in a few seconds.",
                "model_load_timeout",
            )
        time.sleep(LOAD_POLL_SECONDS)
        rows = list(deployments.values(*_ROUTE_FIELDS))


def _unrouted(deployment: dict[str, Any], name: str, *, load_ms: float | None) -> Route:
    """The deployment's part of a route, without a replica: all a usage record needs of a
    request that waited for a load that did not come."""
    return Route(
        deployment_id=deployment["id"],
        deployment_name=name,
        logging_level=deployment["logging_level"],
        queue_timeout=float(deployment["queue_timeout_seconds"]),
        admission_limit=0,
        sampling={},
        replica_id=0,
        generation=0,
        worker="",
        sha256=deployment["model_version__artifact"],
        embeddings=deployment["embeddings"],
        context_length=deployment["context_length"],
        adapter_sha256=deployment["adapter__artifact"] or "",
        revision=deployment["revision__number"] or 0,
        load_ms=load_ms,
    )


def route(caller: Caller, name: str) -> Route:
    """Resolve the deployment and pick a live replica (sync: runs the ORM).

    A deployment that loads on demand and has no ready replica is loaded (if it was
    unloaded while idle) and waited for: this thread polls the database up to the
    deployment's load timeout, then raises LoadFailed.
    """
    check_inference_access(caller)
    deployments = Deployment.objects.visible_to(caller.user).filter(name=name).order_by()
    rows = list(deployments.values(*_ROUTE_FIELDS))
    if not rows or not may_use(caller, name):
        raise not_found(name)
    deployment = rows[0]
    if not deployment["running"]:
        raise unavailable(f"The model '{name}' is stopped.")
    replicas = _served_replicas(rows)
    load_ms = None
    if not any(r.state == State.READY for r in replicas) and _loads_on_demand(deployment):
        rows, load_ms = _wait_for_load(caller, name, deployments, rows)
        deployment = rows[0]
        replicas = _served_replicas(rows)
    if not any(r.state == State.READY for r in replicas):
        reason = deployment["state_reason"]
        detail = f" ({reason})" if reason else ""
        raise unavailable(
            f"The model '{name}' is {State(deployment['state']).label.lower()}{detail}."
        )
    try:
        serving = deployment_selectors.replicas_serving(replicas)  # workers' heartbeats
    except RedisError as exc:
        raise broker_unavailable() from exc
    live = [
        (
            next((r["queue_depth"] for r in w.replicas if r["replica_id"] == replica.pk), 0),
            replica.index,
            replica,
        )
        for replica, w in serving
    ]
    if not live:
        raise unavailable(
            f"The model '{name}' is unavailable: the worker holding it is offline or restarting."
        )
    candidates = tuple((r.pk, r.generation, r.worker) for _, _, r in sorted(live))
    replica_id, generation, worker = candidates[0]
    return dataclasses.replace(
        _unrouted(deployment, name, load_ms=load_ms),
        admission_limit=(deployment["queue_size"] + deployment["parallel_slots"]) * len(live),
        sampling=dict(PRESET_SAMPLING[deployment["preset"]]),
        replica_id=replica_id,
        generation=generation,
        worker=worker,
        candidates=candidates,
    )


@dataclass
class Call:
    """One request in flight, from admission to its last event."""

    route: Route
    kind: str
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    started: float = field(default_factory=time.perf_counter)
    admitted: bool = False
    finished: bool = False

    def __post_init__(self) -> None:
        # A request that waited for its deployment to load has waited since before the
        # call: its latency and time to first token count from when it asked.
        if self.route.load_ms:
            self.started -= self.route.load_ms / 1000

    def admit(self) -> None:
        """Take a place in the deployment's bound and go to the candidate replica with
        the fewest requests in flight (sync: dispatched with the routing)."""
        now = time.time()
        expires = now + self.route.queue_timeout + ADMISSION_GRACE_SECONDS
        candidates = self.route.candidates or (
            (self.route.replica_id, self.route.generation, self.route.worker),
        )
        chosen = sync_client().eval(
            _ADMIT,
            2 + len(candidates),
            redis_keys.admission_key(self.route.deployment_id),
            # The deployment's idle timer (lifecycle.deployments_idle_unload) reads this.
            redis_keys.last_request_key(self.route.deployment_id),
            *(redis_keys.replica_requests_key(replica_id) for replica_id, _, _ in candidates),
            now,
            self.route.admission_limit,
            self.request_id,
            expires,
        )
        if not chosen:
            raise ApiError(
                429,
                f"The model '{self.route.deployment_name}' is busy: its queue is full. "
                "Retry after a short wait.",
                type="rate_limit_error",
                code="queue_full",
                headers={"Retry-After": "2"},
            )
        replica_id, generation, worker = candidates[chosen - 1]
        self.route = dataclasses.replace(
            self.route, replica_id=replica_id, generation=generation, worker=worker
        )
        self.admitted = True

    def spec(self, **fields: Any) -> protocol.RequestSpec:
        now = time.time()
        return protocol.RequestSpec(
            request_id=self.request_id,
            replica_id=self.route.replica_id,
            generation=self.route.generation,
            kind=self.kind,
            deadline=now + self.route.queue_timeout,
            sent_at=now,
            **fields,
        )

    async def events(self) -> AsyncIterator[dict[str, Any]]:
        """The worker's events for this request, until "end" or "error"."""
        client = async_client()
        key = redis_keys.events_key(self.request_id)
        last_id = "0-0"
        seen_start = False
        start_deadline = time.monotonic() + self.route.queue_timeout + START_GRACE_SECONDS
        while True:
            try:
                reply = await client.xread({key: last_id}, block=int(LIVENESS_CHECK_SECONDS * 1000))
                if not reply:
                    await self._check_alive(seen_start, start_deadline)
                    continue
            except RedisError as exc:
                raise broker_unavailable() from exc
            for entry_id, fields in reply[0][1]:
                last_id = entry_id
                event = json.loads(fields[b"e"])
                seen_start = seen_start or event["type"] == protocol.START
                yield event
                if event["type"] in (protocol.END, protocol.ERROR):
                    self.finished = True
                    return

    async def _check_alive(self, seen_start: bool, start_deadline: float) -> None:
        if not seen_start and time.monotonic() > start_deadline:
            raise ApiError(
                504,
                f"The request waited more than {self.route.queue_timeout:.0f} s for "
                f"'{self.route.deployment_name}' and was dropped.",
                type="server_error",
                code="queue_timeout",
            )
        raw = await async_client().get(redis_keys.heartbeat_key(self.route.worker))
        worker = deployment_selectors.parse_heartbeat(raw)
        if worker is None or not worker.online:
            raise unavailable(
                f"The worker serving '{self.route.deployment_name}' stopped responding; "
                "the request was abandoned."
            )

    async def close(self) -> None:
        """Release the admission slot; tell the worker to stop if we leave early.

        With Redis gone neither can be done, and neither needs to be: the slot expires by
        its score, and the worker's events go nowhere. The request is still recorded."""
        client = async_client()
        pipe = client.pipeline(transaction=False)
        if self.admitted:
            pipe.zrem(redis_keys.admission_key(self.route.deployment_id), self.request_id)
            pipe.zrem(redis_keys.replica_requests_key(self.route.replica_id), self.request_id)
        if not self.finished:
            pipe.set(
                redis_keys.cancel_key(self.request_id), 1, ex=protocol.EVENT_STREAM_TTL_SECONDS
            )
        try:
            await pipe.execute()
        except RedisError:
            logger.warning("Redis unreachable: request %s closed without it", self.request_id)
