"""Bridges between deployment rows and the inference runtime in ``workers/``.

Loads, unloads and requests go to one worker's own queue (Celery's worker-direct
queues); the worker reports back with ``replica_report``, a task on the control
queue that any worker with database access runs.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import Task, shared_task
from celery.utils import worker_direct

from apps.deployments.models import State
from workers.artifacts import IntegrityError
from workers.inference.engine import LoadError
from workers.inference.protocol import ReplicaSpec, RequestSpec
from workers.inference.runtime import runtime

log = logging.getLogger(__name__)


def send_to_worker(task: Task, worker: str, payload: dict[str, Any]) -> None:
    task.apply_async(args=[payload], queue=worker_direct(worker))


def _report(spec: ReplicaSpec, state: str, reason: str = "", **details: Any) -> None:
    replica_report.delay(
        replica_id=spec.replica_id,
        generation=spec.generation,
        state=state,
        reason=reason,
        details=details,
    )


@shared_task(name="deployments.replica_load", acks_late=False)
def replica_load(spec: dict[str, Any]) -> None:
    replica_spec = ReplicaSpec.from_dict(spec)
    _report(replica_spec, State.LOADING)
    try:
        replica = runtime().load(replica_spec)
    except IntegrityError as exc:
        _report(replica_spec, State.FAILED, str(exc), integrity_failure=True)
    except LoadError as exc:
        _report(replica_spec, State.FAILED, str(exc))
    except Exception as exc:
        log.exception("loading replica %s failed", replica_spec.replica_id)
        _report(replica_spec, State.FAILED, f"Loading failed: {exc}")
    else:
        snap = replica.snapshot()
        _report(
            replica_spec, State.READY, threads=snap["threads"], chat_template=snap["chat_template"]
        )


@shared_task(name="deployments.replica_unload", acks_late=False)
def replica_unload(args: dict[str, Any]) -> None:
    runtime().unload(args["replica_id"], generation=args["generation"], reason=args["reason"])
    replica_report.delay(
        replica_id=args["replica_id"],
        generation=args["generation"],
        state=State.STOPPED,
        reason="",
        details={},
    )


@shared_task(name="deployments.replica_retire", acks_late=False)
def replica_retire(args: dict[str, Any]) -> None:
    # Blocks one of the worker's task threads while the replica finishes its requests.
    kwargs = {"reason": args["reason"]} if "reason" in args else {}  # older senders: none
    runtime().retire(args["replica_id"], generation=args["generation"], **kwargs)
    replica_report.delay(
        replica_id=args["replica_id"],
        generation=args["generation"],
        state=State.STOPPED,
        reason="",
        details={},
    )


@shared_task(name="deployments.replica_report")
def replica_report(
    *, replica_id: int, generation: int, state: str, reason: str, details: dict[str, Any]
) -> None:
    from apps.deployments.services import replica_state_apply

    replica_state_apply(
        replica_id=replica_id, generation=generation, state=state, reason=reason, details=details
    )


@shared_task(name="deployments.idle_unload")
def idle_unload() -> None:
    """Unload deployments that had no request for their idle period (beat, every 30 s)."""
    from apps.deployments import services

    services.deployments_idle_unload()


@shared_task(name="deployments.worker_online")
def worker_online(hostname: str) -> None:
    from apps.deployments import services

    services.worker_online(hostname=hostname)


@shared_task(name="inference.submit", acks_late=False, ignore_result=True)
def inference_submit(spec: dict[str, Any]) -> None:
    # Hands the request to the replica's own thread and returns at once.
    runtime().submit(RequestSpec.from_dict(spec))
