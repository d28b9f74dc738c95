from __future__ import annotations

import ipaddress
from collections.abc import Callable

from asgiref.sync import iscoroutinefunction, markcoroutinefunction
from django.conf import settings
from django.http import HttpRequest, HttpResponse

from apps.audit.context import RequestSource, reset_source, set_source


def client_ip(request: HttpRequest) -> str | None:
    """The client's address: REMOTE_ADDR, or, behind trusted proxies, the address the
    outermost of them saw.

    Each proxy appends the address it received the request from to X-Forwarded-For, so
    only the last ``TRUSTED_PROXY_COUNT`` entries were written by our proxies; anything to
    their left came from the client and may be forged. A header with fewer entries did not
    pass through all of them: the connection's own address is used.
    """
    candidate = request.META.get("REMOTE_ADDR", "")
    if settings.TRUST_X_FORWARDED_FOR:
        hops = [h.strip() for h in request.META.get("HTTP_X_FORWARDED_FOR", "").split(",")]
        hops = [h for h in hops if h]
        if len(hops) >= settings.TRUSTED_PROXY_COUNT:
            candidate = hops[-settings.TRUSTED_PROXY_COUNT]
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
