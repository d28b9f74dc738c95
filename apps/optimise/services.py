"""Quantise, export (merging an adapter or not) and evaluate model versions.

Requests are checked here, on the control plane, so bad input is refused with a clear
message and nothing is queued; every request is audited. A training worker runs the jobs
(``runs``).
"""

from __future__ import annotations

import logging
from typing import Any

from django.core.exceptions import PermissionDenied, ValidationError
from django.db import transaction

from aibox.celery import app as celery_app
from apps.accounts.models import User
from apps.accounts.services import require_role
from apps.audit.services import audit_record
from apps.datasets.models import DatasetVersion, Shape
from apps.datasets.models import State as DatasetState
from apps.finetune.models import FineTuneJob
from apps.optimise.models import (
    LAUNCHER_ROLES,
    Evaluation,
    ModelJob,
    Operation,
)
from apps.registry.models import REPO_NAME, Format, ModelRepo, ModelVersion
from apps.registry.services import (
    require_repo_writer,
)
from workers.optimise.quantize import QUANT_TYPES, is_quantised

log = logging.getLogger(__name__)

OFFERED_QUANT_TYPES = list(QUANT_TYPES)
EXPORT_TYPES = ("f16", "bf16")
# The context the importance matrix is computed with, kept in the job's params.
IMATRIX_N_CTX = 512
TASK_SHAPES = (Shape.PROMPT_COMPLETION, Shape.INSTRUCTION, Shape.CHAT)
EVALUATION_LIMITS = {"n_ctx": (64, 32768), "max_chunks": (1, 10_000), "max_items": (1, 10_000)}


# Their own queue, not the fine-tunes' ``training`` one: these jobs still read their rows
# and the artifact store directly, so a worker with the database takes them, while a
# training worker on another host (no database) takes only fine-tunes.
OPTIMISE_QUEUE = "optimise"


def _enqueue(task_name: str, pk: int) -> None:
    transaction.on_commit(lambda: celery_app.send_task(task_name, args=[pk], queue=OPTIMISE_QUEUE))


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
