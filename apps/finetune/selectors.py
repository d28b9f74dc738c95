from __future__ import annotations

import redis
from django.db.models import Q, QuerySet

from apps.accounts.models import User
from apps.datasets.models import Dataset, DatasetVersion
from apps.datasets.models import State as DataState
from apps.finetune import progress
from apps.finetune.models import FineTuneJob, JobState
from apps.registry.models import Format, ModelVersion, SourceKind
from apps.registry.models import State as VersionState

CHART_WIDTH, CHART_HEIGHT = 560, 180


def finetune_job_list(*, user: User) -> QuerySet[FineTuneJob]:
    return FineTuneJob.objects.visible_to(user).select_related(
        "base_model__repo", "dataset_version__dataset", "created_by", "adapter__repo"
    )


def finetune_job_get(*, user: User, pk: int) -> FineTuneJob:
    return (
        finetune_job_list(user=user)
        .select_related("validation_version__dataset", "peft_adapter__repo")
        .get(pk=pk)
    )


def finetune_jobs_producing(version: ModelVersion) -> QuerySet[FineTuneJob]:
    """The fine-tunes that produced ``version`` (its adapter, or its PEFT export)."""
    job_id = (version.source or {}).get("finetune_job")
    query = Q(adapter=version) | Q(peft_adapter=version)
    if isinstance(job_id, int) and version.source_kind == SourceKind.FINE_TUNE:
        query |= Q(pk=job_id)
    return FineTuneJob.objects.filter(query).select_related(
        "base_model__repo", "dataset_version__dataset", "validation_version__dataset"
    )


def finetune_datasets_of(version: ModelVersion) -> list[DatasetVersion]:
    """The dataset versions the fine-tune that produced ``version`` trained on."""
    found: list[DatasetVersion] = []
    for job in finetune_jobs_producing(version):
        found += [d for d in (job.dataset_version, job.validation_version) if d is not None]
    ids = [
        d.get("id")
        for d in (version.source or {}).get("dataset_versions", []) or []
        if isinstance(d, dict)
    ]
    known = {d.pk for d in found}
    found += list(
        DatasetVersion.objects.filter(pk__in=[i for i in ids if isinstance(i, int)])
        .exclude(pk__in=known)
        .select_related("dataset")
    )
    return found


def finetune_training_licences(version: ModelVersion) -> list[str]:
    """The licences of the data ``version`` was trained on; the registry's licence rule
    reads them through ``apps.registry.licences`` (set in ``FinetuneConfig.ready``)."""
    return [d.dataset.licence for d in finetune_datasets_of(version)]


def base_model_choices() -> QuerySet[ModelVersion]:
    return (
        ModelVersion.objects.filter(format=Format.GGUF_MODEL)
        .exclude(state=VersionState.DEPRECATED)
        .select_related("repo")
        .order_by("repo__name", "-number")
    )


def trainable_dataset_versions(*, user: User) -> QuerySet[DatasetVersion]:
    return (
        DatasetVersion.objects.filter(
            state=DataState.VALID, dataset__in=Dataset.objects.visible_to(user)
        )
        .select_related("dataset")
        .order_by("dataset__name", "-number")
    )


def loss_chart(history: list[dict]) -> dict:
    """SVG polylines for the training and validation loss over steps."""
    train = [(p["step"], p["train_loss"]) for p in history if p.get("train_loss") is not None]
    valid = [
        (p["step"], p["validation_loss"]) for p in history if p.get("validation_loss") is not None
    ]
    points = train + valid
    if not points:
        return {}
    max_step = max(s for s, _ in points) or 1
    top = max(v for _, v in points) or 1.0

    def line(series: list[tuple[int, float]]) -> str:
        return " ".join(
            f"{CHART_WIDTH * s / max_step:.1f},{CHART_HEIGHT * (1 - v / top):.1f}"
            for s, v in series
        )

    return {
        "width": CHART_WIDTH,
        "height": CHART_HEIGHT,
        "train": line(train),
        "validation": line(valid),
        "top": top,
        "max_step": max_step,
        "valid_dots": [
            {"x": CHART_WIDTH * s / max_step, "y": CHART_HEIGHT * (1 - v / top)} for s, v in valid
        ],
    }


def finetune_job_silent(job: FineTuneJob) -> bool:
    """A running job whose worker's heartbeat has expired: the next reap (every 30 s)
    marks it failed. Pages say so meanwhile; reading never writes. While Redis is
    unreachable nothing is known either way, and the page shows what PostgreSQL holds."""
    if job.state != JobState.RUNNING:
        return False
    try:
        return progress.silent(job.pk)
    except redis.RedisError:
        return False


def finetune_job_stream_position(*, job_id: int) -> str:
    """The id of the last progress stream entry the control plane applied to the job."""
    return FineTuneJob.objects.values_list("stream_pos", flat=True).get(pk=job_id)


def finetune_job_cancel_requested(*, job_id: int) -> bool:
    """The runner's question every step: the flag in Redis, or while Redis is away, the
    job's row."""
    try:
        return progress.cancel_requested(job_id)
    except redis.RedisError:
        return FineTuneJob.objects.filter(pk=job_id, cancel_requested=True).exists()
