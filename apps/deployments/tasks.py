"""The control plane's deployment tasks: what workers report, workers coming online,
moving replicas off workers that went offline and unloading deployments left idle (beat).

The tasks a serving worker runs (load, unload, retire, requests) are in
``worker_tasks.py``; the control plane sends them by name, so importing this
module never loads the runtime.
"""

from __future__ import annotations

from typing import Any

from celery import shared_task

from apps.deployments import lifecycle
from workers.inference import protocol


@shared_task(name=protocol.REPLICA_REPORT)
def replica_report(
    *, replica_id: int, generation: int, state: str, reason: str, details: dict[str, Any]
) -> None:
    lifecycle.replica_state_apply(
        replica_id=replica_id, generation=generation, state=state, reason=reason, details=details
    )


@shared_task(name="deployments.idle_unload")
def idle_unload() -> None:
    """Unload deployments that had no request for their idle period (beat, every 30 s)."""
    lifecycle.deployments_idle_unload()


@shared_task(name="deployments.replicas_rehome")
def replicas_rehome() -> None:
    """Move the replicas of workers that went offline to others (beat, every 15 s)."""
    lifecycle.replicas_rehome()


@shared_task(name="deployments.worker_online")
def worker_online(hostname: str) -> None:
    lifecycle.worker_online(hostname=hostname)
