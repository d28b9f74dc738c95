"""Quantise, export (merging an adapter or not) and evaluate model versions.

Requests are checked here, on the control plane, so bad input is refused with a clear
message and nothing is queued. A training worker claims each job with a conditional
UPDATE, runs the ``workers.optimise`` function on verified files, and ends the job: a
quantise or export job adds a draft version to the registry with its provenance; an
evaluation stores its figures. Every request and every outcome is audited.
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

from django.core.exceptions import PermissionDenied, ValidationError
from django.db import transaction
from django.utils import timezone

from apps.accounts.models import User
from apps.accounts.services import require_role, system_user
from apps.audit.models import Outcome
from apps.audit.services import audit_record
from apps.datasets.models import DatasetVersion, Shape
from apps.datasets.models import State as DatasetState
from apps.datasets.services import dataset_version_canonical
from apps.finetune.models import FineTuneJob
from apps.optimise.models import (
    LAUNCHER_ROLES,
    Evaluation,
    Job,
    JobState,
    ModelJob,
    Operation,
)
from apps.registry.artifacts import artifact_store
from apps.registry.models import REPO_NAME, Format, ModelRepo, ModelVersion, SourceKind
from apps.registry.services import (
    model_repo_create,
    model_version_ingest,
    model_version_verify,
    require_repo_writer,
)
from workers.optimise.quantize import QUANT_TYPES, is_quantised

log = logging.getLogger(__name__)

OFFERED_QUANT_TYPES = list(QUANT_TYPES)
IMATRIX_N_CTX = 512
EXPORT_TYPES = ("f16", "bf16")
TASK_SHAPES = (Shape.PROMPT_COMPLETION, Shape.INSTRUCTION, Shape.CHAT)
# A running job touches its heartbeat this often; beat fails one silent for SILENT_AFTER.
HEARTBEAT_SECONDS = 15
SILENT_AFTER = timedelta(minutes=3)
EVALUATION_LIMITS = {"n_ctx": (64, 32768), "max_chunks": (1, 10_000), "max_items": (1, 10_000)}


def _enqueue(task_name: str, pk: int) -> None:
    from aibox.celery import app

    transaction.on_commit(lambda: app.send_task(task_name, args=[pk], queue="training"))


def _check_model(version: ModelVersion, what: str) -> None:
    if version.format != Format.GGUF_MODEL:
        raise ValidationError(
            {what: f"{version} is a {version.get_format_display()}, not a GGUF model."}
        )
    if version.artifact.integrity_failed_at:
        raise ValidationError({what: f"{version}'s file failed verification; restore it first."})


def adapter_base_check(
    *, adapter: ModelVersion, base: ModelVersion, field: str = "adapter"
) -> None:
    """Refuse an adapter on a base it was not trained on.

    An adapter AIBox trained (or that was registered with a parent) names its base: only
    that base fits. One uploaded without a parent is checked by architecture only, and
    the worker checks every tensor's shape before merging or loading it.
    """
    if adapter.format != Format.GGUF_LORA:
        raise ValidationError(
            {field: f"{adapter} is a {adapter.get_format_display()}, not a GGUF LoRA adapter."}
        )
    bases = [p for p in adapter.parents.select_related("repo") if p.format == Format.GGUF_MODEL]
    if bases and base.pk not in {p.pk for p in bases}:
        named = ", ".join(str(p) for p in bases)
        raise ValidationError({field: f"{adapter} was trained on {named}, not on {base}."})
    arch = (adapter.metadata or {}).get("architecture") or adapter.architecture
    if not bases and arch and base.architecture and arch != base.architecture:
        raise ValidationError(
            {field: f"{adapter} is for {arch} models; {base} is {base.architecture}."}
        )


def _output_repo(name: str, default: str) -> str:
    name = (name or default).strip().lower()
    try:
        REPO_NAME(name)
    except ValidationError as exc:
        raise ValidationError({"output_repo": exc.messages}) from exc
    return name


def _check_output_repo(actor: User, name: str) -> None:
    repo = ModelRepo.objects.filter(name=name).first()
    if repo is not None:
        try:
            require_repo_writer(actor, repo, "add versions to it")
        except PermissionDenied as exc:  # a field to change, not a role to lack
            raise ValidationError({"output_repo": str(exc)}) from exc


def quantize_request(
    *,
    actor: User,
    source: ModelVersion,
    quant_type: str,
    allow_requantize: bool = False,
    output_repo: str = "",
    imatrix_dataset: DatasetVersion | None = None,
    imatrix_chunks: int = 32,
) -> ModelJob:
    """Queue the quantisation of ``source`` to ``quant_type`` into a new draft version.

    The output goes to ``output_repo`` (default: the source's repo). A source that is
    already quantised is quantised again only when ``allow_requantize`` is set, and the
    new version says so. With ``imatrix_dataset`` (valid text), the worker first reads
    up to ``imatrix_chunks`` chunks of it with the source model and weighs the rounding
    by what mattered there (an importance matrix, as llama-imatrix computes it).
    """
    require_role(actor, LAUNCHER_ROLES, "quantise models")
    _check_model(source, "source")
    if quant_type not in OFFERED_QUANT_TYPES:
        raise ValidationError(
            {
                "quant_type": f"Unknown quantisation type {quant_type!r}; choose one of "
                f"{', '.join(OFFERED_QUANT_TYPES)}."
            }
        )
    if is_quantised(source.quantization) and not allow_requantize:
        raise ValidationError(
            {
                "allow_requantize": f"{source} is already quantised ({source.quantization}): "
                "quantising it again loses more than quantising an F16/BF16 original (export "
                "or import one). Ask for a requantisation ('Requantise', allow_requantize) "
                "to do it anyway."
            }
        )
    if imatrix_dataset is not None:
        _check_text(imatrix_dataset, "imatrix_dataset")
        if not 1 <= imatrix_chunks <= 10_000:
            raise ValidationError({"imatrix_chunks": "Must be between 1 and 10000."})
    elif QUANT_TYPES[quant_type].requires_imatrix:
        raise ValidationError(
            {
                "imatrix_dataset": f"{quant_type} needs an importance matrix: choose a text "
                "dataset version to compute it on."
            }
        )
    repo_name = _output_repo(output_repo, source.repo.name)
    _check_output_repo(actor, repo_name)
    params = {
        "quant_type": quant_type,
        "allow_requantize": bool(allow_requantize and is_quantised(source.quantization)),
    }
    if imatrix_dataset is not None:
        params |= {"imatrix_chunks": imatrix_chunks, "imatrix_n_ctx": IMATRIX_N_CTX}
    return _create_model_job(
        actor=actor,
        operation=Operation.QUANTIZE,
        source=source,
        imatrix_dataset=imatrix_dataset,
        params=params,
        repo=repo_name,
    )


def _check_text(version: DatasetVersion, field: str) -> None:
    _check_valid(version, field)
    if version.shape != Shape.TEXT:
        raise ValidationError(
            {field: f"{version} is {version.get_shape_display()}; plain text is needed here."}
        )


def _check_valid(version: DatasetVersion, field: str) -> None:
    if version.state != DatasetState.VALID:
        raise ValidationError(
            {
                field: f"{version} is {version.get_state_display()}, not valid: only "
                "validated data can be used."
                + (f" ({version.state_reason})" if version.state_reason else "")
            }
        )


def export_request(
    *,
    actor: User,
    source: ModelVersion,
    adapter: ModelVersion | None = None,
    out_type: str = "f16",
    adapter_scale: float = 1.0,
    output_repo: str = "",
) -> ModelJob:
    """Queue writing ``source`` as a standalone F16/BF16 GGUF, with ``adapter`` merged in.

    Without an adapter this is a dequantised export (to quantise from, or to hand on);
    with one it is the fine-tuned model as one file, whose provenance names the base,
    the adapter, the fine-tune and its datasets.
    """
    require_role(actor, LAUNCHER_ROLES, "export models")
    _check_model(source, "source")
    if out_type not in EXPORT_TYPES:
        raise ValidationError(
            {"out_type": f"Unknown output type {out_type!r}; choose f16 or bf16."}
        )
    if not 0 < adapter_scale <= 4:
        raise ValidationError({"adapter_scale": "The adapter scale must be above 0, at most 4."})
    finetune_job = None
    if adapter is not None:
        adapter_base_check(adapter=adapter, base=source)
        finetune_job = FineTuneJob.objects.filter(adapter=adapter).first()
    default_repo = adapter.repo.name + "-merged" if adapter is not None else source.repo.name
    repo_name = _output_repo(output_repo, default_repo)
    _check_output_repo(actor, repo_name)
    params = {"out_type": out_type, "adapter_scale": adapter_scale if adapter else None}
    return _create_model_job(
        actor=actor,
        operation=Operation.EXPORT,
        source=source,
        adapter=adapter,
        finetune_job=finetune_job,
        params=params,
        repo=repo_name,
    )


def _create_model_job(*, actor: User, operation: Operation, repo: str, **fields: Any) -> ModelJob:
    with transaction.atomic():
        job = ModelJob.objects.create(
            operation=operation, output_repo=repo, created_by=actor, **fields
        )
        audit_record(
            actor=actor,
            action=f"optimise.{operation}.request",
            target=job,
            details={
                "source": job.source_id,
                "source_sha256": job.source.sha256,
                "adapter": job.adapter_id,
                "adapter_sha256": job.adapter.sha256 if job.adapter else None,
                "params": job.params,
                "imatrix_dataset": job.imatrix_dataset_id,
                "output_repo": repo,
            },
        )
        _enqueue("optimise.model_job_run", job.pk)
    return job


def evaluation_request(
    *,
    actor: User,
    model_version: ModelVersion,
    dataset_version: DatasetVersion,
    adapter: ModelVersion | None = None,
    reference: ModelVersion | None = None,
    n_ctx: int = 512,
    max_chunks: int = 100,
    max_items: int = 200,
) -> Evaluation:
    """Queue an evaluation of ``model_version`` (+ ``adapter``) on ``dataset_version``.

    Text data is scored by perplexity, and against ``reference`` by KL divergence and
    top-token agreement; prompt → completion data (prompt/completion, instruction, chat)
    by exact match and contains-the-answer on greedy answers.
    """
    require_role(actor, LAUNCHER_ROLES, "evaluate models")
    _check_model(model_version, "model_version")
    if adapter is not None:
        adapter_base_check(adapter=adapter, base=model_version)
    _check_valid(dataset_version, "dataset_version")
    shape = dataset_version.shape
    if shape != Shape.TEXT and shape not in TASK_SHAPES:
        raise ValidationError({"dataset_version": f"{dataset_version} has no usable shape."})
    if reference is not None:
        if shape != Shape.TEXT:
            raise ValidationError(
                {
                    "reference": "A reference model is compared on text data (perplexity); "
                    f"{dataset_version} is {dataset_version.get_shape_display()}."
                }
            )
        _check_model(reference, "reference")
        if (reference.architecture, reference.vocab_size) != (
            model_version.architecture,
            model_version.vocab_size,
        ):
            raise ValidationError(
                {
                    "reference": f"{reference} does not share {model_version}'s vocabulary "
                    "(architecture and vocabulary size differ), so their token distributions "
                    "cannot be compared."
                }
            )
    params = {"n_ctx": n_ctx, "max_chunks": max_chunks, "max_items": max_items}
    for name, (low, high) in EVALUATION_LIMITS.items():
        if not low <= int(params[name]) <= high:
            raise ValidationError({name: f"Must be between {low} and {high}."})
    if model_version.context_length and n_ctx > model_version.context_length:
        raise ValidationError(
            {"n_ctx": f"{model_version} has a context of {model_version.context_length} tokens."}
        )
    params["metric"] = "perplexity" if shape == Shape.TEXT else "task"
    with transaction.atomic():
        evaluation = Evaluation.objects.create(
            model_version=model_version,
            adapter=adapter,
            dataset_version=dataset_version,
            dataset_sha256=dataset_version.sha256,
            reference=reference,
            params=params,
            created_by=actor,
        )
        audit_record(
            actor=actor,
            action="optimise.evaluation.request",
            target=evaluation,
            details={
                "model_version": model_version.pk,
                "model_sha256": model_version.sha256,
                "adapter": adapter.pk if adapter else None,
                "dataset_version": dataset_version.pk,
                "dataset_sha256": dataset_version.sha256,
                "reference": reference.pk if reference else None,
                "params": params,
            },
        )
        _enqueue("optimise.evaluation_run", evaluation.pk)
    return evaluation


# Running on a worker ---------------------------------------------------------------


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
