"""The internal optimise endpoints: a worker on another host, with no database and no
shared disk, runs quantise, export and evaluation jobs through them
(``workers/optimise/channel.py``).

Authenticated only by a worker credential, like the fine-tune endpoints
(``internal_training.py``), whose helpers they share. ``<kind>`` is ``jobs`` (quantise,
export) or ``evaluations``. Optimise jobs have no attempts: a report or an end is taken
only while the job runs on the worker that claimed it (its name in the body, or in
``X-AIBox-Worker`` for an upload), so a reaped job's worker coming back changes nothing.

- ``POST …/optimise/<kind>/<id>/claim`` {"worker"}: take the queued job; 200 with its
  order, 409 when it was taken or given up meanwhile.
- ``POST …/optimise/<kind>/<id>/progress`` {"worker", "percent", "message"}: progress,
  and the heartbeat that keeps the reaper (``runs.jobs_reap``) away; without "percent",
  only the heartbeat.
- ``PUT …/optimise/jobs/<id>/files/model.gguf``: the new GGUF file, streamed into the
  artifact store's staging folder and checked against ``X-Content-SHA256``.
- ``POST …/optimise/<kind>/<id>/finish`` {"worker", "state", "reason", "result"} with
  "sha256" (the uploaded file's) or "figures": how the job ended; the file is registered
  with its provenance, or the figures stored, exactly as for a worker with the database.

The inputs come from ``/internal/v1/artifacts/<sha256>``, which serves the datasets of
queued and running evaluations and importance matrices (``internal._artifact_for``).
"""

from __future__ import annotations

from functools import wraps
from pathlib import Path
from typing import Any

from django.http import HttpRequest, HttpResponse, JsonResponse

from apps.deployments.internal_training import (
    NO_SHA256,
    REASON_MAX_CHARS,
    BadRequest,
    declared_sha256,
    json_body,
    receive_file,
    refusal,
    worker_endpoint,
)
from apps.optimise import runs
from apps.optimise.models import Evaluation, Job, JobState, ModelJob
from apps.registry.artifacts import artifact_store
from workers.artifacts import file_sha256
from workers.optimise.channel import WORKER_HEADER
from workers.optimise.order import EVALUATIONS, FIGURES, JOBS, OUTPUT_FILE

MODELS: dict[str, type[Job]] = {JOBS: ModelJob, EVALUATIONS: Evaluation}
ENDED = (JobState.SUCCEEDED, JobState.FAILED)


class _Refused(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _model(kind: str) -> type[Job]:
    model = MODELS.get(kind)
    if model is None:
        raise _Refused(404, f"Optimise work is {JOBS} or {EVALUATIONS}, not {kind!r}.")
    return model


def _label(model: type[Job], job_id: int) -> str:
    return f"{'evaluation' if model is Evaluation else 'optimise job'} {job_id}"


def _worker(body: dict[str, Any]) -> str:
    worker = str(body.get("worker", "")).strip()[:200]
    if not worker:
        raise BadRequest('Say which worker sends this: {"worker": "<hostname>"}.')
    return worker


def _running_on(model: type[Job], job_id: int, worker: str) -> None:
    """Refuse (_Refused) unless the job runs on ``worker``."""
    job = model.objects.filter(pk=job_id).only("state", "worker").first()
    if job is None:
        raise _Refused(404, f"No {_label(model, job_id)}.")
    if job.state != JobState.RUNNING or job.worker != worker:
        where = f" on {job.worker}" if job.worker else ""
        raise _Refused(
            409,
            f"The {_label(model, job_id)} is not running on {worker} (it is {job.state}"
            f"{where}); what it sends is not taken.",
        )


def _staged_path(job_id: int) -> Path:
    return artifact_store().tmp / f"optimise-upload-{job_id}.gguf"


def _answer(view):
    """Turn the refusals raised while reading a request into their answers."""

    @wraps(view)
    def wrapped(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        try:
            return view(request, *args, **kwargs)
        except BadRequest as exc:
            return refusal(400, str(exc))
        except _Refused as exc:
            return refusal(exc.status, str(exc))

    return wrapped


@worker_endpoint("POST")
@_answer
def optimise_claim(request: HttpRequest, kind: str, job_id: int) -> HttpResponse:
    model = _model(kind)
    worker = _worker(json_body(request))
    if model is Evaluation:
        order = runs.evaluation_claim(evaluation_id=job_id, worker=worker)
    else:
        order = runs.model_job_claim(job_id=job_id, worker=worker)
    if order is None:
        raise _Refused(409, f"The {_label(model, job_id)} is not waiting to run.")
    return JsonResponse({"order": order.as_dict()})


@worker_endpoint("POST")
@_answer
def optimise_progress(request: HttpRequest, kind: str, job_id: int) -> HttpResponse:
    model = _model(kind)
    body = json_body(request)
    worker = _worker(body)
    percent = body.get("percent")
    if percent is not None and (isinstance(percent, bool) or not isinstance(percent, int)):
        raise BadRequest("percent must be a whole number from 0 to 100.")
    _running_on(model, job_id, worker)
    runs.job_report(
        model=model,
        pk=job_id,
        worker=worker,
        percent=percent,
        message=str(body.get("message", "")),
    )
    return JsonResponse({"state": JobState.RUNNING})


@worker_endpoint("PUT")
@_answer
def optimise_file(request: HttpRequest, job_id: int, name: str) -> HttpResponse:
    if name != OUTPUT_FILE:
        raise _Refused(404, f"A quantise or export job sends back {OUTPUT_FILE}, not {name!r}.")
    expected = declared_sha256(request)
    if expected is None:
        raise BadRequest(NO_SHA256)
    worker = _worker({"worker": request.headers.get(WORKER_HEADER, "")})
    _running_on(ModelJob, job_id, worker)
    return receive_file(request, name, expected, _staged_path(job_id))


optimise_file.body_limit = "upload"  # aibox/limits.py: a quantised 70B is tens of GB


@worker_endpoint("POST")
@_answer
def optimise_finish(request: HttpRequest, kind: str, job_id: int) -> HttpResponse:
    model = _model(kind)
    outcome = json_body(request)
    worker = _worker(outcome)
    state = outcome.get("state")
    if state not in ENDED:
        raise BadRequest(f"state must be one of {', '.join(ENDED)}, not {state!r}.")
    result = outcome.get("result") or {}
    if not isinstance(result, dict):
        raise BadRequest("result must be a JSON object.")
    reason = str(outcome.get("reason", ""))[:REASON_MAX_CHARS]
    if state == JobState.FAILED and not reason:
        raise BadRequest("Say why the job failed (reason).")
    _running_on(model, job_id, worker)
    if model is Evaluation:
        figures = _figures(outcome) if state == JobState.SUCCEEDED else {}
        job = runs.evaluation_finish(
            evaluation_id=job_id, worker=worker, reason=reason, figures=figures, result=result
        )
        return JsonResponse({"state": job.state, "reason": job.reason})
    path = _staged_path(job_id)
    try:
        output = None
        if state == JobState.SUCCEEDED:
            if not path.is_file():
                raise BadRequest(f"Upload {OUTPUT_FILE} before reporting the job as succeeded.")
            if file_sha256(path) != outcome.get("sha256"):
                raise BadRequest(f"The uploaded {OUTPUT_FILE} is not the file the outcome names.")
            output = path
        job = runs.model_job_finish(
            job_id=job_id, worker=worker, reason=reason, result=result, output=output
        )
    finally:
        path.unlink(missing_ok=True)  # moved into the store, or no longer wanted
    return JsonResponse({"state": job.state, "reason": job.reason})


def _figures(outcome: dict[str, Any]) -> dict[str, float | None]:
    figures = outcome.get("figures")
    if not isinstance(figures, dict):
        raise BadRequest("A succeeded evaluation sends its figures (a JSON object).")
    unknown = sorted(set(figures) - set(FIGURES))
    if unknown:
        raise BadRequest(f"Unknown figures {', '.join(unknown)}; send only {', '.join(FIGURES)}.")
    for name, value in figures.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
            raise BadRequest(f"{name} must be a number or null, not {value!r}.")
    return figures
