"""ASGI entry point: ``uvicorn aibox.asgi:application``."""

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "aibox.settings")

application = get_asgi_application()
