"""A worker's HTTP line to the control plane, for workers on another host with no
database credentials (``AIBOX_CONTROL_PLANE_URL``, ``AIBOX_WORKER_TOKEN``): what the
training line (``workers/finetune/channel.py``) and the optimise line
(``workers/optimise/channel.py``) share.

Every request carries the worker's credential (``Authorization: Bearer aibw_…``) to
``/internal/v1/…``. A control plane that is restarting (no connection, 502/503/504) is
tried again for up to ``wait`` seconds, so a job's end is not lost to a web server's
restart; any other refusal is raised at once with the control plane's reason. Files go
up streamed, with their sha256 in a header that the control plane checks.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

log = logging.getLogger(__name__)

CHUNK = 1024 * 1024
RETRY_STATUSES = (502, 503, 504)
RETRY_SECONDS = 2.0


class ControlPlaneError(Exception):
    """The control plane refused a request, or could not be reached in time."""


class ControlPlaneClient:
    # What a refusal raises; a line narrows it to the errors its jobs already report.
    error: type[Exception] = ControlPlaneError

    def __init__(self, url: str, token: str, *, timeout: float = 60.0, wait: float = 300.0):
        self.url = url.rstrip("/")
        self.token = token
        self.timeout = timeout
        self.wait = wait

    def __repr__(self) -> str:  # never print the token
        return f"{type(self).__name__}(url={self.url!r})"

    def upload(self, url: str, path: Path, *, headers: dict[str, str] | None = None) -> str:
        """PUT ``path`` to ``url``, streamed, with its sha256 in ``X-Content-SHA256``;
        returns the sha256. A retried upload sends the whole file again."""
        digest = hashlib.sha256()
        with path.open("rb") as fh:
            for chunk in iter(lambda: fh.read(CHUNK), b""):
                digest.update(chunk)
        sha256 = digest.hexdigest()

        def body() -> Iterator[bytes]:
            with path.open("rb") as fh:
                yield from iter(lambda: fh.read(CHUNK), b"")

        self.request(
            "PUT",
            url,
            content=body,
            headers={
                "Content-Type": "application/octet-stream",
                "Content-Length": str(path.stat().st_size),
                "X-Content-SHA256": sha256,
                **(headers or {}),
            },
            ok=(201,),
        )
        return sha256

    def request(
        self,
        method: str,
        url: str,
        *,
        ok: tuple[int, ...] = (200,),
        content: Any = None,
        wait: float | None = None,
        **kwargs: Any,
    ) -> httpx.Response:
        """Send one request, trying again while the control plane restarts (for ``wait``
        seconds, the line's own by default); a refusal raises ``self.error``."""
        wait = self.wait if wait is None else wait
        headers = {"Authorization": f"Bearer {self.token}", **kwargs.pop("headers", {})}
        deadline = time.monotonic() + wait
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
                    raise self.error(refusal(response))
                problem = f"the control plane answered {response.status_code}"
            if time.monotonic() >= deadline:
                raise self.error(
                    f"{method} {url.removeprefix(self.url)}: {problem}, for {wait:.0f} s."
                )
            log.warning("%s %s: %s; trying again", method, url, problem)
            time.sleep(RETRY_SECONDS)


def refusal(response: httpx.Response) -> str:
    """What the control plane said when it refused a request, for the job's reason."""
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
