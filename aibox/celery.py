"""The control plane's Celery app.

It runs the thin bridge tasks in ``apps/*/tasks.py``. The heavy work (inference,
training) lives in ``workers/``, which never imports Django.
"""

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "aibox.settings")

app = Celery("aibox")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()
