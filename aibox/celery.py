"""The control plane's Celery app.

It runs the thin bridge tasks in ``apps/*/tasks.py``. The heavy work (inference,
training) lives in ``workers/``, which never imports Django. The tasks a serving worker
runs (``WORKER_TASKS``) are imported only when a worker starts: the control plane sends
them by name, so the web process never loads llama.cpp.
"""

import os

from celery import Celery, bootsteps

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "aibox.settings")

WORKER_TASKS = ["apps.deployments.worker_tasks", "apps.setups.worker_tasks"]

app = Celery("aibox", include=WORKER_TASKS)
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()


class InferenceRuntime(bootsteps.StartStopStep):
    """Gives each worker process its inference runtime and heartbeat.

    Models stay resident in the worker process, so only pools that run tasks in that
    process (threads, solo) can serve; a prefork worker still sends heartbeats but is
    never chosen to hold a deployment.
    """

    requires = {"celery.worker.components:Pool"}

    def start(self, worker) -> None:
        from django.conf import settings

        from workers.inference import runtime
        from workers.inference.cache import RemoteSource

        pool = getattr(worker.pool_cls, "__module__", str(worker.pool_cls)).rsplit(".", 1)[-1]
        # A training worker (AIBOX_WORKER_SERVING=false) never holds a deployment.
        serving = pool in ("thread", "solo") and settings.WORKER_SERVING
        if serving:
            # A worker on another host pulls artifacts over HTTP with its credential.
            remote = (
                RemoteSource(settings.CONTROL_PLANE_URL, settings.WORKER_TOKEN)
                if settings.CONTROL_PLANE_URL and settings.WORKER_TOKEN
                else None
            )
            runtime.configure(
                settings.REDIS_URL,
                settings.MODEL_CACHE_DIR,
                remote=remote,
                cache_max_bytes=settings.MODEL_CACHE_MAX_BYTES,
            )
        self.heartbeat = runtime.Heartbeat(
            settings.REDIS_URL,
            worker.hostname,
            pool=pool,
            serving=serving,
            labels=settings.WORKER_LABELS,
        )
        self.heartbeat.start()
        if serving:
            runtime.runtime().on_change = self.heartbeat.beat
        # Reload what this worker held before a restart, place deployments that wait.
        app.send_task("deployments.worker_online", args=[worker.hostname])

    def stop(self, worker) -> None:
        from workers.inference import runtime

        heartbeat = getattr(self, "heartbeat", None)
        if heartbeat is not None:
            heartbeat.stop()
        runtime.shutdown()


app.steps["worker"].add(InferenceRuntime)
