from __future__ import annotations

import ipaddress
from collections.abc import Callable

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


class AuditContextMiddleware:
    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        source = RequestSource(
            ip=client_ip(request),
            user_agent=request.META.get("HTTP_USER_AGENT", "")[:400],
        )
        token = set_source(source)
        try:
            return self.get_response(request)
        finally:
            reset_source(token)
