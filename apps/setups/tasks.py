"""The control plane's trial tasks: what a trial reports, and failing trials that went
silent (beat).

The trial itself runs on a worker (``worker_tasks.py``), sent there by name, so
importing this module never loads the runtime.
"""

from __future__ import annotations

from typing import Any

from celery import shared_task

from apps.setups import services


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
    services.trial_report_apply(
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
