from __future__ import annotations

from django.db.models import Count, QuerySet

from apps.accounts.models import User
from apps.datasets.models import Dataset, DatasetImport, DatasetTransform, DatasetVersion
from apps.datasets.services import reading_options
from apps.registry.artifacts import artifact_store
from apps.registry.models import Artifact, Format, ModelVersion, State
from workers import datasets as data


def dataset_list(*, user: User) -> QuerySet[Dataset]:
    return (
        Dataset.objects.visible_to(user)
        .select_related("owner")
        .annotate(version_count=Count("versions"))
    )


def dataset_get(*, user: User, name: str) -> Dataset:
    return Dataset.objects.visible_to(user).select_related("owner").get(name=name)


def dataset_version_list(*, dataset: Dataset) -> QuerySet[DatasetVersion]:
    return dataset.versions.select_related("artifact", "created_by", "parent", "tokenizer__repo")


def dataset_version_get(*, user: User, pk: int) -> DatasetVersion:
    return DatasetVersion.objects.select_related(
        "dataset__owner", "artifact", "created_by", "parent__dataset", "tokenizer__repo"
    ).get(pk=pk, dataset__in=Dataset.objects.visible_to(user))


def dataset_transform_list(*, version: DatasetVersion) -> QuerySet[DatasetTransform]:
    return version.transforms.select_related("created_by").prefetch_related("outputs__dataset")


def dataset_transform_get(*, user: User, pk: int) -> DatasetTransform:
    return DatasetTransform.objects.select_related("source_version__dataset").get(
        pk=pk, source_version__dataset__in=Dataset.objects.visible_to(user)
    )


def dataset_import_list(*, dataset: Dataset) -> QuerySet[DatasetImport]:
    return dataset.imports.select_related("dataset", "version__dataset", "created_by")


def dataset_import_get(*, user: User, pk: int) -> DatasetImport:
    return DatasetImport.objects.select_related(
        "dataset", "version__dataset", "created_by", "tokenizer__repo"
    ).get(pk=pk, dataset__in=Dataset.objects.visible_to(user))


def tokenizer_choices() -> QuerySet[ModelVersion]:
    """Models whose tokenizer may count a dataset's tokens."""
    return (
        ModelVersion.objects.filter(format=Format.GGUF_MODEL)
        .exclude(state=State.DEPRECATED)
        .select_related("repo")
        .order_by("repo__name", "-number")
    )


def dataset_version_rows(
    *, version: DatasetVersion, start: int, count: int
) -> list[data.PreviewRow]:
    """One page of rows, read from the stored file by seeking to the nearest indexed
    offset: fast on a large file, which is never loaded whole."""
    if not version.report:
        return []
    report = data.Report.from_dict(version.report)
    path = artifact_store().path_for(version.sha256)
    options = reading_options(version, tokenize=False)
    return data.read_page(
        path, data.FileFormat(version.format), options, report.index, start, count
    )


def artifact_users(artifact: Artifact) -> list[str]:
    """The dataset versions whose file is ``artifact``, named as the registry's integrity
    events list them; the registry is handed this in ``DatasetsConfig.ready``."""
    versions = DatasetVersion.objects.filter(artifact=artifact).select_related("dataset")
    return [f"dataset {d}" for d in versions]
