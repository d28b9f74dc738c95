"""The internal artifact endpoint: workers on other hosts pull model files here (and
training workers the dataset files of the fine-tunes, evaluations and importance
matrices they run).

``GET``/``HEAD /internal/v1/artifacts/<sha256>``, authenticated only by a worker
credential (``Authorization: Bearer aibw_…``, ``credentials.py``): not a session, not an
API key. It serves only files of registered model versions that are in the store and
not marked as failing verification, streamed from disk in chunks (a 20 GB model never
sits in memory), with ``Range`` for a worker resuming a dropped transfer.

One ``artifact.pulled`` audit event per transfer that starts at byte 0 (a full GET or a
first range); resumed ranges and HEADs write none, so a resumed pull is one event.

It runs on the API's ASGI handler (``aibox/asgi.py``: no sessions or CSRF) and streams
with an async iterator: Django would read a sync iterator into memory under ASGI.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from asgiref.sync import sync_to_async
from django.db.models import Q
from django.http import HttpRequest, HttpResponse, JsonResponse, StreamingHttpResponse
from django.views.decorators.csrf import csrf_exempt

from apps.datasets.models import DatasetVersion
from apps.deployments.credentials import (
    CredentialRejected,
    artifact_pull_record,
    worker_credential_authenticate,
)
from apps.deployments.models import WorkerCredential
from apps.finetune.models import FineTuneJob, JobState
from apps.optimise.models import ACTIVE_STATES as OPTIMISE_ACTIVE
from apps.optimise.models import Evaluation, ModelJob
from apps.registry.artifacts import artifact_store
from apps.registry.models import ModelVersion

CHUNK_BYTES = 1024 * 1024
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


@dataclass(frozen=True)
class _Artifact:
    sha256: str
    path: Path
    size: int


class _Refused(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _artifact_for(sha256: str) -> _Artifact:
    if not _SHA256.match(sha256):
        raise _Refused(404, "No such artifact.")
    version = ModelVersion.objects.select_related("artifact").filter(artifact_id=sha256).first()
    if version is None:
        version = _training_data(sha256)
    if version is None:
        raise _Refused(
            404,
            f"No registered model version, nor dataset of a waiting or running fine-tune, "
            f"evaluation or quantisation, has the sha256 {sha256}.",
        )
    if version.artifact.integrity_failed_at is not None:
        raise _Refused(404, f"The artifact {sha256[:12]}… failed verification; it is not served.")
    path = artifact_store().path_for(sha256)
    try:
        size = path.stat().st_size
    except OSError:
        raise _Refused(404, f"The artifact {sha256[:12]}… is missing from the store.") from None
    return _Artifact(sha256=sha256, path=path, size=size)


def _training_data(sha256: str) -> DatasetVersion | None:
    """A dataset version that a queued or running fine-tune trains or validates on, that a
    queued or running evaluation measures on, or whose text weighs a queued or running
    quantisation (its importance matrix): a training worker pulls those, and no other
    dataset."""
    wanted = (
        FineTuneJob.objects.filter(state__in=(JobState.QUEUED, JobState.RUNNING))
        .filter(Q(dataset_version__artifact_id=sha256) | Q(validation_version__artifact_id=sha256))
        .exists()
        or Evaluation.objects.filter(
            state__in=OPTIMISE_ACTIVE, dataset_version__artifact_id=sha256
        ).exists()
        or ModelJob.objects.filter(
            state__in=OPTIMISE_ACTIVE, imatrix_dataset__artifact_id=sha256
        ).exists()
    )
    if not wanted:
        return None
    return DatasetVersion.objects.select_related("artifact").filter(artifact_id=sha256).first()


def _authorise(authorization: str, sha256: str) -> tuple[WorkerCredential, _Artifact]:
    try:
        credential = worker_credential_authenticate(authorization=authorization)
    except CredentialRejected as exc:
        raise _Refused(401, str(exc)) from exc
    return credential, _artifact_for(sha256)


def _byte_range(header: str, size: int) -> tuple[int, int] | None:
    """(first, last) for ``bytes=N-``, ``bytes=N-M`` or ``bytes=-N``; None to serve the
    whole file (no header, or a form not supported here, such as several ranges)."""
    match = _RANGE.match(header.strip())
    if not header or match is None or match.groups() == ("", ""):
        return None
    first, last = match.groups()
    if first == "":  # the last N bytes
        return max(size - int(last), 0), size - 1
    last_byte = min(int(last), size - 1) if last else size - 1
    return int(first), last_byte


async def _file_chunks(path: Path, offset: int, length: int) -> AsyncIterator[bytes]:
    handle = await asyncio.to_thread(path.open, "rb")
    try:
        await asyncio.to_thread(handle.seek, offset)
        remaining = length
        while remaining > 0:
            chunk = await asyncio.to_thread(handle.read, min(CHUNK_BYTES, remaining))
            if not chunk:  # the file shrank under us: end short, the client sees it
                break
            remaining -= len(chunk)
            yield chunk
    finally:
        handle.close()


def _refusal(status: int, message: str) -> JsonResponse:
    response = JsonResponse({"detail": message}, status=status)
    if status == 401:
        response["WWW-Authenticate"] = 'Bearer realm="aibox-worker"'
    return response


@csrf_exempt
async def artifact_pull(request: HttpRequest, sha256: str) -> HttpResponse:
    """Stream one artifact to a worker holding a valid credential."""
    if request.method not in ("GET", "HEAD"):
        response = _refusal(405, "Use GET or HEAD.")
        response["Allow"] = "GET, HEAD"
        return response
    try:
        credential, artifact = await sync_to_async(_authorise)(
            request.headers.get("Authorization", ""), sha256
        )
    except _Refused as exc:
        return _refusal(exc.status, str(exc))
    size = artifact.size
    headers = {
        "Accept-Ranges": "bytes",
        "X-Content-SHA256": artifact.sha256,
        "Content-Type": "application/octet-stream",
        "Cache-Control": "no-store",
    }
    byte_range = _byte_range(request.headers.get("Range", ""), size)
    status, first, last = 200, 0, size - 1
    if byte_range is not None:
        first, last = byte_range
        if first >= size or first > last:
            response = _refusal(416, f"The range is outside the file ({size} bytes).")
            response["Content-Range"] = f"bytes */{size}"
            return response
        status = 206
        headers["Content-Range"] = f"bytes {first}-{last}/{size}"
    length = last - first + 1 if size else 0
    headers["Content-Length"] = str(length)
    if request.method == "HEAD":
        response = HttpResponse(status=status)
        for name, value in headers.items():
            response[name] = value
        return response
    if first == 0:
        await sync_to_async(artifact_pull_record)(
            credential=credential, sha256=artifact.sha256, length=length
        )
    response = StreamingHttpResponse(
        _file_chunks(artifact.path, first, length), status=status, headers=headers
    )
    return response
