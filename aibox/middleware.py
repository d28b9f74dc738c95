"""Django's security and common middleware for the async API handler, without threads.

Under ASGI, Django runs a classic middleware's ``process_request`` and
``process_response`` through ``sync_to_async``: two thread switches per middleware per
request. SecurityMiddleware and CommonMiddleware do no I/O in their hooks (headers,
host validation, redirects), so on /v1/ they run on the event loop instead.
"""

from __future__ import annotations

from django.http import HttpRequest, HttpResponse
from django.middleware import common, security


class InlineHooks:
    """Runs a MiddlewareMixin's hooks on the event loop; only for hooks that do no I/O."""

    async def __acall__(self, request: HttpRequest) -> HttpResponse:
        response = self.process_request(request)
        response = response or await self.get_response(request)
        return self.process_response(request, response)


class SecurityMiddleware(InlineHooks, security.SecurityMiddleware):
    pass


class CommonMiddleware(InlineHooks, common.CommonMiddleware):
    pass
