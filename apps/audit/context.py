"""Where an action came from (IP, user agent), carried to ``audit_record``.

Set per request by ``AuditContextMiddleware``; Celery tasks and management commands
have none, and their events record no source.
"""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass


@dataclass(frozen=True)
class RequestSource:
    ip: str | None
    user_agent: str


_current: ContextVar[RequestSource | None] = ContextVar("audit_request_source", default=None)


def current_source() -> RequestSource | None:
    return _current.get()


def set_source(source: RequestSource | None):
    return _current.set(source)


def reset_source(token) -> None:
    _current.reset(token)
