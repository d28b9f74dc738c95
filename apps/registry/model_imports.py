"""Model files imported from Hugging Face: the import job framework (``hub_imports``)
applied to a model repository's file, which then becomes a version of a registry repo.
"""

from __future__ import annotations

from django.conf import settings
from django.db import transaction

from apps.accounts.models import User
from apps.registry.artifacts import check_file_name
from apps.registry.hub_imports import (
    hub_import_check,
    hub_import_claim,
    hub_import_execute,
    hub_import_fetch,
    hub_import_requested,
    hub_import_source,
)
from apps.registry.models import (
    ModelImport,
    ModelRepo,
    ModelVersion,
    SourceKind,
)
from apps.registry.services import model_version_ingest, require_repo_writer


@transaction.atomic
def model_import_request(
    *, actor: User, repo: ModelRepo, repo_id: str, filename: str, revision: str = ""
) -> ModelImport:
    """Queue the import of one file from the Hugging Face hub in ``settings.HF_ENDPOINT``.

    Everything that can be refused without the hub is refused here, before a job
    exists: a malformed repo id, file name or revision, and a file that is not GGUF
    (pickle formats above all). The hub is asked nothing until a worker runs the job.
    """
    require_repo_writer(actor, repo, "import versions into it")
    repo_id, filename, revision = hub_import_check(
        repo_id=repo_id, filename=filename, revision=revision, check_name=check_file_name
    )
    job = ModelImport.objects.create(
        repo=repo,
        hf_repo_id=repo_id,
        filename=filename,
        revision=revision,
        endpoint=settings.HF_ENDPOINT,
        created_by=actor,
    )
    hub_import_requested(
        job,
        actor=actor,
        action="model_import",
        target={"repo": repo.name},
        task="registry.model_import_run",  # apps/registry/tasks.py
    )
    return job


def _import_file(job: ModelImport, requester: User) -> tuple[ModelVersion, bool]:
    hub_file, staged = hub_import_fetch(
        job, repo_type="model", kind="model", recorded_licence=job.repo.licence
    )
    result = model_version_ingest(
        actor=requester,
        repo=job.repo,
        staged=staged,
        file_name=hub_file.name,
        source_kind=SourceKind.HUGGING_FACE,
        source={**hub_import_source(job, hub_file), "repo_licence": job.repo.licence},
    )
    return result.version, result.created


def model_import_run(*, import_id: int) -> None:
    """Run a queued import (the Celery task's body); a duplicate delivery does nothing.

    The version is added as the person who asked for it; the job's end is recorded by
    the system actor. Whatever fails, the job ends failed with a reason a person can act
    on and no file is left behind.
    """
    job = hub_import_claim(ModelImport, import_id, "repo", "created_by")
    if job is None:
        return
    hub_import_execute(
        job,
        action="model_import",
        target={"repo": job.repo.name},
        ingest=lambda requester: _import_file(job, requester),
    )
