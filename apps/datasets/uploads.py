"""Upload handling shared by the dataset page and the REST API."""

from __future__ import annotations

from apps.datasets import services
from apps.datasets.models import Dataset, DatasetVersion, SourceKind
from apps.registry.models import ModelVersion
from apps.registry.uploads import StagedUpload


def ingest_upload(
    *,
    actor,
    dataset: Dataset,
    upload: StagedUpload,
    via: str,
    declared_shape: str = "",
    column_mapping: dict[str, str] | None = None,
    tokenizer: ModelVersion | None = None,
    max_tokens: int | None = None,
) -> DatasetVersion:
    """Hand a streamed upload to the datasets service, recording how it arrived."""
    return services.dataset_version_ingest(
        actor=actor,
        dataset=dataset,
        staged=upload.staged,
        file_name=upload.original_name,
        source_kind=SourceKind.UPLOAD,
        source={"client_file_name": upload.original_name[:255], "via": via},
        declared_shape=declared_shape,
        column_mapping=column_mapping,
        tokenizer=tokenizer,
        max_tokens=max_tokens,
    )
