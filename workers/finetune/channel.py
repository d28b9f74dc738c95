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
A control plane that is restarting (no connection, 502/503/504) is tried again for up to
``wait`` seconds: a run's end is not lost to a web server's restart.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from workers.finetune.order import TrainingOrder
from workers.finetune.spec import FinetuneError, TrainResult

log = logging.getLogger(__name__)

CHUNK = 1024 * 1024
RETRY_STATUSES = (502, 503, 504)
RETRY_SECONDS = 2.0
# The files a succeeded run sends back, by the names the control plane takes.
GGUF_ADAPTER = "adapter.gguf"
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_CONFIG = "adapter_config.json"  # sent inside the outcome, not as a file
OUTPUT_FILES = (GGUF_ADAPTER, PEFT_WEIGHTS)


class ChannelError(FinetuneError):
    """The control plane refused a request, or could not be reached in time."""


class RemoteChannel:
    def __init__(self, url: str, token: str, *, timeout: float = 60.0, wait: float = 300.0):
        self.url = url.rstrip("/")
        self.token = token
        self.timeout = timeout
        self.wait = wait

    def __repr__(self) -> str:  # never print the token
        return f"RemoteChannel(url={self.url!r})"

    def _job_url(self, job_id: int, *parts: str | int) -> str:
        return "/".join([f"{self.url}/internal/v1/finetune/{int(job_id)}", *map(str, parts)])

    def claim(self, job_id: int, worker: str) -> TrainingOrder | None:
        response = self._request(
            "POST", self._job_url(job_id, "claim"), json={"worker": worker}, ok=(200, 409)
        )
        if response.status_code == 409:
            return None
        return TrainingOrder.from_dict(response.json()["order"])

    def status(self, job_id: int) -> dict[str, Any]:
        """{"state", "attempts", "cancel_requested", "stream_pos"} of the job."""
        return self._request("GET", self._job_url(job_id)).json()

    def send_file(self, job_id: int, attempt: int, name: str, path: Path) -> str:
        """Upload ``path`` as the attempt's output ``name``; returns its sha256."""
        digest = hashlib.sha256()
        with path.open("rb") as fh:
            for chunk in iter(lambda: fh.read(CHUNK), b""):
                digest.update(chunk)
        sha256 = digest.hexdigest()

        def body() -> Iterator[bytes]:
            with path.open("rb") as fh:
                yield from iter(lambda: fh.read(CHUNK), b"")

        self._request(
            "PUT",
            self._job_url(job_id, "attempts", attempt, "files", name),
            content=body,
            headers={
                "Content-Type": "application/octet-stream",
                "Content-Length": str(path.stat().st_size),
                "X-Content-SHA256": sha256,
            },
            ok=(201,),
        )
        return sha256

    def finish_attempt(self, job_id: int, attempt: int, outcome: dict[str, Any]) -> dict[str, Any]:
        """Report the attempt's end: {"state", "reason", "result", "files", "peft_config"};
        the answer is the job's state after it was recorded ({"state", "reason"})."""
        return self._request(
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

    def _request(
        self,
        method: str,
        url: str,
        *,
        ok: tuple[int, ...] = (200,),
        content: Any = None,
        **kwargs: Any,
    ) -> httpx.Response:
        headers = {"Authorization": f"Bearer {self.token}", **kwargs.pop("headers", {})}
        deadline = time.monotonic() + self.wait
        while True:
            try:
                # A callable body is a fresh stream per try (a retried upload starts over).
                body = content() if callable(content) else content
                with httpx.Client(timeout=httpx.Timeout(self.timeout, connect=10.0)) as client:
                    response = client.request(method, url, headers=headers, content=body, **kwargs)
            except httpx.TransportError as exc:
                problem = f"could not reach the control plane at {self.url} ({exc})"
            else:
                if response.status_code in ok:
                    return response
                if response.status_code not in RETRY_STATUSES:
                    raise ChannelError(_refusal(response))
                problem = f"the control plane answered {response.status_code}"
            if time.monotonic() >= deadline:
                raise ChannelError(
                    f"{method} {url.removeprefix(self.url)}: {problem}, for {self.wait:.0f} s."
                )
            log.warning("%s %s: %s; trying again", method, url, problem)
            time.sleep(RETRY_SECONDS)


def _refusal(response: httpx.Response) -> str:
    try:
        detail = response.json().get("detail", "")
    except ValueError:
        detail = response.text[:500]
    if response.status_code == 401:
        return (
            "The control plane refused this worker's credential (AIBOX_WORKER_TOKEN): "
            f"{detail or 'unauthorised'}"
        )
    return f"The control plane answered {response.status_code}: {detail or response.reason_phrase}"
