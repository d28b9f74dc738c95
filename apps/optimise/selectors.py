"""Reading optimisation jobs and evaluations, and comparing versions by their figures."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from django.db.models import Q, QuerySet

from apps.accounts.models import User
from apps.datasets.models import Shape
from apps.finetune.selectors import trainable_dataset_versions
from apps.optimise.models import Evaluation, JobState, ModelJob
from apps.registry.models import Format, ModelRepo, ModelVersion


def model_job_list(*, user: User, version: ModelVersion | None = None) -> QuerySet[ModelJob]:
    jobs = ModelJob.objects.visible_to(user).select_related(
        "source__repo", "adapter__repo", "output_version__repo", "created_by"
    )
    if version is not None:
        jobs = jobs.filter(Q(source=version) | Q(adapter=version) | Q(output_version=version))
    return jobs


def evaluation_list(
    *, user: User, version: ModelVersion | None = None, repo: ModelRepo | None = None
) -> QuerySet[Evaluation]:
    evaluations = Evaluation.objects.visible_to(user).select_related(
        "model_version__repo",
        "model_version__artifact",
        "adapter__repo",
        "reference__repo",
        "dataset_version__dataset",
        "created_by",
    )
    if version is not None:
        evaluations = evaluations.filter(Q(model_version=version) | Q(adapter=version))
    if repo is not None:
        evaluations = evaluations.filter(model_version__repo=repo)
    return evaluations


def evaluable_dataset_versions(*, user: User) -> QuerySet:
    """Valid dataset versions the user may see: those a fine-tune could train on."""
    return trainable_dataset_versions(user=user)


def text_dataset_versions(*, user: User) -> QuerySet:
    """Valid plain-text dataset versions the user may see (importance matrices)."""
    return trainable_dataset_versions(user=user).filter(shape=Shape.TEXT)


def gguf_models() -> QuerySet[ModelVersion]:
    return ModelVersion.objects.filter(format=Format.GGUF_MODEL).select_related("repo")


def lora_adapters() -> QuerySet[ModelVersion]:
    return ModelVersion.objects.filter(format=Format.GGUF_LORA).select_related("repo")


@dataclass
class ComparisonRow:
    version: ModelVersion
    adapter: ModelVersion | None
    size: int
    figures: dict[str, Evaluation] = field(default_factory=dict)  # dataset label → latest


@dataclass
class Comparison:
    """The latest succeeded evaluation of each (version, adapter) on each dataset."""

    datasets: list[str]
    rows: list[ComparisonRow]
    chart: dict[str, Any]


def comparison(*, user: User, repo: ModelRepo) -> Comparison:
    """A repo's versions side by side: file size, quality on each dataset, speed."""
    evaluations = evaluation_list(user=user, repo=repo).filter(state=JobState.SUCCEEDED)
    rows: dict[tuple[int, int | None], ComparisonRow] = {}
    datasets: list[str] = []
    for e in evaluations.order_by("created_at", "id"):
        label = f"{e.dataset_version} ({e.dataset_sha256[:8]})"
        if label not in datasets:
            datasets.append(label)
        key = (e.model_version_id, e.adapter_id)
        row = rows.setdefault(
            key, ComparisonRow(e.model_version, e.adapter, e.model_version.artifact.size)
        )
        row.figures[label] = e  # later ones win
    ordered = sorted(rows.values(), key=lambda r: (-r.size, r.version.number))
    return Comparison(datasets=datasets, rows=ordered, chart=quality_chart(ordered, datasets))


def quality_chart(rows: list[ComparisonRow], datasets: list[str]) -> dict[str, Any]:
    """An SVG scatter of perplexity against file size on the dataset most versions were
    measured on; each point is labelled with its quantisation and measured speed."""
    counts = {d: sum(1 for r in rows if (e := r.figures.get(d)) and e.perplexity) for d in datasets}
    dataset = max(counts, key=counts.get, default=None)
    points = []
    for r in rows:
        e = r.figures.get(dataset) if dataset else None
        if e is None or e.perplexity is None:
            continue
        points.append(
            {
                "size": r.size,
                "ppl": e.perplexity,
                "err": e.perplexity_uncertainty or 0.0,
                "label": (r.version.quantization or f"v{r.version.number}")
                + (" + adapter" if r.adapter else ""),
                "speed": e.tokens_per_s,
                "url": r.version.get_absolute_url(),
            }
        )
    if not points:
        return {"dataset": dataset, "points": []}
    width, height, pad = 560, 260, 48
    sizes = [p["size"] for p in points]
    lows = [p["ppl"] - p["err"] for p in points]
    highs = [p["ppl"] + p["err"] for p in points]
    x0, x1 = min(sizes), max(sizes)
    y0, y1 = min(lows), max(highs)
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1)

    def x(v: float) -> float:
        return round(pad + (v - x0) / (x1 - x0) * (width - 2 * pad), 1)

    def y(v: float) -> float:
        return round(height - pad - (v - y0) / (y1 - y0) * (height - 2 * pad), 1)

    for p in points:
        p.update(
            x=x(p["size"]),
            y=y(p["ppl"]),
            y_low=y(p["ppl"] - p["err"]),
            y_high=y(p["ppl"] + p["err"]),
        )
    return {
        "dataset": dataset,
        "points": points,
        "width": width,
        "height": height,
        "pad": pad,
        "x_min": x0,
        "x_max": x1,
        "y_min": y0,
        "y_max": y1,
    }


def quality_by_version(versions: list[ModelVersion]) -> dict[int, Evaluation]:
    """For the setup advisor: each version's latest succeeded perplexity evaluation
    without an adapter, on the text dataset most of ``versions`` were measured on, so
    figures compare like with like."""
    evaluations = (
        Evaluation.objects.filter(
            model_version__in=versions,
            adapter__isnull=True,
            state=JobState.SUCCEEDED,
            perplexity__isnull=False,
        )
        .select_related("dataset_version__dataset")
        .order_by("created_at", "id")
    )
    by_dataset: dict[str, dict[int, Evaluation]] = {}
    for e in evaluations:
        by_dataset.setdefault(e.dataset_sha256, {})[e.model_version_id] = e
    if not by_dataset:
        return {}
    return max(by_dataset.values(), key=len)
