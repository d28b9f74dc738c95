"""What happens to deployments between admins' commands: replica states that workers
report, workers coming online, unloading deployments left idle and loading them again
for the next request.
"""

from __future__ import annotations

import time

from django.db import transaction
from django.utils import timezone

from apps.accounts.services import system_user
from apps.audit.models import Outcome
from apps.audit.services import audit_record
from apps.deployments import selectors
from apps.deployments.models import Deployment, Replica, Revision, RevisionState, State
from apps.deployments.placement import (
    PlacementError,
    deployment_state_refresh,
    replica_load_send,
    replicas_place,
    replicas_retire,
)
from apps.deployments.services import revision_fail, revision_pending, revision_promote

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
            replica.generation += 1
            replica.state = State.PENDING
            replica.state_reason = ""
            replica.updated_at = timezone.now()
            replica.save()
            replica_load_send(replica)
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
