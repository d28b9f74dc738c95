"""ASGI entry point: ``uvicorn aibox.asgi:application``."""

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "aibox.settings")

django_application = get_asgi_application()

from aibox.limits import BodySizeLimit  # noqa: E402 - needs settings configured

application = BodySizeLimit(django_application)
