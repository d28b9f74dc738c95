"""Optimisation jobs as a training worker runs them: claim the job, keep its heartbeat,
run the ``workers.optimise`` function on verified files, and end it. A quantise or export
job adds a draft version to the registry with its provenance; an evaluation stores its
figures; every outcome is audited. Beat fails jobs whose worker went silent.

The requests that create these jobs are checked in ``services``. The ``workers.optimise``
functions are imported inside the functions that call them: they load torch and
llama.cpp, which the control-plane processes that import this module never need.

Over 400 lines on purpose: quantise, export and evaluation share one frame (claim,
heartbeat, work directory, finish), which reads best next to its three users.
"""

from __future__ import annotations

import logging
import shutil
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

from django.core.exceptions import ValidationError
from django.db import transaction
from django.utils import timezone

from apps.accounts.services import system_user
from apps.audit.models import Outcome
from apps.audit.services import audit_record
from apps.datasets.services import dataset_version_canonical
from apps.optimise.models import (
    Evaluation,
    Job,
    JobState,
    ModelJob,
    Operation,
)
from apps.registry.artifacts import artifact_store
from apps.registry.models import ModelRepo, ModelVersion, SourceKind
from apps.registry.services import (
    model_repo_create,
    model_version_ingest,
    model_version_verify,
)

log = logging.getLogger(__name__)

# A running job touches its heartbeat this often; beat fails one silent for SILENT_AFTER.
HEARTBEAT_SECONDS = 15
SILENT_AFTER = timedelta(minutes=3)


def _claim(model: type[Job], pk: int, worker: str) -> bool:
    now = timezone.now()
    return bool(
        model.objects.filter(pk=pk, state=JobState.QUEUED).update(
            state=JobState.RUNNING, worker=worker, started_at=now, heartbeat_at=now
        )
    )


@contextmanager
def _heartbeat(model: type[Job], pk: int) -> Iterator[None]:
    """Touch the job's heartbeat while the work runs (native calls give no callbacks)."""
    from django.db import connection

    stop = threading.Event()

    def beat() -> None:
        try:
            while not stop.wait(HEARTBEAT_SECONDS):
                model.objects.filter(pk=pk, state=JobState.RUNNING).update(
                    heartbeat_at=timezone.now()
                )
        finally:
            connection.close()  # this thread's own connection

    thread = threading.Thread(target=beat, name=f"heartbeat-{pk}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=HEARTBEAT_SECONDS + 5)


def _progress_writer(model: type[Job], pk: int) -> Callable[[int, int, str], None]:
    """A progress callback that writes at most once a second (and always the end)."""
    last = {"at": 0.0}

    def write(done: int, total: int, message: str) -> None:
        now = timezone.now().timestamp()
        if done < total and now - last["at"] < 1.0:
            return
        last["at"] = now
        percent = min(100, done * 100 // total) if total else 0
        model.objects.filter(pk=pk, state=JobState.RUNNING).update(
            progress=percent, progress_message=message[:300], heartbeat_at=timezone.now()
        )

    return write


def _finish(job: Job, *, state: JobState, reason: str = "", action: str, details: dict) -> None:
    model = type(job)
    updated = model.objects.filter(pk=job.pk, state=JobState.RUNNING).update(
        state=state,
        reason=reason,
        finished_at=timezone.now(),
        progress=100 if state == JobState.SUCCEEDED else job.progress,
    )
    if not updated:  # reaped while it ran: what it reports now changes nothing
        log.warning("%s ended after it was given up", job)
        return
    audit_record(
        actor=system_user(),
        action=action,
        target=job,
        outcome=Outcome.SUCCESS if state == JobState.SUCCEEDED else Outcome.FAILURE,
        details={"reason": reason, **details},
    )


def _work_dir(kind: str, pk: int) -> Path:
    # Inside the artifact store's tmp/, so a finished file is staged by a rename.
    path = artifact_store().tmp / f"optimise-{kind}-{pk}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _failure(exc: BaseException) -> str:
    if isinstance(exc, ValidationError):
        return " ".join(exc.messages)
    known = (
        "QuantizeError",
        "MergeError",
        "EvaluationError",
        "ImatrixError",
        "IntegrityError",
        "DataError",
    )
    if type(exc).__name__ in known:
        return str(exc)
    return f"The job failed unexpectedly ({type(exc).__name__}: {exc}); see the worker log."


def _run(job: Job, *, action: str, work: Callable[[Path], tuple[dict, dict]]) -> None:
    """Do a claimed job's ``work`` in a folder of its own, with a heartbeat while it runs.

    ``work`` returns the fields to save on the job and the details of its audit event;
    the job then ends succeeded, or failed with the reason if ``work`` raised.
    """
    model = type(job)
    folder = _work_dir(model._meta.model_name, job.pk)
    try:
        with _heartbeat(model, job.pk):
            fields, details = work(folder)
    except Exception as exc:
        log.exception("%s failed", job)
        _finish(
            job, state=JobState.FAILED, reason=_failure(exc), action=f"{action}.failed", details={}
        )
        return
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    with transaction.atomic():
        model.objects.filter(pk=job.pk).update(**fields)
        _finish(job, state=JobState.SUCCEEDED, action=f"{action}.succeeded", details=details)


def model_job_run(*, job_id: int, worker: str) -> ModelJob | None:
    """Run a quantise or export job on this worker and register what it made."""
    if not _claim(ModelJob, job_id, worker):
        return None  # another delivery has it, or it was reaped
    job = ModelJob.objects.select_related(
        "source__repo", "adapter__repo", "finetune_job", "imatrix_dataset__dataset"
    ).get(pk=job_id)

    def work(folder: Path) -> tuple[dict, dict]:
        output, result = _make_file(job, folder)
        version = _register(job, output, result)
        audited = {"output_version": version.pk, "sha256": version.sha256, **result}
        return {"output_version": version, "result": result}, audited

    _run(job, action=f"optimise.{job.operation}", work=work)
    return ModelJob.objects.get(pk=job_id)


def _make_file(job: ModelJob, work: Path) -> tuple[Path, dict[str, Any]]:
    from workers.optimise.quantize import llama_cpp_build, quantize

    progress = _progress_writer(ModelJob, job.pk)
    actor = system_user()
    source_path = model_version_verify(actor=actor, version=job.source)
    out = work / "model.gguf"
    imatrix = None
    if job.operation == Operation.QUANTIZE:
        if job.imatrix_dataset is not None:
            imatrix = _importance(job, source_path, work, progress)
            reading = progress

            def progress(done: int, total: int, message: str) -> None:
                reading(total + done, 2 * total, message)  # the bar's second half

        done = quantize(
            source_path,
            out,
            quant_type=job.params["quant_type"],
            source_file_type=job.source.quantization,
            parameter_count=job.source.parameter_count or 0,
            allow_requantize=job.params.get("allow_requantize", False),
            imatrix=imatrix.matrix if imatrix else None,
            progress=progress,
        )
    else:
        from workers.optimise.merge import export_model

        adapter_path = (
            model_version_verify(actor=actor, version=job.adapter) if job.adapter else None
        )
        done = export_model(
            source_path,
            out,
            adapter_path=adapter_path,
            adapter_scale=job.params.get("adapter_scale") or 1.0,
            out_type=job.params["out_type"],
            progress=progress,
        )
    result = {**done.as_dict(), "llama_cpp": llama_cpp_build()}
    result.pop("out_path", None)
    if imatrix is not None:
        result["imatrix"] = imatrix.summary()
    return out, result


def _importance(job: ModelJob, source_path: Path, work: Path, progress):
    """The importance matrix of the job's source on its text (the first half of the bar)."""
    from workers.finetune.data import read_rows
    from workers.optimise.evaluate import text_of
    from workers.optimise.imatrix import compute_imatrix

    rows = dataset_version_canonical(job.imatrix_dataset, work, name="imatrix")
    return compute_imatrix(
        source_path,
        text_of(row for _, row in read_rows(rows)),
        n_ctx=job.params["imatrix_n_ctx"],
        max_chunks=job.params["imatrix_chunks"],
        progress=lambda done, total, message: progress(done, 2 * total, message),
    )


def _register(job: ModelJob, output: Path, result: dict[str, Any]) -> ModelVersion:
    actor = job.created_by or system_user()
    repo = ModelRepo.objects.filter(name=job.output_repo).first()
    source = job.adapter or job.source
    if repo is None:
        repo = model_repo_create(
            actor=actor,
            name=job.output_repo,
            licence=source.repo.licence,
            description=f"Made by AIBox from {job.source}"
            + (f" with {job.adapter} merged in." if job.adapter else "."),
            tags=[job.source.architecture, str(job.operation)],
        )
    provenance = provenance_of(job, result)
    staged_path = artifact_store().tmp / f"optimise-out-{job.pk}.gguf"
    output.rename(staged_path)
    staged = artifact_store().stage_in_place(staged_path)
    label = (
        job.params["quant_type"].lower()
        if job.operation == Operation.QUANTIZE
        else ("merged-" if job.adapter else "") + job.params["out_type"]
    )
    stem = Path(job.source.file_name).stem
    return model_version_ingest(
        actor=actor,
        repo=repo,
        staged=staged,
        file_name=f"{stem}-{label}.gguf"[:255],
        source_kind=SourceKind.QUANTIZED
        if job.operation == Operation.QUANTIZE
        else SourceKind.EXPORTED,
        source=provenance,
        parents=[v for v in (job.source, job.adapter) if v is not None],
    ).version


def provenance_of(job: ModelJob, result: dict[str, Any]) -> dict[str, Any]:
    """What a new version records about how it was made."""
    data: dict[str, Any] = {
        "optimise_job": job.pk,
        "operation": job.operation,
        "source_version": job.source.pk,
        "source_sha256": job.source.sha256,
        "source_quantization": job.source.quantization,
        "params": job.params,
        "llama_cpp": result.get("llama_cpp", {}).get("llama_cpp_python"),
        "seconds": result.get("seconds"),
    }
    if job.operation == Operation.QUANTIZE:
        data["requantized"] = bool(result.get("requantized"))
    if job.imatrix_dataset is not None:
        d = job.imatrix_dataset
        data["imatrix"] = {
            "dataset_version": d.pk,
            "dataset": d.dataset.name,
            "number": d.number,
            "sha256": d.sha256,
            **result.get("imatrix", {}),
        }
    if job.adapter is not None:
        data["adapter_version"] = job.adapter.pk
        data["adapter_sha256"] = job.adapter.sha256
    ft = job.finetune_job
    if ft is not None:
        data["finetune_job"] = ft.pk
        # Not "dataset_versions": the adapter's own fine-tune already links those.
        data["trained_on"] = [
            {"id": d.pk, "dataset": d.dataset.name, "number": d.number, "sha256": d.sha256}
            for d in (ft.dataset_version, ft.validation_version)
            if d is not None
        ]
    return data


def evaluation_run(*, evaluation_id: int, worker: str) -> Evaluation | None:
    """Run an evaluation on this worker and store its figures."""
    if not _claim(Evaluation, evaluation_id, worker):
        return None
    evaluation = Evaluation.objects.select_related(
        "model_version", "adapter", "reference", "dataset_version__dataset"
    ).get(pk=evaluation_id)

    def work(folder: Path) -> tuple[dict, dict]:
        figures, result = _evaluate(evaluation, folder)
        return {"result": result, **figures}, {
            "dataset_sha256": evaluation.dataset_sha256,
            **figures,
        }

    _run(evaluation, action="optimise.evaluation", work=work)
    return Evaluation.objects.get(pk=evaluation_id)


def _evaluate(evaluation: Evaluation, work: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    from workers.finetune.data import read_rows
    from workers.optimise import evaluate as ev
    from workers.setups.trial import fingerprint

    actor = system_user()
    progress = _progress_writer(Evaluation, evaluation.pk)
    model_path = model_version_verify(actor=actor, version=evaluation.model_version)
    adapter_path = (
        model_version_verify(actor=actor, version=evaluation.adapter)
        if evaluation.adapter
        else None
    )
    dataset = evaluation.dataset_version
    if dataset.sha256 != evaluation.dataset_sha256:  # immutable, so never; but say so
        raise ValidationError("The dataset version's content is not the one evaluation asked for.")
    rows_path = dataset_version_canonical(dataset, work)
    rows = [row for _, row in read_rows(rows_path)]
    params = evaluation.params
    if params["metric"] == "perplexity":
        reference_path = (
            model_version_verify(actor=actor, version=evaluation.reference)
            if evaluation.reference
            else None
        )
        done = ev.perplexity(
            model_path,
            ev.text_of(rows),
            n_ctx=params["n_ctx"],
            adapter_path=adapter_path,
            reference_path=reference_path,
            max_chunks=params["max_chunks"],
            progress=progress,
        )
        data = done.as_dict()
        figures = {
            "perplexity": data.get("perplexity"),
            "perplexity_uncertainty": data.get("uncertainty"),
            "kl_divergence": data.get("kl_divergence"),
            "kl_uncertainty": data.get("kl_divergence_uncertainty"),
            "top_token_agreement": data.get("same_top"),
            "tokens_per_s": data.get("tokens_per_s"),
        }
    else:
        items = ev.task_items(rows[: params["max_items"]], dataset.shape)
        done = ev.task_score(
            model_path,
            items,
            template=None,
            architecture=evaluation.model_version.architecture,
            adapter_path=adapter_path,
            progress=progress,
        )
        data = done.as_dict()
        seconds = data.get("seconds") or 0
        figures = {
            "exact_match": data.get("exact"),
            "contains": data.get("contains"),
            "tokens_per_s": data["generated_tokens"] / seconds if seconds else None,
        }
    return figures, {**data, "hardware": fingerprint(), "rows": len(rows)}


def jobs_reap() -> list[str]:
    """Fail running jobs whose worker went silent (beat): their heartbeat stopped."""
    cutoff = timezone.now() - SILENT_AFTER
    reaped = []
    for model, action in (
        (ModelJob, "optimise.job.reaped"),
        (Evaluation, "optimise.evaluation.reaped"),
    ):
        for job in model.objects.filter(state=JobState.RUNNING, heartbeat_at__lt=cutoff):
            reason = (
                f"The worker {job.worker} went silent (no heartbeat since "
                f"{job.heartbeat_at:%Y-%m-%d %H:%M:%S} UTC); request the job again."
            )
            with transaction.atomic():
                if model.objects.filter(pk=job.pk, state=JobState.RUNNING).update(
                    state=JobState.FAILED, reason=reason, finished_at=timezone.now()
                ):
                    audit_record(
                        actor=system_user(),
                        action=action,
                        target=job,
                        outcome=Outcome.FAILURE,
                        details={"reason": reason, "worker": job.worker},
                    )
                    reaped.append(str(job))
    return reaped
