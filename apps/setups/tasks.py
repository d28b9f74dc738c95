"""Bridges between trial rows and ``workers/setups/trial.py``.

A trial runs on one worker's own queue (the worker it was placed on), in that worker's
process, with the same runtime that serves its deployments; it reports back with
``trial_report``, a task on the control queue.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import shared_task

from apps.setups import services
from apps.setups.models import TrialState
from apps.setups.services import trial_report_apply
from workers.artifacts import IntegrityError
from workers.hardware import inventory
from workers.inference.engine import LoadError
from workers.inference.runtime import runtime

log = logging.getLogger(__name__)

# A trial of a large model on a slow machine takes minutes; one stuck longer is failed.
TRIAL_SOFT_LIMIT_SECONDS = 30 * 60


def _report(trial_id: int, state: str, **fields: Any) -> None:
    trial_report.delay(trial_id=trial_id, state=state, **fields)


@shared_task(
    name="setups.trial_run",
    acks_late=False,
    soft_time_limit=TRIAL_SOFT_LIMIT_SECONDS,
    time_limit=TRIAL_SOFT_LIMIT_SECONDS + 60,
)
def trial_run(spec: dict[str, Any]) -> None:
    from workers.setups.trial import TrialError, TrialSpec, run_trial

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
    except (IntegrityError, LoadError, TrialError) as exc:
        _report(trial_id, TrialState.FAILED, reason=str(exc))
    except Exception as exc:
        log.exception("trial %s failed", trial_id)
        _report(trial_id, TrialState.FAILED, reason=f"The trial failed: {exc}")
    else:
        _report(trial_id, TrialState.SUCCEEDED, result=result.as_dict())


@shared_task(name="setups.trial_report")
def trial_report(
    *,
    trial_id: int,
    state: str,
    progress: int = 0,
    message: str = "",
    reason: str = "",
    result: dict[str, Any] | None = None,
) -> None:
    trial_report_apply(
        trial_id=trial_id,
        state=state,
        progress=progress,
        message=message,
        reason=reason,
        result=result,
    )


@shared_task(name="setups.trial_reap")
def trial_reap() -> int:
    return services.trial_reap()
