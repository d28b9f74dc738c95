from __future__ import annotations

from django.db.models import Count, QuerySet

from apps.accounts.models import User
from apps.registry.models import ModelImport, ModelRepo, ModelVersion


def model_repo_list(*, user: User) -> QuerySet[ModelRepo]:
    return ModelRepo.objects.visible_to(user).annotate(version_count=Count("versions"))


def model_repo_get(*, user: User, name: str) -> ModelRepo:
    return ModelRepo.objects.visible_to(user).get(name=name)


def model_version_list(*, repo: ModelRepo) -> QuerySet[ModelVersion]:
    return repo.versions.select_related("artifact", "created_by", "state_changed_by")


def model_version_get(*, user: User, pk: int) -> ModelVersion:
    repos = ModelRepo.objects.visible_to(user)
    return (
        ModelVersion.objects.select_related("repo", "artifact", "created_by", "state_changed_by")
        .prefetch_related("parents__repo", "children__repo")
        .get(pk=pk, repo__in=repos)
    )


def model_import_list(*, repo: ModelRepo) -> QuerySet[ModelImport]:
    return repo.imports.select_related("repo", "version__repo", "created_by")


def model_import_get(*, user: User, pk: int) -> ModelImport:
    repos = ModelRepo.objects.visible_to(user)
    return ModelImport.objects.select_related("repo", "version__repo", "created_by").get(
        pk=pk, repo__in=repos
    )
