"""A training worker's line to the control plane over HTTP, for a worker on another host
with no database credentials (``AIBOX_CONTROL_PLANE_URL``, ``AIBOX_WORKER_TOKEN``).

Every call carries the worker's credential (``Authorization: Bearer aibw_…``) to
``/internal/v1/finetune/<job>/…`` (``apps/deployments/internal_training.py``):

- ``claim``: take a queued job; the answer is its ``TrainingOrder`` (or None when the
  job was cancelled or taken meanwhile);
- ``status``: the job's state, cancel flag and the last progress entry applied, for when
  Redis is away or lost its data;
- ``send_file``: upload one output file (streamed, with its sha256 in a header that the
  control plane checks);
- ``finish_attempt`` (``send_outcome`` uploads the files first): how the attempt ended,
  with the results and the sha256 of each uploaded file; the control plane registers
  the adapters in the registry.

Progress, heartbeats and the cancel flag still travel through Redis, as for any worker.
Retries and uploads are those of every worker's line (``workers/control_plane.py``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from workers.control_plane import ControlPlaneClient, ControlPlaneError
from workers.finetune.order import TrainingOrder
from workers.finetune.spec import FinetuneError, TrainResult

# The files a succeeded run sends back, by the names the control plane takes.
GGUF_ADAPTER = "adapter.gguf"
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_CONFIG = "adapter_config.json"  # sent inside the outcome, not as a file
OUTPUT_FILES = (GGUF_ADAPTER, PEFT_WEIGHTS)


class ChannelError(ControlPlaneError, FinetuneError):
    """The control plane refused a request, or could not be reached in time."""


class RemoteChannel(ControlPlaneClient):
    error = ChannelError

    def _job_url(self, job_id: int, *parts: str | int) -> str:
        return "/".join([f"{self.url}/internal/v1/finetune/{int(job_id)}", *map(str, parts)])

    def claim(self, job_id: int, worker: str) -> TrainingOrder | None:
        response = self.request(
            "POST", self._job_url(job_id, "claim"), json={"worker": worker}, ok=(200, 409)
        )
        if response.status_code == 409:
            return None
        return TrainingOrder.from_dict(response.json()["order"])

    def status(self, job_id: int) -> dict[str, Any]:
        """{"state", "attempts", "cancel_requested", "stream_pos"} of the job."""
        return self.request("GET", self._job_url(job_id)).json()

    def send_file(self, job_id: int, attempt: int, name: str, path: Path) -> str:
        """Upload ``path`` as the attempt's output ``name``; returns its sha256."""
        return self.upload(self._job_url(job_id, "attempts", attempt, "files", name), path)

    def finish_attempt(self, job_id: int, attempt: int, outcome: dict[str, Any]) -> dict[str, Any]:
        """Report the attempt's end: {"state", "reason", "result", "files", "peft_config"};
        the answer is the job's state after it was recorded ({"state", "reason"})."""
        return self.request(
            "POST",
            self._job_url(job_id, "attempts", attempt, "finish"),
            content=json.dumps(outcome, default=str).encode(),
            headers={"Content-Type": "application/json"},
        ).json()

    def send_outcome(
        self, order: TrainingOrder, state: str, reason: str, result: TrainResult | None
    ) -> str:
        """Upload a succeeded run's adapters, then report how the attempt ended; returns
        the state the control plane recorded (a registration that fails makes it
        "failed")."""
        outcome: dict[str, Any] = {
            "state": state,
            "reason": reason,
            "result": result.as_dict() if result is not None else {},
        }
        if state == "succeeded" and result is not None:
            if result.peft_dir is None or result.gguf_path is None:
                raise ChannelError("The run produced no adapter files.")
            outcome["files"] = {
                name: self.send_file(order.job_id, order.attempt, name, path)
                for name, path in (
                    (GGUF_ADAPTER, result.gguf_path),
                    (PEFT_WEIGHTS, result.peft_dir / PEFT_WEIGHTS),
                )
            }
            outcome["peft_config"] = json.loads((result.peft_dir / PEFT_CONFIG).read_text())
        return self.finish_attempt(order.job_id, order.attempt, outcome)["state"]
