from __future__ import annotations

import ipaddress
from collections.abc import Callable

from asgiref.sync import iscoroutinefunction, markcoroutinefunction
from django.conf import settings
from django.http import HttpRequest, HttpResponse

from apps.audit.context import RequestSource, reset_source, set_source


def client_ip(request: HttpRequest) -> str | None:
    """The client's address: REMOTE_ADDR, or the proxy's X-Forwarded-For when trusted."""
    candidate = request.META.get("REMOTE_ADDR", "")
    if settings.TRUST_X_FORWARDED_FOR:
        forwarded = request.META.get("HTTP_X_FORWARDED_FOR", "")
        if forwarded:
            candidate = forwarded.split(",")[0].strip()
    try:
        return ipaddress.ip_address(candidate).compressed
    except ValueError:
        return None


def _source(request: HttpRequest) -> RequestSource:
    return RequestSource(
        ip=client_ip(request),
        user_agent=request.META.get("HTTP_USER_AGENT", "")[:400],
    )


class AuditContextMiddleware:
    """Records the client's address for audit events; async-capable, so async views (the
    inference endpoint) do not pay a thread switch for it."""

    sync_capable = True
    async_capable = True

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response
        if iscoroutinefunction(get_response):
            markcoroutinefunction(self)

    def __call__(self, request: HttpRequest):
        if iscoroutinefunction(self):
            return self.__acall__(request)
        token = set_source(_source(request))
        try:
            return self.get_response(request)
        finally:
            reset_source(token)

    async def __acall__(self, request: HttpRequest) -> HttpResponse:
        token = set_source(_source(request))
        try:
            return await self.get_response(request)
        finally:
            reset_source(token)
