"""The deployment tasks a serving worker runs: load, unload and retire replicas, and
take requests, in the runtime of ``workers/inference``.

Only workers import this module (the Celery app includes it when a worker starts;
``aibox/celery.py``): the control plane sends these tasks by name (``protocol.REPLICA_LOAD``
and the others) to one worker's own queue, so the web never loads llama.cpp. The worker
reports each replica's state back with ``protocol.REPLICA_REPORT`` (``tasks.py``).
"""

from __future__ import annotations

import logging
from typing import Any

from celery import current_app, shared_task

from apps.deployments.models import State
from workers.artifacts import IntegrityError
from workers.inference import protocol
from workers.inference.cache import CacheError
from workers.inference.engine import LoadError
from workers.inference.protocol import ReplicaSpec, RequestSpec
from workers.inference.runtime import runtime

log = logging.getLogger(__name__)


def _report(replica_id: int, generation: int, state: str, reason: str = "", **details: Any) -> None:
    current_app.send_task(
        protocol.REPLICA_REPORT,
        kwargs={
            "replica_id": replica_id,
            "generation": generation,
            "state": state,
            "reason": reason,
            "details": details,
        },
    )


@shared_task(name=protocol.REPLICA_LOAD, acks_late=False)
def replica_load(spec: dict[str, Any]) -> None:
    replica_spec = ReplicaSpec.from_dict(spec)
    ident = (replica_spec.replica_id, replica_spec.generation)
    _report(*ident, State.LOADING)
    try:
        replica = runtime().load(replica_spec)
    except IntegrityError as exc:
        _report(*ident, State.FAILED, str(exc), integrity_failure=True)
    except (LoadError, CacheError) as exc:
        _report(*ident, State.FAILED, str(exc))
    except Exception as exc:
        log.exception("loading replica %s failed", replica_spec.replica_id)
        _report(*ident, State.FAILED, f"Loading failed: {exc}")
    else:
        snap = replica.snapshot()
        _report(*ident, State.READY, threads=snap["threads"], chat_template=snap["chat_template"])


@shared_task(name=protocol.REPLICA_UNLOAD, acks_late=False)
def replica_unload(args: dict[str, Any]) -> None:
    runtime().unload(args["replica_id"], generation=args["generation"], reason=args["reason"])
    _report(args["replica_id"], args["generation"], State.STOPPED)


@shared_task(name=protocol.REPLICA_RETIRE, acks_late=False)
def replica_retire(args: dict[str, Any]) -> None:
    # Blocks one of the worker's task threads while the replica finishes its requests.
    kwargs = {"reason": args["reason"]} if "reason" in args else {}  # older senders: none
    runtime().retire(args["replica_id"], generation=args["generation"], **kwargs)
    _report(args["replica_id"], args["generation"], State.STOPPED)


@shared_task(name=protocol.INFERENCE_SUBMIT, acks_late=False, ignore_result=True)
def inference_submit(spec: dict[str, Any]) -> None:
    # Hands the request to the replica's own thread and returns at once.
    runtime().submit(RequestSpec.from_dict(spec))
