"""What happens to deployments between admins' commands: replica states that workers
report, workers coming online, replicas moved off workers that went offline, unloading
deployments left idle and loading them again for the next request.
"""

from __future__ import annotations

import time

from django.db import models, transaction
from django.utils import timezone

from apps.accounts.services import system_user
from apps.audit.models import Outcome
from apps.audit.services import audit_record
from apps.deployments import selectors
from apps.deployments.models import Deployment, Replica, Revision, RevisionState, State
from apps.deployments.placement import (
    PlacementError,
    deployment_state_refresh,
    replica_place_again,
    replica_reload,
    replicas_place,
    replicas_retire,
    worker_task_send,
)
from apps.deployments.services import revision_fail, revision_pending, revision_promote
from workers.inference import protocol

# Later states win; a report that would move a replica backwards is stale.
_ORDER = {
    State.PENDING: 0,
    State.LOADING: 1,
    State.READY: 2,
    State.FAILED: 2,
    State.STOPPING: 3,
    State.STOPPED: 4,
}


def replica_state_apply(
    *, replica_id: int, generation: int, state: str, reason: str = "", details: dict | None = None
) -> bool:
    """Persist a state a worker reported; True if it changed anything.

    Reports arrive at least once and possibly out of order: a report for an older
    generation, or one that would move the replica backwards, is ignored.
    """
    details = details or {}
    with transaction.atomic():
        replica = (
            Replica.objects.select_for_update()
            .select_related("deployment__model_version")
            .filter(pk=replica_id)
            .first()
        )
        if replica is None or replica.generation != generation:
            return False
        if _ORDER[State(state)] <= _ORDER[State(replica.state)]:
            return False
        replica.state = state
        replica.state_reason = reason
        replica.updated_at = timezone.now()
        replica.save(update_fields=["state", "state_reason", "updated_at"])
        deployment = replica.deployment
        revision = replica.revision
        if revision is not None and revision.pk != deployment.revision_id:
            _revision_report(revision, replica, state, reason)
            deployment.refresh_from_db()  # a promotion changed what it serves
        deployment_state_refresh(deployment)
        actor = system_user()
        if details.get("integrity_failure"):
            audit_record(
                actor=actor,
                action="artifact.integrity_failure",
                target=deployment.model_version,
                outcome=Outcome.FAILURE,
                details={"sha256": deployment.model_version.sha256, "reason": reason},
            )
        if state in (State.READY, State.FAILED, State.STOPPED):
            audit_record(
                actor=actor,
                action=f"replica.{state}",
                target=deployment,
                outcome=Outcome.FAILURE if state == State.FAILED else Outcome.SUCCESS,
                details={
                    "replica": replica.index,
                    "worker": replica.worker,
                    "generation": generation,
                    "sha256": deployment.model_version.sha256,
                    "reason": reason,
                    **{k: v for k, v in details.items() if k != "integrity_failure"},
                },
            )
    return True


def _revision_report(revision: Revision, replica: Replica, state: str, reason: str) -> None:
    """A replica of a revision that is not the served one changed state."""
    revision = Revision.objects.select_for_update().get(pk=revision.pk)
    if revision.state == RevisionState.PENDING:
        if state == State.FAILED:
            revision_fail(revision, reason or "A replica failed to load.")
        elif state == State.READY:
            states = list(revision.replicas.values_list("state", flat=True))
            if len(states) >= revision.deployment.replicas and all(
                s == State.READY for s in states
            ):
                revision_promote(revision)
    elif state in (State.STOPPED, State.FAILED):
        replica.delete()  # a replaced revision's replica has unloaded


def worker_online(*, hostname: str) -> int:
    """A worker (re)started: reload what it should hold, place deployments that wait.

    Returns how many replicas were sent to load.
    """
    sent = 0
    with transaction.atomic():
        replicas = (
            Replica.objects.select_for_update()
            .select_related("deployment__model_version")
            .filter(worker=hostname, deployment__running=True)
            .filter(deployment__idle_unloaded_at__isnull=True)
            .exclude(state=State.STOPPED)
        )
        for replica in replicas:
            replica_reload(replica)
            deployment_state_refresh(replica.deployment)
            sent += 1
        waiting = Deployment.objects.select_for_update().filter(running=True, state=State.PENDING)
        for deployment in waiting:
            try:
                sent += len(replicas_place(deployment))
            except PlacementError as exc:
                deployment.state_reason = exc.message
            deployment_state_refresh(deployment)
    return sent


# -- workers that go away: their replicas are placed on others ------------------------

MOVED = "Its worker went offline; the replica was placed on another."
# States in which a replica holds (or is about to hold) a worker's memory.
HELD = (State.PENDING, State.LOADING, State.READY)


def replicas_rehome() -> list[str]:
    """Place elsewhere the replicas of running deployments whose worker went offline
    (Celery beat, every 15 s); returns a line per move ("name#index: from -> to").

    A worker is offline once its heartbeat is older than ``WORKER_OFFLINE_AFTER``. Only
    the replicas of the revision a deployment serves move, each to the online worker
    with the most room, as placement chooses; each move is audited as ``replica.moved``.
    A switch that was loading a replica on that worker fails (the served revision goes
    on serving), as if the load had failed. A
    replica that no online worker can hold, or whose deployment is pinned to the worker
    that went away, stays and says why; a later run tries again. A worker that comes
    back still holding a moved replica (cut off rather than stopped) is told to unload
    its copy (``_stale_copies_unload``).
    """
    workers = selectors.worker_list()
    online = {w.hostname for w in workers if w.online}
    _stale_copies_unload(workers)
    _switches_fail(online)
    stranded = (
        Replica.objects.filter(
            state__in=HELD,
            deployment__running=True,
            deployment__idle_unloaded_at__isnull=True,
            revision_id=models.F("deployment__revision_id"),
        )
        .exclude(worker__in=online)
        .values_list("deployment_id", flat=True)
        .distinct()
    )
    moves: list[str] = []
    for deployment_id in list(stranded):
        moves += _rehome(deployment_id, online)
    return moves


def _rehome(deployment_id: int, online: set[str]) -> list[str]:
    moves = []
    with transaction.atomic():
        deployment = (
            Deployment.objects.select_for_update(of=("self",))
            .select_related("revision", "model_version", "adapter")
            .get(pk=deployment_id)
        )
        replicas = (
            deployment.revision.replicas.select_for_update()
            .filter(state__in=HELD)
            .exclude(worker__in=online)
            .order_by("index")
        )
        for replica in replicas:
            gone, generation = replica.worker, replica.generation
            try:
                hostname, gpu_index = replica_place_again(replica)
            except PlacementError as exc:
                reason = f"Its worker {gone} is offline. {exc.message}"
                if replica.state_reason != reason:
                    replica.state_reason = reason
                    replica.save(update_fields=["state_reason"])
                continue
            moves.append(f"{deployment.name}#{replica.index}: {gone} -> {hostname}")
            audit_record(
                actor=system_user(),
                action="replica.moved",
                target=deployment,
                details={
                    "replica": replica.index,
                    "from": gone,
                    "to": hostname,
                    "gpu": gpu_index,
                    "generation": [generation, replica.generation],
                    "sha256": deployment.model_version.sha256,
                    "reason": MOVED,
                },
            )
        deployment_state_refresh(deployment)
    return moves


def _switches_fail(online: set[str]) -> None:
    pending = (
        Replica.objects.filter(state__in=HELD, revision__state=RevisionState.PENDING)
        .exclude(worker__in=online)
        .values_list("revision_id", flat=True)
        .distinct()
    )
    for revision_id in list(pending):
        with transaction.atomic():
            revision = Revision.objects.select_for_update().get(pk=revision_id)
            gone = revision.replicas.filter(state__in=HELD).exclude(worker__in=online)
            if revision.state == RevisionState.PENDING and gone.exists():
                worker = gone.first().worker
                revision_fail(revision, f"Its worker {worker} went offline while it loaded.")


def _stale_copies_unload(workers: list[selectors.WorkerStatus]) -> None:
    """Tell each online worker to unload the replicas it holds that are no longer its own:
    moved to another worker, or removed, while it could not be told."""
    held = [(w.hostname, r) for w in workers if w.online for r in w.replicas]
    if not held:
        return
    owners = dict(
        Replica.objects.filter(pk__in={r["replica_id"] for _, r in held}).values_list(
            "pk", "worker"
        )
    )
    for hostname, copy in held:
        if owners.get(copy["replica_id"]) == hostname:
            continue
        worker_task_send(
            protocol.REPLICA_UNLOAD,
            hostname,
            {"replica_id": copy["replica_id"], "generation": copy["generation"], "reason": MOVED},
        )


IDLE_UNLOADED = "The deployment was unloaded after a while without requests."


def deployments_idle_unload(*, now: float | None = None) -> list[str]:
    """Unload every running deployment that has gone its ``idle_unload_seconds`` without
    a request (Celery beat runs this every 30 s); returns their names.

    Idle means no request in flight, and neither the last request nor the replicas'
    loading more recent than that. Each replica finishes anything that still reaches it,
    then frees its memory; the deployment stays running, in the state "unloaded while
    idle", and its next request loads it. ``now`` (Unix time) lets a test skip the wait.
    """
    now = time.time() if now is None else now
    candidates = dict(
        Deployment.objects.filter(
            running=True,
            state=State.READY,
            idle_unload_seconds__isnull=False,
            idle_unloaded_at__isnull=True,
        ).values_list("pk", "idle_unload_seconds")
    )
    activity = selectors.deployment_activity(deployment_ids=candidates)
    unloaded = []
    for pk, seen in activity.items():
        # A cheap look first: a busy deployment is not locked every 30 s.
        if seen.in_flight or (seen.last_request or 0.0) > now - candidates[pk]:
            continue
        name = _idle_unload(pk, now)
        if name is not None:
            unloaded.append(name)
    return unloaded


def _idle_unload(deployment_id: int, now: float) -> str | None:
    with transaction.atomic():
        deployment = (
            Deployment.objects.select_for_update(of=("self",))
            .select_related("revision", "model_version")
            .filter(
                pk=deployment_id,
                running=True,
                idle_unload_seconds__isnull=False,
                idle_unloaded_at__isnull=True,
            )
            .first()
        )
        if deployment is None or deployment.revision is None or revision_pending(deployment):
            return None  # changed meanwhile, or a switch is loading beside it
        replicas = list(deployment.revision.replicas.select_for_update())
        if not replicas or any(r.state in (State.PENDING, State.LOADING) for r in replicas):
            return None
        seen = selectors.deployment_activity(deployment_ids=[deployment.pk])[deployment.pk]
        loaded_at = max(r.updated_at.timestamp() for r in replicas)
        idle_since = max(loaded_at, seen.last_request or 0.0)
        if seen.in_flight or now - idle_since < deployment.idle_unload_seconds:
            return None
        deployment.idle_unloaded_at = timezone.now()
        deployment.save(update_fields=["idle_unloaded_at"])
        held = [r.worker for r in replicas if r.state == State.READY]
        replicas_retire(deployment.revision, drain=True, reason=IDLE_UNLOADED)
        deployment_state_refresh(deployment)
        audit_record(
            actor=system_user(),
            action="deployment.idle_unload",
            target=deployment,
            details={
                "idle_seconds": round(now - idle_since),
                "idle_unload_seconds": deployment.idle_unload_seconds,
                "revision": deployment.revision.number,
                "sha256": deployment.model_version.sha256,
                "workers": held,
            },
        )
    return deployment.name


def deployment_load_on_demand(*, deployment_id: int, requested_by: str) -> bool:
    """Start loading a deployment that was unloaded while idle, for a request that wants
    it; the request then waits for a ready replica (``gateway.route``).

    Concurrent requests all call this: the one whose conditional UPDATE clears the idle
    mark places the replicas and gets True; the others get False and wait for the same
    load. Raises PlacementError (the mark kept, so a later request tries again) when no
    worker can hold it now.
    """
    with transaction.atomic():
        claimed = Deployment.objects.filter(
            pk=deployment_id, running=True, idle_unloaded_at__isnull=False
        ).update(idle_unloaded_at=None, updated_at=timezone.now())
        if not claimed:
            return False
        deployment = (
            Deployment.objects.select_for_update(of=("self",))
            .select_related("revision", "model_version", "adapter")
            .get(pk=deployment_id)
        )
        placed = replicas_place(deployment)
        deployment_state_refresh(deployment)
        audit_record(
            actor=system_user(),
            action="deployment.load_on_request",
            target=deployment,
            details={
                "requested_by": requested_by,
                "revision": deployment.revision.number,
                "sha256": deployment.model_version.sha256,
                "placed_on": [r.worker for r in placed],
            },
        )
    return True
