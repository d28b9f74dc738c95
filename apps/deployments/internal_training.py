"""The internal fine-tune endpoints: a training worker on another host, with no database
and no shared disk, runs a job through them (``workers/finetune/channel.py``).

Authenticated only by a worker credential (``Authorization: Bearer aibw_…``, as for
``/internal/v1/artifacts/``); they live here, beside the credentials, because the
deployments app is the one that knows workers and sits above ``apps.finetune``.

- ``POST /internal/v1/finetune/<job>/claim`` {"worker"}: take the queued job; 200 with
  its ``TrainingOrder``, 409 when it was cancelled or taken meanwhile.
- ``GET /internal/v1/finetune/<job>``: state, attempts, cancel flag, last applied
  progress entry.
- ``PUT /internal/v1/finetune/<job>/attempts/<n>/files/<name>``: one output file,
  streamed into the artifact store's staging folder and checked against the
  ``X-Content-SHA256`` header; only while attempt n is the running one.
- ``POST /internal/v1/finetune/<job>/attempts/<n>/finish``: how the attempt ended, the
  results and the sha256 of each uploaded file; a succeeded run's adapters are
  registered with their provenance (``runs.finetune_job_finish``), exactly as for a
  worker with the database.

The inputs (base model, dataset files) come from ``/internal/v1/artifacts/<sha256>``.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Any

from django.conf import settings
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.views.decorators.csrf import csrf_exempt

from apps.deployments.credentials import CredentialRejected, worker_credential_authenticate
from apps.finetune import runs
from apps.finetune.models import FineTuneJob, JobState
from apps.registry.artifacts import artifact_store
from workers.artifacts import TooLarge, file_sha256
from workers.finetune.channel import GGUF_ADAPTER, OUTPUT_FILES, PEFT_WEIGHTS

log = logging.getLogger(__name__)

CHUNK_BYTES = 1024 * 1024
SHA256 = re.compile(r"^[0-9a-f]{64}$")
ENDED = (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)
REASON_MAX_CHARS = 4000


def refusal(status: int, message: str) -> JsonResponse:
    """The answer a worker's line reports as the reason of its refusal."""
    response = JsonResponse({"detail": message}, status=status)
    if status == 401:
        response["WWW-Authenticate"] = 'Bearer realm="aibox-worker"'
    return response


def worker_endpoint(*methods: str) -> Callable:
    """A view for workers: the method checked, then the worker credential."""

    def decorate(view: Callable[..., HttpResponse]) -> Callable[..., HttpResponse]:
        @csrf_exempt
        @wraps(view)
        def wrapped(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
            if request.method not in methods:
                response = refusal(405, f"Use {' or '.join(methods)}.")
                response["Allow"] = ", ".join(methods)
                return response
            try:
                worker_credential_authenticate(
                    authorization=request.headers.get("Authorization", "")
                )
            except CredentialRejected as exc:
                return refusal(401, str(exc))
            return view(request, *args, **kwargs)

        return wrapped

    return decorate


def json_body(request: HttpRequest) -> dict[str, Any]:
    """The request's JSON object; BadRequest (its message the answer) for anything else."""
    try:
        body = json.loads(request.body or b"{}")
    except (ValueError, UnicodeDecodeError):
        raise BadRequest("The body must be a JSON object.") from None
    if not isinstance(body, dict):
        raise BadRequest("The body must be a JSON object.")
    return body


class BadRequest(Exception):
    """A worker's request that cannot be read; the message says what to send."""


def _staged_path(job_id: int, attempt: int, name: str) -> Path:
    return artifact_store().tmp / f"finetune-{job_id}-{attempt}-{name}"


def _current_attempt(job_id: int, attempt: int) -> JsonResponse | None:
    """None when attempt is the job's running one; else the refusal to send."""
    job = FineTuneJob.objects.filter(pk=job_id).only("state", "attempts").first()
    if job is None:
        return refusal(404, f"No fine-tune job {job_id}.")
    if job.state != JobState.RUNNING or job.attempts != attempt:
        return refusal(
            409,
            f"Attempt {attempt} of fine-tune job {job_id} is no longer running (the job is "
            f"{job.state}, attempt {job.attempts}); its results are not taken.",
        )
    return None


@worker_endpoint("POST")
def finetune_claim(request: HttpRequest, job_id: int) -> HttpResponse:
    try:
        worker = str(json_body(request).get("worker", "")).strip()[:200]
    except BadRequest as exc:
        return refusal(400, str(exc))
    if not worker:
        return refusal(400, 'Say which worker claims the job: {"worker": "<hostname>"}.')
    job = runs.finetune_job_claim(job_id=job_id, worker=worker)
    if job is None:
        return refusal(409, f"Fine-tune job {job_id} is not waiting to run.")
    job = FineTuneJob.objects.select_related(
        "base_model__repo", "dataset_version__dataset", "validation_version__dataset"
    ).get(pk=job.pk)
    return JsonResponse({"order": runs.training_order(job).as_dict()})


@worker_endpoint("GET")
def finetune_status(request: HttpRequest, job_id: int) -> HttpResponse:
    job = (
        FineTuneJob.objects.filter(pk=job_id)
        .values("state", "attempts", "cancel_requested", "stream_pos")
        .first()
    )
    if job is None:
        return refusal(404, f"No fine-tune job {job_id}.")
    return JsonResponse(job)


def declared_sha256(request: HttpRequest) -> str | None:
    """The ``X-Content-SHA256`` an upload declares, or None when it is not a sha256."""
    expected = request.headers.get("X-Content-SHA256", "").strip().lower()
    return expected if SHA256.match(expected) else None


NO_SHA256 = "Send the file's sha256 (64 hex digits) in X-Content-SHA256."


def receive_file(request: HttpRequest, name: str, expected: str, target: Path) -> JsonResponse:
    """Stream an uploaded output into the artifact store's staging folder, hashing it as
    it arrives; keep it at ``target`` only if it hashes to ``expected``."""
    try:
        staged = artifact_store().stage_chunks(
            iter(lambda: request.read(CHUNK_BYTES), b""), max_bytes=settings.UPLOAD_MAX_BYTES
        )
    except TooLarge as exc:
        return refusal(413, str(exc))
    if staged.sha256 != expected:
        staged.discard()
        return refusal(
            400,
            f"{name} arrived with the sha256 {staged.sha256[:12]}…, not {expected[:12]}…; "
            "send it again.",
        )
    os.replace(staged.path, target)
    return JsonResponse({"sha256": staged.sha256, "size": staged.size}, status=201)


@worker_endpoint("PUT")
def finetune_file(request: HttpRequest, job_id: int, attempt: int, name: str) -> HttpResponse:
    if name not in OUTPUT_FILES:
        return refusal(404, f"A run sends back {' and '.join(OUTPUT_FILES)}, not {name!r}.")
    expected = declared_sha256(request)
    if expected is None:
        return refusal(400, NO_SHA256)
    refused = _current_attempt(job_id, attempt)
    if refused is not None:
        return refused
    return receive_file(request, name, expected, _staged_path(job_id, attempt, name))


finetune_file.body_limit = "upload"  # aibox/limits.py: adapters can be gigabytes


@worker_endpoint("POST")
def finetune_finish(request: HttpRequest, job_id: int, attempt: int) -> HttpResponse:
    try:
        outcome = json_body(request)
    except BadRequest as exc:
        return refusal(400, str(exc))
    state = outcome.get("state")
    if state not in ENDED:
        return refusal(400, f"state must be one of {', '.join(ENDED)}, not {state!r}.")
    result = outcome.get("result") or {}
    if not isinstance(result, dict):
        return refusal(400, "result must be a JSON object.")
    refused = _current_attempt(job_id, attempt)
    if refused is not None:
        return refused
    paths = {name: _staged_path(job_id, attempt, name) for name in OUTPUT_FILES}
    try:
        outputs = None
        if state == JobState.SUCCEEDED:
            outputs = _adapter_files(outcome, paths)
            if isinstance(outputs, JsonResponse):
                return outputs
        job = runs.finetune_job_finish(
            job_id=job_id,
            attempt=attempt,
            state=JobState(state),
            reason=str(outcome.get("reason", ""))[:REASON_MAX_CHARS],
            result=result,
            outputs=outputs,
        )
    finally:
        for path in paths.values():  # moved into the store, or no longer wanted
            path.unlink(missing_ok=True)
    return JsonResponse({"state": job.state, "reason": job.reason})


def _adapter_files(outcome: dict[str, Any], paths: dict[str, Path]) -> Any:
    """The uploaded adapters, each checked against the sha256 the outcome names; or the
    refusal to send."""
    files = outcome.get("files")
    config = outcome.get("peft_config")
    if not isinstance(files, dict) or not isinstance(config, dict):
        return refusal(400, "A succeeded run names its files and sends its peft_config.")
    for name, path in paths.items():
        if not path.is_file():
            return refusal(400, f"Upload {name} before reporting the run as succeeded.")
        if file_sha256(path) != files.get(name):
            return refusal(400, f"The uploaded {name} is not the file the outcome names.")
    return runs.AdapterFiles(
        gguf=paths[GGUF_ADAPTER], safetensors=paths[PEFT_WEIGHTS], peft_config=config, staged=True
    )
