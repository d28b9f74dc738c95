"""The trial task a serving worker runs: one setup measured on this worker.

Only workers import this module (the Celery app includes it when a worker starts;
``aibox/celery.py``): the control plane sends ``setups.trial_run`` by name to the worker
the trial was placed on, so the web never loads llama.cpp. The worker reports progress
and the result with ``setups.trial_report`` on the control queue (``tasks.py``).
"""

from __future__ import annotations

import logging
from typing import Any

from celery import current_app, shared_task

from apps.setups.models import TrialState
from workers.artifacts import IntegrityError
from workers.hardware import inventory
from workers.inference.cache import CacheError
from workers.inference.engine import LoadError
from workers.inference.runtime import runtime
from workers.setups.trial import TrialError, TrialSpec, run_trial

log = logging.getLogger(__name__)

# A trial of a large model on a slow machine takes minutes; one stuck longer is failed.
TRIAL_SOFT_LIMIT_SECONDS = 30 * 60


def _report(trial_id: int, state: str, **fields: Any) -> None:
    current_app.send_task(
        "setups.trial_report", kwargs={"trial_id": trial_id, "state": state, **fields}
    )


@shared_task(
    name="setups.trial_run",
    acks_late=False,
    soft_time_limit=TRIAL_SOFT_LIMIT_SECONDS,
    time_limit=TRIAL_SOFT_LIMIT_SECONDS + 60,
)
def trial_run(spec: dict[str, Any]) -> None:
    trial_spec = TrialSpec.from_dict(spec)
    trial_id = trial_spec.trial_id

    def progress(percent: int, message: str) -> None:
        _report(trial_id, TrialState.RUNNING, progress=percent, message=message)

    progress(0, "Starting.")
    try:
        result = run_trial(
            trial_spec,
            cache=runtime().cache,
            cpu_cores=inventory().cpu_cores,
            progress=progress,
        )
    except (IntegrityError, CacheError, LoadError, TrialError) as exc:
        _report(trial_id, TrialState.FAILED, reason=str(exc))
    except Exception as exc:
        log.exception("trial %s failed", trial_id)
        _report(trial_id, TrialState.FAILED, reason=f"The trial failed: {exc}")
    else:
        _report(trial_id, TrialState.SUCCEEDED, result=result.as_dict())
