"""Dataset files imported from Hugging Face: the registry's import job framework
(``apps/registry/hub_imports.py``) applied to a dataset repository's file, which then
becomes a version and is validated like an upload.
"""

from __future__ import annotations

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import transaction

from apps.accounts.models import User
from apps.datasets.models import (
    Dataset,
    DatasetImport,
    DatasetVersion,
    Shape,
    SourceKind,
)
from apps.datasets.services import (
    check_file_name,
    clean_column_mapping,
    dataset_version_ingest,
    require_dataset_writer,
    tokenizer_check,
)
from apps.registry.hub_imports import (
    hub_import_check,
    hub_import_claim,
    hub_import_execute,
    hub_import_fetch,
    hub_import_requested,
    hub_import_source,
)
from apps.registry.models import ModelVersion


@transaction.atomic
def dataset_import_request(
    *,
    actor: User,
    dataset: Dataset,
    repo_id: str,
    filename: str,
    revision: str = "",
    declared_shape: str = "",
    column_mapping: dict[str, str] | None = None,
    tokenizer: ModelVersion | None = None,
    max_tokens: int | None = None,
) -> DatasetImport:
    """Queue the import of one file of a dataset repo on ``settings.HF_ENDPOINT``.

    Refused here, before a job exists and without asking the hub: a malformed repo id,
    file name or revision, a file that is not data (pickle formats above all), and
    settings an upload would be refused for. The version is validated as an upload is.
    """
    require_dataset_writer(actor, dataset, "import dataset versions")
    repo_id, filename, revision = hub_import_check(
        repo_id=repo_id, filename=filename, revision=revision, check_name=check_file_name
    )
    if declared_shape and declared_shape not in Shape.values:
        raise ValidationError(f"{declared_shape!r} is not a dataset shape.")
    column_mapping = clean_column_mapping(column_mapping)
    tokenizer_check(tokenizer, max_tokens)
    job = DatasetImport.objects.create(
        dataset=dataset,
        hf_repo_id=repo_id,
        filename=filename,
        revision=revision,
        endpoint=settings.HF_ENDPOINT,
        declared_shape=declared_shape,
        column_mapping=column_mapping,
        tokenizer=tokenizer,
        max_tokens=max_tokens,
        created_by=actor,
    )
    hub_import_requested(
        job,
        actor=actor,
        action="dataset_import",
        target={"dataset": dataset.name},
        task="datasets.import_run",  # apps/datasets/tasks.py
    )
    return job


def _import_file(job: DatasetImport, requester: User) -> tuple[DatasetVersion, bool]:
    hub_file, staged = hub_import_fetch(
        job, repo_type="dataset", kind="dataset", recorded_licence=job.dataset.licence
    )
    version = dataset_version_ingest(
        actor=requester,
        dataset=job.dataset,
        staged=staged,
        file_name=hub_file.name,
        source_kind=SourceKind.HUGGING_FACE,
        source=hub_import_source(job, hub_file),
        declared_shape=job.declared_shape,
        column_mapping=job.column_mapping,
        tokenizer=job.tokenizer,
        max_tokens=job.max_tokens,
    )
    return version, True


def dataset_import_run(*, import_id: int) -> None:
    """Run a queued import (the Celery task's body); a duplicate delivery does nothing.

    Downloads the file at the commit its revision resolved to, checks its sha256 against
    the hub's and adds it as a version (created by the person who asked, whose right to
    is checked again now), whose validation is then queued as an upload's is. Whatever
    fails, the job ends failed with a reason and no file is left behind.
    """
    job = hub_import_claim(DatasetImport, import_id, "dataset", "tokenizer", "created_by")
    if job is None:
        return
    hub_import_execute(
        job,
        action="dataset_import",
        target={"dataset": job.dataset.name},
        ingest=lambda requester: _import_file(job, requester),
    )
