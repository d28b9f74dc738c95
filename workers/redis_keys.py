"""Every Redis key AIBox writes itself, named in one place.

Both the control plane and the workers import this module (it has no Django in it).
Celery's queues and results, and Django's cache (``aibox:1:``, settings.CACHES) name
their own keys; everything else is under ``aibox:`` here.
"""

from __future__ import annotations

KEY_PREFIX = "aibox"

# Workers -----------------------------------------------------------------------------

# The hostnames of workers that have sent a heartbeat.
WORKERS_SET = f"{KEY_PREFIX}:workers"


def heartbeat_key(hostname: str) -> str:
    """A worker's heartbeat: its hardware, replicas and load, rewritten every few seconds."""
    return f"{KEY_PREFIX}:worker:{hostname}"


# Inference requests and deployments ---------------------------------------------------


def events_key(request_id: str) -> str:
    """The stream of a request's events, written by its worker (``protocol``)."""
    return f"{KEY_PREFIX}:inference:{request_id}:events"


def cancel_key(request_id: str) -> str:
    """Set when the client of a request went away: the worker stops generating."""
    return f"{KEY_PREFIX}:inference:{request_id}:cancel"


def admission_key(deployment_id: int) -> str:
    """The requests a deployment has admitted and not yet finished."""
    return f"{KEY_PREFIX}:deployment:{deployment_id}:admitted"


def replica_requests_key(replica_id: int) -> str:
    """The requests sent to a replica and not yet finished, scored by when they are
    forgotten: the gateway sends each request to the replica with the fewest."""
    return f"{KEY_PREFIX}:replica:{replica_id}:requests"


def last_request_key(deployment_id: int) -> str:
    """When the deployment last admitted a request (Unix time): its idle timer."""
    return f"{KEY_PREFIX}:deployment:{deployment_id}:last_request"


def limits_key(subject: str, name: str) -> str:
    """One counter of a caller's usage limits (``apps/inference/limits.py``); the subject
    is ``key:<id>`` or ``user:<id>``."""
    return f"{KEY_PREFIX}:limits:{subject}:{name}"


# Fine-tunes ---------------------------------------------------------------------------


def finetune_events_key(job_id: int) -> str:
    """The stream of a fine-tune's progress events (``apps/finetune/progress.py``)."""
    return f"{KEY_PREFIX}:finetune:{job_id}:events"


def finetune_cancel_key(job_id: int) -> str:
    return f"{KEY_PREFIX}:finetune:{job_id}:cancel"


def finetune_alive_key(job_id: int) -> str:
    """The training worker's heartbeat for a running job."""
    return f"{KEY_PREFIX}:finetune:{job_id}:alive"


def finetune_seen_key(job_id: int) -> str:
    """When the job's heartbeat was last seen."""
    return f"{KEY_PREFIX}:finetune:{job_id}:seen"


# Lives as long as Redis keeps its data: its absence says queued messages may be gone.
FINETUNE_QUEUE_MARK = f"{KEY_PREFIX}:finetune:queue-mark"
