"""Deployments: create, start, stop, restart, scale, switch and roll back.

Admins change deployments; every change is one transaction with one audit event.
Where replicas go and what workers are told is ``placement``; what workers report, and
unloading when idle, is ``lifecycle``.

Over 400 lines on purpose: every command an admin gives a deployment, switches
included, is here, because they lock the same rows in the same order and share the
revision bookkeeping (a stop abandons a pending switch, a scale waits for one).
"""

from __future__ import annotations

from typing import Any

from django.core.exceptions import ValidationError
from django.db import models, transaction
from django.utils import timezone

from apps.accounts.models import User
from apps.accounts.services import require_role, system_user
from apps.audit.models import Outcome
from apps.audit.services import audit_record
from apps.deployments.checks import deployable_check, deployment_settings_check
from apps.deployments.models import (
    MANAGER_ROLES,
    RUNTIME_FIELDS,
    Deployment,
    Revision,
    RevisionState,
    State,
)
from apps.deployments.placement import (
    MIB,
    NoWorkerOnline,
    PlacementError,
    deployment_state_refresh,
    estimate_for,
    labels_wanted,
    replica_unload_send,
    replicas_place,
    replicas_retire,
    replicas_stop,
    revised,
)
from apps.registry.models import ModelVersion

# What a revision changes: the setup the deployment runs (with the adapter). Where and
# how many replicas run, logging and queueing are the deployment's own, whatever
# revision it runs.
REVISION_FIELDS = RUNTIME_FIELDS
# Load on demand: when a deployment unloads for want of requests, and how long a request
# waits for it to load again.
LOAD_ON_DEMAND_FIELDS = ("idle_unload_seconds", "load_timeout_seconds")
SETTINGS_FIELDS = (
    "adapter",
    *REVISION_FIELDS,
    "replicas",
    "placement_worker",
    "placement_gpu",
    "placement_labels",
    "exclude_labels",
    "logging_level",
    "queue_size",
    "queue_timeout_seconds",
    *LOAD_ON_DEMAND_FIELDS,
)
# Loading reads the file at about this rate on a small box (bench/setups.py's trials):
# the interruption a stop-then-start switch announces.
LOAD_BYTES_PER_SECOND = 400 * MIB


def deployment_create(
    *, actor: User, name: str, model_version: ModelVersion, **values: Any
) -> Deployment:
    """Create a deployment and place its replicas on workers.

    With no worker online it waits (pending) and is placed when one starts; when
    workers are online but none has the memory, the deployment is refused.
    """
    require_role(actor, MANAGER_ROLES, "create deployments")
    unknown = set(values) - set(SETTINGS_FIELDS)
    if unknown:
        raise ValidationError(f"Unknown deployment setting(s): {', '.join(sorted(unknown))}.")
    deployment_settings_check(version=model_version, values=values)
    if Deployment.objects.filter(name=name).exists():
        raise ValidationError(f"A deployment named '{name}' already exists.")
    with transaction.atomic():
        deployment = Deployment(name=name, model_version=model_version, created_by=actor, **values)
        deployment.full_clean()
        deployment.save()
        deployment.revision = Revision.objects.create(
            deployment=deployment,
            number=1,
            model_version=model_version,
            adapter=deployment.adapter,
            values=_revision_values(deployment),
            label="created",
            state=RevisionState.ACTIVE,
            created_by=actor,
            activated_at=timezone.now(),
        )
        deployment.save(update_fields=["revision"])
        estimate = estimate_for(deployment)
        _place_or_wait(deployment)
        audit_record(
            actor=actor,
            action="deployment.create",
            target=deployment,
            details={
                "model_version": model_version.pk,
                "sha256": model_version.sha256,
                "settings": {
                    f: deployment.adapter_id if f == "adapter" else getattr(deployment, f)
                    for f in SETTINGS_FIELDS
                },
                "adapter_sha256": deployment.adapter.sha256 if deployment.adapter else None,
                "memory_estimate": estimate.as_dict(),
                "placed_on": [r.worker for r in deployment.replica_set.all()],
            },
        )
    return deployment


def _revision_values(deployment: Deployment) -> dict[str, Any]:
    return {field: getattr(deployment, field) for field in REVISION_FIELDS}


def _place_or_wait(deployment: Deployment) -> None:
    if deployment.idle_unloaded_at is not None:  # an admin's start or restart loads it now
        deployment.idle_unloaded_at = None
        deployment.save(update_fields=["idle_unloaded_at"])
    try:
        replicas_place(deployment)
    except NoWorkerOnline as exc:
        deployment.state_reason = (
            exc.message if labels_wanted(deployment) else "Waiting for a worker to come online."
        )
    deployment_state_refresh(deployment)


def deployment_start(*, actor: User, deployment: Deployment) -> Deployment:
    """Serve a stopped (or failed) deployment again."""
    require_role(actor, MANAGER_ROLES, "start deployments")
    deployment_settings_check(
        version=deployment.model_version, values={"adapter": deployment.adapter}
    )
    with transaction.atomic():
        deployment = Deployment.objects.select_for_update().get(pk=deployment.pk)
        deployment.running = True
        deployment.save(update_fields=["running"])
        _place_or_wait(deployment)
        audit_record(actor=actor, action="deployment.start", target=deployment)
    return deployment


def deployment_stop(*, actor: User, deployment: Deployment, reason: str = "") -> Deployment:
    """Stop serving: queued and running requests get a clean error; memory is freed."""
    require_role(actor, MANAGER_ROLES, "stop deployments")
    with transaction.atomic():
        deployment = Deployment.objects.select_for_update().get(pk=deployment.pk)
        deployment.running = False
        deployment.idle_unloaded_at = None
        deployment.save(update_fields=["running", "idle_unloaded_at"])
        _abandon_pending(deployment, "The deployment was stopped during the switch.")
        replicas_stop(deployment, deployment.replica_set.select_for_update())
        deployment_state_refresh(deployment)
        audit_record(
            actor=actor, action="deployment.stop", target=deployment, details={"reason": reason}
        )
    return deployment


def deployment_restart(*, actor: User, deployment: Deployment) -> Deployment:
    """Reload every replica (a new generation), picking up changed settings."""
    require_role(actor, MANAGER_ROLES, "restart deployments")
    deployable_check(deployment.model_version)
    with transaction.atomic():
        deployment = Deployment.objects.select_for_update().get(pk=deployment.pk)
        deployment.running = True
        deployment.save(update_fields=["running"])
        # Unload the current generation wherever it is: placement may pick another
        # worker for the new one, and the old copy must not stay resident there.
        _abandon_pending(deployment, "The deployment was restarted during the switch.")
        replicas_stop(deployment, deployment.replica_set.select_for_update())
        deployment.replica_set.update(state=State.STOPPED)
        _place_or_wait(deployment)
        audit_record(actor=actor, action="deployment.restart", target=deployment)
    return deployment


def deployment_scale(*, actor: User, deployment: Deployment, replicas: int) -> Deployment:
    """Change the number of replicas; new ones are placed, extra ones unloaded."""
    require_role(actor, MANAGER_ROLES, "scale deployments")
    if not 1 <= replicas <= 16:
        raise ValidationError("A deployment has between 1 and 16 replicas.")
    with transaction.atomic():
        deployment = Deployment.objects.select_for_update().get(pk=deployment.pk)
        _refuse_during_switch(deployment, "scaled")
        before = deployment.replicas
        deployment.replicas = replicas
        deployment.save(update_fields=["replicas"])
        extra = deployment.revision.replicas.select_for_update().filter(index__gte=replicas)
        replicas_stop(deployment, extra)
        extra.delete()
        if deployment.running and deployment.idle_unloaded_at is None:
            _place_or_wait(deployment)
        else:
            deployment_state_refresh(deployment)
        audit_record(
            actor=actor,
            action="deployment.scale",
            target=deployment,
            details={"from": before, "to": replicas},
        )
    return deployment


# -- revisions: switching a running deployment to another setup ------------------------


class SwitchNeedsRoom(ValidationError):
    """The new setup cannot load beside the serving one; a stop-then-start switch can."""

    def __init__(self, message: str, interruption_seconds: int) -> None:
        super().__init__(message)
        self.interruption_seconds = interruption_seconds


def revision_pending(deployment: Deployment) -> Revision | None:
    return deployment.revisions.filter(state=RevisionState.PENDING).first()


def _refuse_during_switch(deployment: Deployment, doing: str) -> None:
    pending = revision_pending(deployment)
    if pending is not None:
        raise ValidationError(
            f"Revision {pending.number} of {deployment.name} is still loading; it cannot be "
            f"{doing} until the switch is over."
        )


def _abandon_pending(deployment: Deployment, reason: str) -> None:
    for revision in deployment.revisions.select_for_update().filter(state=RevisionState.PENDING):
        revision_fail(revision, reason, unload=False)


def _changes(deployment: Deployment, revision: Revision) -> dict[str, list[Any]]:
    """What the revision changes against what is served now: {field: [from, to]}."""
    changes: dict[str, list[Any]] = {}
    if deployment.model_version_id != revision.model_version_id:
        changes["model_version"] = [str(deployment.model_version), str(revision.model_version)]
    if deployment.adapter_id != revision.adapter_id:
        changes["adapter"] = [str(deployment.adapter or ""), str(revision.adapter or "")]
    for field, value in revision.values.items():
        if getattr(deployment, field) != value:
            changes[field] = [getattr(deployment, field), value]
    return changes


def _interruption_seconds(version: ModelVersion) -> int:
    return max(2, round(2 + version.size / LOAD_BYTES_PER_SECOND))


def deployment_switch(
    *,
    actor: User,
    deployment: Deployment,
    model_version: ModelVersion,
    label: str = "",
    stop_then_start: bool = False,
    **values: Any,
) -> Revision:
    """Change what a deployment runs, under the same name: a new revision.

    Its replicas load beside the serving ones; once every one is ready, traffic moves to
    them and the old ones finish what they are serving, then unload (no request fails).
    If the new one fails to load, the old one keeps serving and the revision is marked
    failed with the reason. When no worker has room for both, SwitchNeedsRoom says how
    long a ``stop_then_start`` switch would interrupt serving.
    """
    require_role(actor, MANAGER_ROLES, "switch deployments")
    unknown = set(values) - {"adapter", *REVISION_FIELDS}
    if unknown:
        raise ValidationError(f"Not a setup setting: {', '.join(sorted(unknown))}.")
    merged = {**_revision_values(deployment), "adapter": deployment.adapter, **values}
    # Where it runs stays the deployment's: a setup that splits over a worker's GPUs
    # does not suit a deployment pinned to one.
    pinned = {"placement_gpu": deployment.placement_gpu}
    deployment_settings_check(version=model_version, values={**merged, **pinned})
    adapter = merged.pop("adapter")
    with transaction.atomic():
        deployment = Deployment.objects.select_for_update().get(pk=deployment.pk)
        _refuse_during_switch(deployment, "switched again")
        number = (deployment.revisions.aggregate(n=models.Max("number"))["n"] or 0) + 1
        revision = Revision(
            deployment=deployment,
            number=number,
            model_version=model_version,
            adapter=adapter,
            values=merged,
            label=label[:200],
            created_by=actor,
        )
        changes = _changes(deployment, revision)
        if not changes:
            raise ValidationError(f"{deployment.name} already runs exactly this setup.")
        # Each field validated as the deployment would (ranges, choices).
        revised(deployment, revision).full_clean(exclude=["revision"])
        revision.save()
        details = {
            "revision": number,
            "from": deployment.revision.number,
            "label": label,
            "changes": changes,
            "stop_then_start": stop_then_start,
        }
        if not deployment.running or deployment.idle_unloaded_at is not None:
            # Nothing is loaded: the new settings simply apply to the next start (or, for
            # a deployment unloaded while idle, to the load its next request starts).
            _activate(deployment, revision)
        elif stop_then_start:
            old = deployment.revision
            _activate(deployment, revision)
            replicas_retire(old, drain=False)
            _place_or_wait(deployment)
        else:
            try:
                replicas_place(deployment, revision)
            except NoWorkerOnline:
                _activate(deployment, revision)  # nothing serves now: it waits like a start
                _place_or_wait(deployment)
            except PlacementError as exc:
                seconds = _interruption_seconds(model_version)
                raise SwitchNeedsRoom(
                    f"{exc.message} The new setup cannot load beside the serving one. "
                    f"Switch with a stop-then-start instead: {deployment.name} stops "
                    f"answering for about {seconds} s while the new setup loads.",
                    seconds,
                ) from exc
        audit_record(actor=actor, action="deployment.switch", target=deployment, details=details)
    return revision


def deployment_rollback(*, actor: User, deployment: Deployment, number: int) -> Revision:
    """Switch back to what an earlier revision ran (as a new revision, like any switch)."""
    earlier = deployment.revisions.filter(number=number).first()
    if earlier is None:
        raise ValidationError({"revision": f"{deployment.name} has no revision {number}."})
    return deployment_switch(
        actor=actor,
        deployment=deployment,
        model_version=earlier.model_version,
        label=f"rollback to revision {number}",
        adapter=earlier.adapter,
        **earlier.values,
    )


def _activate(deployment: Deployment, revision: Revision) -> Revision | None:
    """Make ``revision`` the one served: the deployment takes its settings, and routing
    its replicas, in this transaction. Returns the revision it replaced."""
    old = deployment.revision
    deployment.model_version = revision.model_version
    deployment.adapter = revision.adapter
    for field, value in revision.values.items():
        setattr(deployment, field, value)
    deployment.revision = revision
    deployment.updated_at = timezone.now()
    deployment.save()
    revision.state = RevisionState.ACTIVE
    revision.activated_at = timezone.now()
    revision.save(update_fields=["state", "activated_at"])
    if old is not None and old.pk != revision.pk:
        Revision.objects.filter(pk=old.pk).update(state=RevisionState.RETIRED)
    return old


def revision_promote(revision: Revision) -> None:
    """Every replica of a pending revision is ready: it takes the traffic."""
    deployment = Deployment.objects.select_for_update().get(pk=revision.deployment_id)
    changes = _changes(deployment, revision)
    old = _activate(deployment, revision)
    replicas_retire(old, drain=True)
    deployment_state_refresh(deployment)
    audit_record(
        actor=system_user(),
        action="deployment.revision_active",
        target=deployment,
        details={
            "revision": revision.number,
            "replaced": old.number if old else None,
            "sha256": revision.model_version.sha256,
            "changes": changes,
        },
    )


def revision_fail(revision: Revision, reason: str, *, unload: bool = True) -> None:
    """A pending revision did not load: the serving one stays; its replicas go."""
    Revision.objects.filter(pk=revision.pk).update(state=RevisionState.FAILED, reason=reason)
    for replica in revision.replicas.select_for_update():
        if unload and replica.state in (State.PENDING, State.LOADING, State.READY):
            replica_unload_send(replica, "The switch failed.")
        replica.delete()
    audit_record(
        actor=system_user(),
        action="deployment.switch_failed",
        target=revision.deployment,
        outcome=Outcome.FAILURE,
        details={"revision": revision.number, "reason": reason},
    )


# -- load on demand: unloaded when idle, loaded again by the next request ---------------


def deployment_load_on_demand_set(
    *,
    actor: User,
    deployment: Deployment,
    idle_unload_seconds: int | None,
    load_timeout_seconds: int,
) -> Deployment:
    """Set how long a deployment may go without requests before it unloads (None: it
    stays loaded) and how long a request waits for it to load again.

    Turning idle unloading off on a deployment that is unloaded loads it now.
    """
    require_role(actor, MANAGER_ROLES, "change deployments")
    with transaction.atomic():
        deployment = Deployment.objects.select_for_update().get(pk=deployment.pk)
        before = {f: getattr(deployment, f) for f in LOAD_ON_DEMAND_FIELDS}
        deployment.idle_unload_seconds = idle_unload_seconds
        deployment.load_timeout_seconds = load_timeout_seconds
        others = [
            f.name for f in Deployment._meta.concrete_fields if f.name not in LOAD_ON_DEMAND_FIELDS
        ]
        deployment.clean_fields(exclude=others)
        deployment.updated_at = timezone.now()
        deployment.save(update_fields=[*LOAD_ON_DEMAND_FIELDS, "updated_at"])
        if deployment.idle_unloaded_at is not None:
            if idle_unload_seconds is None and deployment.running:
                _place_or_wait(deployment)
            else:
                deployment_state_refresh(deployment)  # its reason names the timings
        audit_record(
            actor=actor,
            action="deployment.load_on_demand_set",
            target=deployment,
            details={"from": before, "to": {f: getattr(deployment, f) for f in before}},
        )
    return deployment
