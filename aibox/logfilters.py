"""Logging filters named in ``settings.LOGGING``."""

from __future__ import annotations

import logging

# Tasks that run once per inference request: each request already has its usage record,
# and two log lines per request cost a serving worker CPU on every request's path.
PER_REQUEST_TASKS = frozenset({"inference.submit"})


class QuietPerRequestTasks(logging.Filter):
    """Drop Celery's "received" and "succeeded" lines for per-request tasks.

    Their warnings and errors (a failed or retried task) still pass.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno > logging.INFO or not isinstance(record.args, dict):
            return True
        return record.args.get("name") not in PER_REQUEST_TASKS
