"""Where a deployment's replicas run, and what their workers are told.

Placement picks, for each replica, the online worker (and GPU, or GPUs for a split) with
the most memory left once the replica's estimate is on it (``memory``: RAM and each GPU
it uses, every one of them must fit); the replica's spec goes to that worker's own queue
as a task sent by name (``protocol.REPLICA_LOAD`` and the others), so the control plane never
imports the runtime in ``workers/inference``. The deployment's state is summed up here
from its replicas.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from celery.utils import worker_direct
from django.core.exceptions import ValidationError
from django.db import transaction
from django.utils import timezone

from aibox.celery import app as celery_app
from apps.deployments import selectors
from apps.deployments.memory import (
    HEADROOM_BYTES,
    MIB,
    MemoryEstimate,
    Offload,
    memory_estimate,
)
from apps.deployments.models import (
    Deployment,
    Replica,
    Revision,
    SplitMode,
    State,
    tensor_split_parse,
)
from apps.registry.artifacts import artifact_store
from workers.inference import protocol
from workers.inference.protocol import ReplicaSpec
from workers.labels import labels_match


class PlacementError(ValidationError):
    """No online worker can hold the deployment; the message says why."""


class NoWorkerOnline(PlacementError):
    """No worker is online at all, or none with the labels the deployment asks for: a
    deployment can wait for one rather than fail."""


def _mib(n: int) -> str:
    return f"{n / MIB:,.0f} MiB"


def estimate_for(deployment: Deployment, offload: Offload | None = None) -> MemoryEstimate:
    """The memory one replica of ``deployment`` takes, all in RAM unless ``offload``
    says what goes to a worker's GPUs. A LoRA adapter is loaded whole, beside the model."""
    return memory_estimate(
        version=deployment.model_version,
        context_length=deployment.context_length,
        parallel_slots=deployment.parallel_slots,
        batch_size=deployment.batch_size,
        kv_cache_type=deployment.kv_cache_type,
        adapter_bytes=deployment.adapter.size if deployment.adapter is not None else 0,
        offload=offload,
    )


def labels_wanted(deployment: Deployment) -> str:
    """The worker a deployment's labels ask for, in words ("" when it asks for none)."""
    parts = []
    if deployment.placement_labels:
        parts.append(f"the labels {', '.join(deployment.placement_labels)}")
    if deployment.exclude_labels:
        parts.append(f"none of {', '.join(deployment.exclude_labels)}")
    return " and ".join(parts)


Reserved = dict[tuple[str, int | None], int]
SPLIT_PINNED = (
    "a layer or row split runs on all of a worker's GPUs, not on the one GPU the "
    "deployment is pinned to (placement_gpu)"
)


@dataclass(frozen=True)
class Option:
    """One way to run a replica on a worker: on its RAM, on one of its GPUs, or split
    over its GPUs, with what each device needs and has (RAM less the headroom, a GPU's
    free memory, both less what replicas still loading there were promised)."""

    hostname: str
    gpu_index: int | None  # the GPU, or the first of a split; None: the CPU
    estimate: MemoryEstimate
    # (GPU index, or None for RAM; bytes needed; bytes available), RAM first
    needs: tuple[tuple[int | None, int, int], ...]

    @property
    def fits(self) -> bool:
        return all(needed <= available for _, needed, available in self.needs)

    @property
    def room(self) -> int:
        """What is left after loading it on the scarcest device it uses: the GPUs when
        it uses any (the memory they lack is what refuses a model), else RAM."""
        gpus = [available - needed for index, needed, available in self.needs if index is not None]
        return min(gpus) if gpus else self.needs[0][2] - self.needs[0][1]

    def shortfalls(self) -> str:
        """What does not fit where, in words: "GPU 1 has 900 MiB available for its
        1,200 MiB"."""
        return " and ".join(
            f"{_device(index)} has {_mib(max(available, 0))} available for its {_mib(needed)}"
            for index, needed, available in self.needs
            if needed > available
        )


def _device(index: int | None) -> str:
    return "RAM" if index is None else f"GPU {index}"


def _ram_free(worker: selectors.WorkerStatus, reserved: Reserved) -> int:
    return (
        worker.ram_available_mib * MIB - HEADROOM_BYTES - reserved.get((worker.hostname, None), 0)
    )


def _gpu_free(worker: selectors.WorkerStatus, gpu: dict[str, Any], reserved: Reserved) -> int:
    return gpu["memory_free_mib"] * MIB - reserved.get((worker.hostname, gpu["index"]), 0)


def _option(
    deployment: Deployment,
    worker: selectors.WorkerStatus,
    reserved: Reserved,
    offload: Offload | None,
) -> Option:
    estimate = estimate_for(deployment, offload)
    gpus = {gpu["index"]: gpu for gpu in worker.gpus}
    needs = [(None, estimate.ram, _ram_free(worker, reserved))]
    needs += [
        (index, size, _gpu_free(worker, gpus[index], reserved))
        for index, size in estimate.gpus.items()
    ]
    return Option(worker.hostname, min(estimate.gpus, default=None), estimate, tuple(needs))


def worker_options(
    deployment: Deployment, worker: selectors.WorkerStatus, reserved: Reserved
) -> tuple[list[Option], str]:
    """The ways ``deployment`` (its settings; ``placement_gpu`` if it pins one) could run
    on ``worker``, fitting or not, and why there is none when there is none.

    No GPUs, or 0 GPU layers: its RAM. Split mode none: each of its GPUs alone (the one
    pinned, if any), the layers that stay on the CPU in its RAM. A layer or row split:
    all its GPUs at once, shared by the tensor split's proportions (GPUs it leaves out
    take none), or when it gives none, by their free memory as llama.cpp shares them.
    """
    pinned = deployment.placement_gpu
    if not worker.gpus or deployment.gpu_layers == 0:
        if pinned is not None:
            return [], f"{worker.hostname} has no GPU {pinned}"
        return [_option(deployment, worker, reserved, None)], ""
    gpus = sorted(worker.gpus, key=lambda gpu: gpu["index"])
    indices = [gpu["index"] for gpu in gpus]
    if deployment.split_mode == SplitMode.NONE:
        if pinned is not None and pinned not in indices:
            return [], f"{worker.hostname} has no GPU {pinned}"
        return [
            _option(deployment, worker, reserved, Offload(deployment.gpu_layers, ((index, 1.0),)))
            for index in indices
            if pinned is None or index == pinned
        ], ""
    if pinned is not None:
        return [], SPLIT_PINNED
    proportions = tensor_split_parse(deployment.tensor_split)
    if len(proportions) > len(gpus):
        return [], (
            f"the tensor split {deployment.tensor_split} names {len(proportions)} GPUs and "
            f"{worker.hostname} has {len(gpus)}"
        )
    if not proportions:
        proportions = [max(_gpu_free(worker, gpu, reserved), 0) for gpu in gpus]
        if not any(proportions):
            proportions = [1.0] * len(gpus)
    proportions += [0.0] * (len(gpus) - len(proportions))
    offload = Offload(
        deployment.gpu_layers, tuple(zip(indices, proportions, strict=True)), deployment.split_mode
    )
    return [_option(deployment, worker, reserved, offload)], ""


def _choose_worker(
    deployment: Deployment, reserved: Reserved, avoid: frozenset[str] = frozenset()
) -> Option:
    """The online worker (and GPU, or GPUs) with the most room left that fits the
    replica on every device it uses, preferring one not in ``avoid`` (the workers that
    hold the deployment's other replicas: spread over hosts, one dying takes one
    replica) when such a one fits.

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
    options: list[Option] = []
    unfit: list[str] = []
    for worker in workers:
        found, why = worker_options(deployment, worker, reserved)
        options += found
        if why:
            unfit.append(why)
    if not options:
        if deployment.placement_gpu is not None and deployment.split_mode == SplitMode.NONE:
            raise PlacementError(f"No online worker has GPU {deployment.placement_gpu}.")
        reasons = "; ".join(dict.fromkeys(unfit))
        raise PlacementError(f"No online worker can run deployment '{deployment.name}': {reasons}.")
    fitting = [option for option in options if option.fits]
    apart = [option for option in fitting if option.hostname not in avoid]
    if apart or fitting:
        return max(apart or fitting, key=_roomiest)
    roomiest = max(options, key=_roomiest)
    estimate = roomiest.estimate
    if not estimate.gpus:
        _, needed, free = roomiest.needs[0]
        raise PlacementError(
            f"Deployment '{deployment.name}' needs about {_mib(needed)} per replica; the "
            f"roomiest worker, {roomiest.hostname}, has {_mib(max(free, 0))} available."
        )
    where = ", ".join(f"{_device(index)} {_mib(needed)}" for index, needed, _ in roomiest.needs)
    raise PlacementError(
        f"Deployment '{deployment.name}' needs about {_mib(estimate.total)} per replica "
        f"({where}); on the roomiest worker, {roomiest.hostname}, "
        f"{roomiest.shortfalls()}."
    )


def _roomiest(option: Option) -> tuple[int, str, int]:
    gpu = -1 if option.gpu_index is None else option.gpu_index
    return option.room, option.hostname, gpu


def _reserve(reserved: Reserved, hostname: str, where: dict[str, Any]) -> None:
    """Count a replica's memory, by device (``MemoryEstimate.where``), as promised."""
    reserved[(hostname, None)] = reserved.get((hostname, None), 0) + where["ram"]
    for index, size in where["gpus"].items():
        key = (hostname, int(index))
        reserved[key] = reserved.get(key, 0) + size


def _reserved_memory() -> Reserved:
    reserved: Reserved = {}
    for replica in Replica.objects.filter(state__in=[State.PENDING, State.LOADING]):
        if replica.memory_by_device:
            _reserve(reserved, replica.worker, replica.memory_by_device)
        else:  # placed before memory was kept by device: all of it on one
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
        split_mode=deployment.split_mode if replica.gpu_index is not None else SplitMode.NONE,
        tensor_split=tensor_split_parse(deployment.tensor_split)
        if replica.gpu_index is not None
        else [],
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


def _place(replica: Replica, option: Option) -> None:
    replica.worker, replica.gpu_index = option.hostname, option.gpu_index
    replica.memory_estimate_bytes = option.estimate.total
    replica.memory_by_device = option.estimate.where()
    replica_reload(replica)


def replicas_place(deployment: Deployment, revision: Revision | None = None) -> list[Replica]:
    """Give each wanted replica of ``revision`` (the serving one unless given) a worker and
    send it a load; raise PlacementError if one does not fit. Already-placed replicas
    are reloaded where they are."""
    revision = revision or deployment.revision
    target = revised(deployment, revision)
    reserved = _reserved_memory()
    placed = []
    existing = {r.index: r for r in revision.replicas.select_for_update()}
    taken = {r.worker for r in existing.values() if r.state in (State.LOADING, State.READY)}
    for index in range(deployment.replicas):
        replica = existing.get(index)
        if replica is not None and replica.state in (State.LOADING, State.READY):
            continue
        option = _choose_worker(target, reserved, frozenset(taken))
        _reserve(reserved, option.hostname, option.estimate.where())
        taken.add(option.hostname)
        if replica is None:
            replica = Replica(deployment=deployment, revision=revision, index=index, generation=0)
        _place(replica, option)
        placed.append(replica)
    return placed


def replica_place_again(replica: Replica) -> tuple[str, int | None]:
    """Give ``replica`` a new generation on another online worker that fits it (its own
    is gone) and send it a load; returns the worker and GPU. Raises PlacementError (the
    replica unchanged) when none can hold it, or when the deployment is pinned to the
    worker that went away."""
    target = revised(replica.deployment, replica.revision)
    siblings = Replica.objects.filter(
        revision_id=replica.revision_id, state__in=(State.PENDING, State.LOADING, State.READY)
    ).exclude(pk=replica.pk)
    avoid = frozenset(siblings.values_list("worker", flat=True))
    option = _choose_worker(target, _reserved_memory(), avoid)
    _place(replica, option)
    return option.hostname, option.gpu_index


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
