"""Deployments: create, place, start, stop, restart, scale; apply what workers report.

Admins change deployments; every change is one transaction with one audit event.
Workers report replica states through Redis (a Celery task on the control queue) and
``replica_state_apply`` persists them idempotently.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass
from typing import Any

from django.core.exceptions import ValidationError
from django.db import models, transaction
from django.utils import timezone

from apps.accounts.models import User
from apps.accounts.services import require_role, system_user
from apps.audit.models import Outcome
from apps.audit.services import audit_record
from apps.deployments import selectors
from apps.deployments.models import (
    KV_CACHE_BYTES,
    MANAGER_ROLES,
    RUNTIME_FIELDS,
    Deployment,
    KvCacheType,
    Replica,
    Revision,
    RevisionState,
    State,
)
from apps.registry.artifacts import artifact_store
from apps.registry.models import Format, ModelVersion
from apps.registry.models import State as VersionState
from apps.registry.services import model_version_deploy_check
from workers.inference.protocol import ReplicaSpec

MIB = 1024 * 1024
# llama.cpp's scratch buffers and runtime overhead beyond weights and KV cache.
COMPUTE_OVERHEAD_BYTES = 48 * MIB
# Keep this much of a worker's memory free for the OS and the worker itself.
HEADROOM_BYTES = 256 * MIB

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
    "logging_level",
    "queue_size",
    "queue_timeout_seconds",
    *LOAD_ON_DEMAND_FIELDS,
)
# Loading reads the file at about this rate on a small box (bench/setups.py's trials):
# the interruption a stop-then-start switch announces.
LOAD_BYTES_PER_SECOND = 400 * MIB


class PlacementError(ValidationError):
    """No online worker can hold the deployment; the message says why."""


class NoWorkerOnline(PlacementError):
    """No worker is online at all: a deployment can wait for one rather than fail."""


@dataclass(frozen=True)
class MemoryEstimate:
    weights: int
    kv_cache: int
    compute: int

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.compute

    def as_dict(self) -> dict[str, int]:
        return {
            "weights": self.weights,
            "kv_cache": self.kv_cache,
            "compute": self.compute,
            "total": self.total,
        }


def memory_estimate(
    *,
    version: ModelVersion,
    context_length: int,
    parallel_slots: int,
    batch_size: int,
    kv_cache_type: str = KvCacheType.F16,
) -> MemoryEstimate:
    """Weights, plus a KV cache for every slot's full context, plus scratch buffers.

    The KV cache is sized from the GGUF attention shape (grouped-query heads make it
    smaller); a file that does not state it is sized as if every head had its own KV.
    """
    meta = version.metadata or {}
    layers = version.layers or meta.get("layers") or 0
    embedding = version.embedding_size or meta.get("embedding_size") or 0
    heads = meta.get("attention_heads") or 0
    kv_heads = meta.get("attention_heads_kv") or heads
    head_dim = embedding // heads if heads else 0
    key_len = meta.get("key_length") or head_dim
    value_len = meta.get("value_length") or head_dim
    elements = layers * kv_heads * (key_len + value_len) if kv_heads else layers * embedding * 2
    per_token = elements * KV_CACHE_BYTES[kv_cache_type]
    kv_cache = int(per_token * context_length * parallel_slots)
    vocab = version.vocab_size or meta.get("vocab_size") or 0
    compute = COMPUTE_OVERHEAD_BYTES + batch_size * (vocab + 4 * embedding) * 4
    return MemoryEstimate(weights=version.size, kv_cache=kv_cache, compute=compute)


def _mib(n: int) -> str:
    return f"{n / MIB:,.0f} MiB"


def _estimate_for(deployment: Deployment) -> MemoryEstimate:
    estimate = memory_estimate(
        version=deployment.model_version,
        context_length=deployment.context_length,
        parallel_slots=deployment.parallel_slots,
        batch_size=deployment.batch_size,
        kv_cache_type=deployment.kv_cache_type,
    )
    if deployment.adapter is not None:  # loaded whole, next to the model
        estimate = dataclasses.replace(estimate, weights=estimate.weights + deployment.adapter.size)
    return estimate


def _uses_gpu(deployment: Deployment, worker: selectors.WorkerStatus) -> bool:
    return bool(worker.gpus) and deployment.gpu_layers != 0


def _choose_worker(
    deployment: Deployment, needed: int, reserved: dict[tuple[str, int | None], int]
) -> tuple[str, int | None]:
    """The online worker (and GPU) with the most free memory that fits ``needed`` bytes.

    ``reserved`` holds memory promised to replicas not yet loaded (the heartbeat does
    not show them yet), keyed by (worker, GPU index or None for RAM).
    """
    workers = [w for w in selectors.worker_list() if w.serving]
    if deployment.placement_worker:
        workers = [w for w in workers if w.hostname == deployment.placement_worker]
        if not workers:
            raise PlacementError(
                f"The worker '{deployment.placement_worker}' is not online and serving."
            )
    if not workers:
        raise NoWorkerOnline("No worker is online to serve models.")
    options: list[tuple[int, str, int | None]] = []
    for worker in workers:
        if _uses_gpu(deployment, worker):
            for gpu in worker.gpus:
                if (
                    deployment.placement_gpu is not None
                    and gpu["index"] != deployment.placement_gpu
                ):
                    continue
                free = gpu["memory_free_mib"] * MIB - reserved.get(
                    (worker.hostname, gpu["index"]), 0
                )
                options.append((free, worker.hostname, gpu["index"]))
        elif deployment.placement_gpu is None:
            free = (
                worker.ram_available_mib * MIB
                - HEADROOM_BYTES
                - reserved.get((worker.hostname, None), 0)
            )
            options.append((free, worker.hostname, None))
    if not options:
        raise PlacementError(f"No online worker has GPU {deployment.placement_gpu}.")
    free, hostname, gpu_index = max(options)
    if free < needed:
        where = f"{hostname}" + (f" GPU {gpu_index}" if gpu_index is not None else "")
        raise PlacementError(
            f"Deployment '{deployment.name}' needs about {_mib(needed)} per replica; the "
            f"roomiest worker, {where}, has {_mib(max(free, 0))} available."
        )
    return hostname, gpu_index


def _reserved_memory() -> dict[tuple[str, int | None], int]:
    reserved: dict[tuple[str, int | None], int] = {}
    for replica in Replica.objects.filter(state__in=[State.PENDING, State.LOADING]):
        key = (replica.worker, replica.gpu_index)
        reserved[key] = reserved.get(key, 0) + replica.memory_estimate_bytes
    return reserved


def _revised(deployment: Deployment, revision: Revision | None) -> Deployment:
    """The deployment as ``revision`` has it (an unsaved copy): what its replicas load."""
    # The deployment's own fields hold the serving revision's settings.
    if revision is None or revision.pk == deployment.revision_id:
        return deployment
    revised = copy.copy(deployment)
    revised.model_version = revision.model_version
    revised.adapter = revision.adapter
    for field, value in revision.values.items():
        setattr(revised, field, value)
    return revised


def _replica_spec(replica: Replica) -> ReplicaSpec:
    deployment = _revised(replica.deployment, replica.revision)
    version = deployment.model_version
    adapter = deployment.adapter
    return ReplicaSpec(
        replica_id=replica.pk,
        generation=replica.generation,
        deployment_id=deployment.pk,
        deployment_name=deployment.name,
        sha256=version.sha256,
        source_path=str(artifact_store().path_for(version.sha256)),
        adapter_sha256=adapter.sha256 if adapter else "",
        adapter_source_path=str(artifact_store().path_for(adapter.sha256)) if adapter else "",
        adapter_scale=deployment.adapter_scale,
        architecture=version.architecture,
        context_length=deployment.context_length,
        threads=deployment.threads,
        gpu_layers=deployment.gpu_layers if replica.gpu_index is not None else 0,
        gpu_index=replica.gpu_index,
        batch_size=deployment.batch_size,
        parallel_slots=deployment.parallel_slots,
        embeddings=deployment.embeddings,
        kv_cache_type=deployment.kv_cache_type,
        flash_attention=deployment.flash_attention,
        chat_template=deployment.chat_template,
        has_chat_template=version.has_chat_template,
        queue_size=deployment.queue_size,
        stream_interval_ms=deployment.stream_interval_ms,
    )


def _send_load(replica: Replica) -> None:
    from apps.deployments import tasks

    spec = _replica_spec(replica).as_dict()
    worker = replica.worker
    transaction.on_commit(lambda: tasks.send_to_worker(tasks.replica_load, worker, spec))


def _send_unload(replica: Replica, reason: str) -> None:
    from apps.deployments import tasks

    args = {"replica_id": replica.pk, "generation": replica.generation, "reason": reason}
    worker = replica.worker
    transaction.on_commit(lambda: tasks.send_to_worker(tasks.replica_unload, worker, args))


def _place_replicas(deployment: Deployment, revision: Revision | None = None) -> list[Replica]:
    """Give each wanted replica of ``revision`` (the serving one unless given) a worker and
    send it a load; raise PlacementError if one does not fit. Already-placed replicas
    are reloaded where they are."""
    revision = revision or deployment.revision
    target = _revised(deployment, revision)
    estimate = _estimate_for(target).total
    reserved = _reserved_memory()
    placed = []
    existing = {r.index: r for r in revision.replicas.select_for_update()}
    for index in range(deployment.replicas):
        replica = existing.get(index)
        if replica is not None and replica.state in (State.LOADING, State.READY):
            continue
        hostname, gpu_index = _choose_worker(target, estimate, reserved)
        reserved[(hostname, gpu_index)] = reserved.get((hostname, gpu_index), 0) + estimate
        if replica is None:
            replica = Replica(deployment=deployment, revision=revision, index=index, generation=0)
        replica.worker = hostname
        replica.gpu_index = gpu_index
        replica.generation += 1
        replica.state = State.PENDING
        replica.state_reason = ""
        replica.memory_estimate_bytes = estimate
        replica.updated_at = timezone.now()
        replica.save()
        _send_load(replica)
        placed.append(replica)
    return placed


def _refresh_state(deployment: Deployment) -> None:
    """The deployment's state, summed up from the replicas of the revision it serves (a
    revision loading beside it, or one draining, does not change what clients get)."""
    replicas = [
        r
        for r in deployment.replica_set.all()
        if deployment.revision_id is None or r.revision_id == deployment.revision_id
    ]
    states = [r.state for r in replicas]
    reasons = [r.state_reason for r in replicas if r.state_reason]
    if not deployment.running:
        busy = any(s in (State.PENDING, State.LOADING, State.READY, State.STOPPING) for s in states)
        state = State.STOPPING if busy else State.STOPPED
    elif State.READY in states:
        state = State.READY
    elif State.LOADING in states:
        state = State.LOADING
    elif deployment.idle_unloaded_at is not None:
        state = State.IDLE
    elif states and all(s == State.FAILED for s in states):
        state = State.FAILED
    else:
        state = State.PENDING
    reason = reasons[0] if state in (State.FAILED, State.PENDING) and reasons else ""
    if state == State.PENDING and not states:
        reason = deployment.state_reason
    if state == State.IDLE:
        reason = (
            f"Unloaded after {deployment.idle_unload_seconds} s without requests; the next "
            f"request loads it again (waiting up to {deployment.load_timeout_seconds} s)."
        )
    Deployment.objects.filter(pk=deployment.pk).update(
        state=state, state_reason=reason, updated_at=timezone.now()
    )
    deployment.state, deployment.state_reason = state, reason


def _check_version(version: ModelVersion) -> None:
    if version.format != Format.GGUF_MODEL:
        raise ValidationError(f"Only GGUF models can be deployed; {version} is a {version.format}.")
    if version.state != VersionState.APPROVED:
        raise ValidationError(
            f"{version} is {version.get_state_display().lower()}: only approved versions "
            "can be deployed."
        )
    # Its stored file must still verify, and its licence be allowed (or overridden).
    model_version_deploy_check(version=version)


def _check_adapter(version: ModelVersion, adapter: ModelVersion | None) -> None:
    """An adapter must be an approved GGUF LoRA made for this model."""
    if adapter is None:
        return
    if adapter.format != Format.GGUF_LORA:
        raise ValidationError(f"{adapter} is not a GGUF LoRA adapter (it is a {adapter.format}).")
    if adapter.state != VersionState.APPROVED:
        raise ValidationError(
            f"The adapter {adapter} is {adapter.get_state_display().lower()}: only approved "
            "adapters can be deployed."
        )
    model_version_deploy_check(version=adapter)
    parents = list(adapter.parents.all())
    if parents and version not in parents:
        names = ", ".join(str(p) for p in parents)
        raise ValidationError(f"The adapter {adapter} was trained on {names}, not on {version}.")
    if adapter.architecture and adapter.architecture != version.architecture:
        raise ValidationError(
            f"The adapter is for {adapter.architecture} models; {version} is "
            f"{version.architecture}."
        )


def _check_settings(version: ModelVersion, values: dict[str, Any]) -> None:
    _check_adapter(version, values.get("adapter"))
    kv_type = values.get("kv_cache_type", KvCacheType.F16)
    if kv_type != KvCacheType.F16 and not values.get("flash_attention", True):
        raise ValidationError(
            {
                "kv_cache_type": f"A {kv_type} KV cache needs flash attention on (llama.cpp "
                "stores a quantised V cache only for its fused attention)."
            }
        )
    limit = version.context_length
    if limit and values.get("context_length", 0) > limit:
        raise ValidationError(
            {
                "context_length": f"The context length {values['context_length']} is above "
                f"the model's {limit} tokens."
            }
        )


def deployment_values_check(*, version: ModelVersion, values: dict[str, Any]) -> None:
    """Raise ValidationError unless these settings suit ``version`` (a fitting adapter, a
    context the model takes, a KV cache type its attention supports)."""
    _check_settings(version, values)


def deployment_settings_check(*, version: ModelVersion, values: dict[str, Any]) -> None:
    """Raise ValidationError unless ``version`` may run with these settings: an approved
    GGUF model whose file verifies and whose licence is allowed, a fitting adapter, a
    context the model takes. Setups and trials ask before they load anything."""
    _check_version(version)
    _check_settings(version, values)


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
    _check_version(model_version)
    _check_settings(model_version, values)
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
        estimate = _estimate_for(deployment)
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
        _place_replicas(deployment)
    except NoWorkerOnline:
        deployment.state_reason = "Waiting for a worker to come online."
    _refresh_state(deployment)


def deployment_start(*, actor: User, deployment: Deployment) -> Deployment:
    """Serve a stopped (or failed) deployment again."""
    require_role(actor, MANAGER_ROLES, "start deployments")
    _check_version(deployment.model_version)
    _check_adapter(deployment.model_version, deployment.adapter)
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
        _stop_replicas(deployment, deployment.replica_set.select_for_update())
        _refresh_state(deployment)
        audit_record(
            actor=actor, action="deployment.stop", target=deployment, details={"reason": reason}
        )
    return deployment


def _stop_replicas(deployment: Deployment, replicas) -> None:
    online = {w.hostname for w in selectors.worker_list() if w.online}
    for replica in replicas:
        if replica.state in (State.STOPPED, State.FAILED):
            continue
        # A worker that is gone holds nothing: nothing to wait for.
        replica.state = State.STOPPING if replica.worker in online else State.STOPPED
        replica.updated_at = timezone.now()
        replica.save(update_fields=["state", "updated_at"])
        if replica.worker in online:
            _send_unload(replica, "The deployment was stopped.")


def deployment_restart(*, actor: User, deployment: Deployment) -> Deployment:
    """Reload every replica (a new generation), picking up changed settings."""
    require_role(actor, MANAGER_ROLES, "restart deployments")
    _check_version(deployment.model_version)
    with transaction.atomic():
        deployment = Deployment.objects.select_for_update().get(pk=deployment.pk)
        deployment.running = True
        deployment.save(update_fields=["running"])
        # Unload the current generation wherever it is: placement may pick another
        # worker for the new one, and the old copy must not stay resident there.
        _abandon_pending(deployment, "The deployment was restarted during the switch.")
        _stop_replicas(deployment, deployment.replica_set.select_for_update())
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
        _stop_replicas(deployment, extra)
        extra.delete()
        if deployment.running and deployment.idle_unloaded_at is None:
            _place_or_wait(deployment)
        else:
            _refresh_state(deployment)
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


def _pending(deployment: Deployment) -> Revision | None:
    return deployment.revisions.filter(state=RevisionState.PENDING).first()


def _refuse_during_switch(deployment: Deployment, doing: str) -> None:
    pending = _pending(deployment)
    if pending is not None:
        raise ValidationError(
            f"Revision {pending.number} of {deployment.name} is still loading; it cannot be "
            f"{doing} until the switch is over."
        )


def _abandon_pending(deployment: Deployment, reason: str) -> None:
    for revision in deployment.revisions.select_for_update().filter(state=RevisionState.PENDING):
        _fail_revision(revision, reason, unload=False)


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
    _check_version(model_version)
    _check_settings(model_version, merged)
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
        _revised(deployment, revision).full_clean(exclude=["revision"])
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
            _retire_replicas(old, drain=False)
            _place_or_wait(deployment)
        else:
            try:
                _place_replicas(deployment, revision)
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


SWITCHED = "The deployment switched to another setup."


def _retire_replicas(revision: Revision | None, *, drain: bool, reason: str = SWITCHED) -> None:
    """Take a revision's replicas out of service: each finishes what it holds (``drain``)
    or stops at once, then unloads; rows of a replaced revision go when their worker says
    so."""
    if revision is None:
        return
    online = {w.hostname for w in selectors.worker_list() if w.online}
    for replica in revision.replicas.select_for_update():
        if replica.state in (State.STOPPED, State.FAILED) or replica.worker not in online:
            replica.delete()
            continue
        replica.state = State.STOPPING
        replica.updated_at = timezone.now()
        replica.save(update_fields=["state", "updated_at"])
        if drain:
            _send_retire(replica, reason)
        else:
            _send_unload(replica, reason)


def _send_retire(replica: Replica, reason: str = SWITCHED) -> None:
    from apps.deployments import tasks

    args = {"replica_id": replica.pk, "generation": replica.generation, "reason": reason}
    worker = replica.worker
    transaction.on_commit(lambda: tasks.send_to_worker(tasks.replica_retire, worker, args))


def _promote(revision: Revision) -> None:
    """Every replica of a pending revision is ready: it takes the traffic."""
    deployment = Deployment.objects.select_for_update().get(pk=revision.deployment_id)
    changes = _changes(deployment, revision)
    old = _activate(deployment, revision)
    _retire_replicas(old, drain=True)
    _refresh_state(deployment)
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


def _fail_revision(revision: Revision, reason: str, *, unload: bool = True) -> None:
    """A pending revision did not load: the serving one stays; its replicas go."""
    Revision.objects.filter(pk=revision.pk).update(state=RevisionState.FAILED, reason=reason)
    for replica in revision.replicas.select_for_update():
        if unload and replica.state in (State.PENDING, State.LOADING, State.READY):
            _send_unload(replica, "The switch failed.")
        replica.delete()
    audit_record(
        actor=system_user(),
        action="deployment.switch_failed",
        target=revision.deployment,
        outcome=Outcome.FAILURE,
        details={"revision": revision.number, "reason": reason},
    )


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
        _refresh_state(deployment)
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
            _fail_revision(revision, reason or "A replica failed to load.")
        elif state == State.READY:
            states = list(revision.replicas.values_list("state", flat=True))
            if len(states) >= revision.deployment.replicas and all(
                s == State.READY for s in states
            ):
                _promote(revision)
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
            _send_load(replica)
            _refresh_state(replica.deployment)
            sent += 1
        waiting = Deployment.objects.select_for_update().filter(running=True, state=State.PENDING)
        for deployment in waiting:
            try:
                sent += len(_place_replicas(deployment))
            except PlacementError as exc:
                deployment.state_reason = exc.message
            _refresh_state(deployment)
    return sent


# -- load on demand: unloaded when idle, loaded again by the next request ---------------

IDLE_UNLOADED = "The deployment was unloaded after a while without requests."


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
                _refresh_state(deployment)  # its reason names the timings
        audit_record(
            actor=actor,
            action="deployment.load_on_demand_set",
            target=deployment,
            details={"from": before, "to": {f: getattr(deployment, f) for f in before}},
        )
    return deployment


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
        if deployment is None or deployment.revision is None or _pending(deployment):
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
        _retire_replicas(deployment.revision, drain=True, reason=IDLE_UNLOADED)
        _refresh_state(deployment)
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
        placed = _place_replicas(deployment)
        _refresh_state(deployment)
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
