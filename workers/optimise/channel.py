"""An optimise worker's line to the control plane over HTTP, for a worker on another host
with no database credentials (``AIBOX_CONTROL_PLANE_URL``, ``AIBOX_WORKER_TOKEN``).

Every call goes to ``/internal/v1/optimise/<kind>/<id>/…`` (``kind`` is ``jobs`` for a
quantise or export job, ``evaluations`` for an evaluation;
``apps/deployments/internal_optimise.py``) and names the worker, which must be the one
that claimed the job:

- ``claim``: take a queued job; the answer is its order (``workers.optimise.order``), or
  None when it was taken or given up meanwhile;
- ``report``: progress, and the heartbeat that keeps the job from being reaped;
- ``send_output``: upload the new GGUF file (streamed, with its sha256);
- ``finish``: how the job ended; a quantise or export job names the uploaded file's
  sha256 and the control plane registers it, an evaluation sends its figures.

Retries while the control plane restarts are those of ``workers/control_plane.py``; a
report is tried once, as the next one follows within seconds.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from workers.control_plane import ControlPlaneClient, ControlPlaneError
from workers.optimise.order import EVALUATIONS, OUTPUT_FILE, EvaluationOrder, ModelJobOrder

log = logging.getLogger(__name__)

# Names the worker on an upload, whose body is the file.
WORKER_HEADER = "X-AIBox-Worker"


class RemoteChannel(ControlPlaneClient):
    def _job_url(self, kind: str, job_id: int, *parts: str) -> str:
        return "/".join([f"{self.url}/internal/v1/optimise/{kind}/{int(job_id)}", *parts])

    def _post(self, url: str, body: dict[str, Any], **kwargs: Any) -> Any:
        return self.request(
            "POST",
            url,
            content=json.dumps(body, default=str).encode(),
            headers={"Content-Type": "application/json"},
            **kwargs,
        )

    def claim(self, kind: str, job_id: int, worker: str) -> ModelJobOrder | EvaluationOrder | None:
        response = self._post(
            self._job_url(kind, job_id, "claim"), {"worker": worker}, ok=(200, 409)
        )
        if response.status_code == 409:
            return None
        order = response.json()["order"]
        if kind == EVALUATIONS:
            return EvaluationOrder.from_dict(order)
        return ModelJobOrder.from_dict(order)

    def report(
        self,
        kind: str,
        job_id: int,
        worker: str,
        percent: int | None = None,
        message: str = "",
    ) -> None:
        """Send progress (or, with no ``percent``, only the heartbeat). A report that does
        not get through is logged, not raised: the work goes on, and a job whose reports
        stay away is reaped as any silent job."""
        body: dict[str, Any] = {"worker": worker}
        if percent is not None:
            body |= {"percent": percent, "message": message}
        try:
            self._post(self._job_url(kind, job_id, "progress"), body, wait=0)
        except ControlPlaneError as exc:
            log.warning("%s %s: progress not reported (%s)", kind, job_id, exc)

    def send_output(self, job_id: int, worker: str, path: Path) -> str:
        """Upload the job's new GGUF file; returns its sha256."""
        url = self._job_url("jobs", job_id, "files", OUTPUT_FILE)
        return self.upload(url, path, headers={WORKER_HEADER: worker})

    def finish(self, kind: str, job_id: int, outcome: dict[str, Any]) -> dict[str, Any]:
        """Report the job's end: {"worker", "state", "reason", "result"} and "sha256" (the
        uploaded file's) or "figures"; the answer is the job's state after it was
        recorded ({"state", "reason"}: a registration that fails makes it "failed")."""
        return self._post(self._job_url(kind, job_id, "finish"), outcome).json()
