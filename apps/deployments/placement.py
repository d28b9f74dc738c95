"""Where a deployment's replicas run, and what their workers are told.

Placement picks, for each replica, the online worker (and GPU) with the most free memory
that fits the memory estimate; the replica's spec goes to that worker's own queue as a
task sent by name (``protocol.REPLICA_LOAD`` and the others), so the control plane never
imports the runtime in ``workers/inference``. The deployment's state is summed up here
from its replicas.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Any

from celery.utils import worker_direct
from django.core.exceptions import ValidationError
from django.db import transaction
from django.utils import timezone

from aibox.celery import app as celery_app
from apps.deployments import selectors
from apps.deployments.models import (
    KV_CACHE_BYTES,
    Deployment,
    KvCacheType,
    Replica,
    Revision,
    State,
)
from apps.registry.artifacts import artifact_store
from apps.registry.models import ModelVersion
from workers.inference import protocol
from workers.inference.protocol import ReplicaSpec
from workers.labels import labels_match

MIB = 1024 * 1024
# llama.cpp's scratch buffers and runtime overhead beyond weights and KV cache.
COMPUTE_OVERHEAD_BYTES = 48 * MIB
# Keep this much of a worker's memory free for the OS and the worker itself.
HEADROOM_BYTES = 256 * MIB


class PlacementError(ValidationError):
    """No online worker can hold the deployment; the message says why."""


class NoWorkerOnline(PlacementError):
    """No worker is online at all, or none with the labels the deployment asks for: a
    deployment can wait for one rather than fail."""


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


def estimate_for(deployment: Deployment) -> MemoryEstimate:
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


def labels_wanted(deployment: Deployment) -> str:
    """The worker a deployment's labels ask for, in words ("" when it asks for none)."""
    parts = []
    if deployment.placement_labels:
        parts.append(f"the labels {', '.join(deployment.placement_labels)}")
    if deployment.exclude_labels:
        parts.append(f"none of {', '.join(deployment.exclude_labels)}")
    return " and ".join(parts)


def _choose_worker(
    deployment: Deployment,
    needed: int,
    reserved: dict[tuple[str, int | None], int],
    avoid: frozenset[str] = frozenset(),
) -> tuple[str, int | None]:
    """The online worker (and GPU) with the most free memory that fits ``needed`` bytes,
    preferring one not in ``avoid`` (the workers that hold the deployment's other
    replicas: spread over hosts, one dying takes one replica) when such a one fits.

    Only workers with the deployment's ``placement_labels`` and none of its
    ``exclude_labels`` are considered; when none is online, NoWorkerOnline names them.
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
    wanted = labels_wanted(deployment)
    if not workers:
        raise NoWorkerOnline(
            f"No worker with {wanted} is online to serve models."
            if wanted
            else "No worker is online to serve models."
        )
    if wanted:
        workers = [
            w
            for w in workers
            if labels_match(
                w.labels, wanted=deployment.placement_labels, unwanted=deployment.exclude_labels
            )
        ]
        if not workers:
            # A node pool may be scaled up later: it waits, like a box with no worker.
            raise NoWorkerOnline(
                f"Waiting for a worker with {wanted}: no online worker that serves models has them."
            )
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
    apart = [option for option in options if option[1] not in avoid and option[0] >= needed]
    free, hostname, gpu_index = max(apart or options)
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


def revised(deployment: Deployment, revision: Revision | None) -> Deployment:
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


def replica_spec(replica: Replica) -> ReplicaSpec:
    deployment = revised(replica.deployment, replica.revision)
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
        serving_mode=deployment.serving_mode,
        chat_template=deployment.chat_template,
        has_chat_template=version.has_chat_template,
        queue_size=deployment.queue_size,
        stream_interval_ms=deployment.stream_interval_ms,
    )


def worker_task_send(name: str, worker: str, payload: dict[str, Any]) -> None:
    """Send the task ``name`` (one of ``protocol``'s) to ``worker``'s own queue."""
    celery_app.send_task(name, args=[payload], queue=worker_direct(worker))


def replica_load_send(replica: Replica) -> None:
    spec = replica_spec(replica).as_dict()
    worker = replica.worker
    transaction.on_commit(lambda: worker_task_send(protocol.REPLICA_LOAD, worker, spec))


def replica_unload_send(replica: Replica, reason: str) -> None:
    args = {"replica_id": replica.pk, "generation": replica.generation, "reason": reason}
    worker = replica.worker
    transaction.on_commit(lambda: worker_task_send(protocol.REPLICA_UNLOAD, worker, args))


def replica_reload(replica: Replica) -> None:
    """Start a new generation of ``replica`` where its row says (pending, no reason) and
    send its worker the load, once the transaction commits."""
    replica.generation += 1
    replica.state, replica.state_reason = State.PENDING, ""
    replica.updated_at = timezone.now()
    replica.save()
    replica_load_send(replica)


def replicas_place(deployment: Deployment, revision: Revision | None = None) -> list[Replica]:
    """Give each wanted replica of ``revision`` (the serving one unless given) a worker and
    send it a load; raise PlacementError if one does not fit. Already-placed replicas
    are reloaded where they are."""
    revision = revision or deployment.revision
    target = revised(deployment, revision)
    estimate = estimate_for(target).total
    reserved = _reserved_memory()
    placed = []
    existing = {r.index: r for r in revision.replicas.select_for_update()}
    taken = {r.worker for r in existing.values() if r.state in (State.LOADING, State.READY)}
    for index in range(deployment.replicas):
        replica = existing.get(index)
        if replica is not None and replica.state in (State.LOADING, State.READY):
            continue
        hostname, gpu_index = _choose_worker(target, estimate, reserved, frozenset(taken))
        reserved[(hostname, gpu_index)] = reserved.get((hostname, gpu_index), 0) + estimate
        taken.add(hostname)
        if replica is None:
            replica = Replica(deployment=deployment, revision=revision, index=index, generation=0)
        replica.worker, replica.gpu_index = hostname, gpu_index
        replica.memory_estimate_bytes = estimate
        replica_reload(replica)
        placed.append(replica)
    return placed


def replica_place_again(replica: Replica) -> tuple[str, int | None]:
    """Give ``replica`` a new generation on another online worker that fits it (its own
    is gone) and send it a load; returns the worker and GPU. Raises PlacementError (the
    replica unchanged) when none can hold it, or when the deployment is pinned to the
    worker that went away."""
    target = revised(replica.deployment, replica.revision)
    estimate = estimate_for(target).total
    siblings = Replica.objects.filter(
        revision_id=replica.revision_id, state__in=(State.PENDING, State.LOADING, State.READY)
    ).exclude(pk=replica.pk)
    avoid = frozenset(siblings.values_list("worker", flat=True))
    hostname, gpu_index = _choose_worker(target, estimate, _reserved_memory(), avoid)
    replica.worker, replica.gpu_index = hostname, gpu_index
    replica.memory_estimate_bytes = estimate
    replica_reload(replica)
    return hostname, gpu_index


def deployment_state_refresh(deployment: Deployment) -> None:
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


def replicas_stop(deployment: Deployment, replicas) -> None:
    online = {w.hostname for w in selectors.worker_list() if w.online}
    for replica in replicas:
        if replica.state in (State.STOPPED, State.FAILED):
            continue
        # A worker that is gone holds nothing: nothing to wait for.
        replica.state = State.STOPPING if replica.worker in online else State.STOPPED
        replica.updated_at = timezone.now()
        replica.save(update_fields=["state", "updated_at"])
        if replica.worker in online:
            replica_unload_send(replica, "The deployment was stopped.")


SWITCHED = "The deployment switched to another setup."


def replicas_retire(revision: Revision | None, *, drain: bool, reason: str = SWITCHED) -> None:
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
            replica_unload_send(replica, reason)


def _send_retire(replica: Replica, reason: str = SWITCHED) -> None:
    args = {"replica_id": replica.pk, "generation": replica.generation, "reason": reason}
    worker = replica.worker
    transaction.on_commit(lambda: worker_task_send(protocol.REPLICA_RETIRE, worker, args))
