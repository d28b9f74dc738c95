"""ASGI entry point: ``uvicorn aibox.asgi:application``.

Two Django handlers share the process: the OpenAI-compatible API under /v1/ runs with
``API_MIDDLEWARE`` (settings.py), everything else with the site's ``MIDDLEWARE``.
Each of Django's classic middleware costs an async view two thread switches per
request; the site's list made that about 30 switches, 2.5 ms of every API call
(measured in process: 5.1 ms against 2.6 ms for a 401 from /v1/models). Bearer-key
calls need no sessions, CSRF, messages or login lockout, nor do workers pulling
artifacts from /internal/ with their credentials.
"""

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "aibox.settings")

site_application = get_asgi_application()

from django.conf import settings  # noqa: E402 - configured by get_asgi_application
from django.core.handlers.asgi import ASGIHandler  # noqa: E402

from aibox.limits import BodySizeLimit  # noqa: E402


class _ApiHandler(ASGIHandler):
    # Streamed bodies go to the server in 1 MiB messages, not Django's 64 KiB: a worker
    # pulling a model file (/internal/) costs the event loop a sixteenth of the sends.
    chunk_size = 2**20


def _api_handler() -> ASGIHandler:
    # A handler reads settings.MIDDLEWARE once, when it is built.
    site_middleware = settings.MIDDLEWARE
    settings.MIDDLEWARE = settings.API_MIDDLEWARE
    try:
        return _ApiHandler()
    finally:
        settings.MIDDLEWARE = site_middleware


api_application = _api_handler()


async def _route(scope, receive, send) -> None:
    # Workers pulling artifacts (/internal/) present a bearer credential too.
    if scope["type"] == "http" and scope["path"].startswith(("/v1/", "/internal/")):
        await api_application(scope, receive, send)
    else:
        await site_application(scope, receive, send)


application = BodySizeLimit(_route)
