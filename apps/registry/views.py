from __future__ import annotations

from django.conf import settings
from django.contrib import messages
from django.core.exceptions import PermissionDenied, ValidationError
from django.http import Http404, HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import redirect, render
from django.urls import reverse
from django.views.decorators.http import require_http_methods, require_POST

from apps.accounts.access import login_required, role_required
from apps.accounts.models import Role
from apps.registry import model_imports, selectors, services
from apps.registry.forms import HfImportForm, ImportPathForm, ModelRepoForm, ReasonForm
from apps.registry.licences import licence_not_allowed, version_licence
from apps.registry.models import APPROVER_ROLES, WRITER_ROLES, ModelImport, ModelRepo, ModelVersion
from apps.registry.uploads import (
    ArtifactUploadHandler,
    ingest_upload,
    received_file,
    streamed_upload,
)
from workers.artifacts import ArtifactError


def _repo_or_404(request: HttpRequest, name: str) -> ModelRepo:
    try:
        return selectors.model_repo_get(user=request.user, name=name)
    except ModelRepo.DoesNotExist as exc:
        raise Http404("No such model.") from exc


@login_required
@require_http_methods(["GET", "POST"])
def repo_list(request: HttpRequest) -> HttpResponse:
    can_write = request.user.has_role(*WRITER_ROLES)
    form = ModelRepoForm(request.POST or None)
    if request.method == "POST":
        if not can_write:
            raise PermissionDenied("Your role does not allow you to create models.")
        if form.is_valid():
            data = form.cleaned_data
            try:
                repo = services.model_repo_create(
                    actor=request.user,
                    name=data["name"],
                    licence=data["licence"],
                    licence_url=data["licence_url"],
                    description=data["description"],
                    tags=form.tag_list(),
                )
            except ValidationError as exc:
                form.add_error(None, exc)
            else:
                messages.success(request, f"Model {repo.name} created. Add its first version.")
                return redirect("registry:repo", name=repo.name)
    context = {
        "repos": selectors.model_repo_list(user=request.user),
        "form": form,
        "can_write": can_write,
    }
    return render(request, "registry/repo_list.html", context)


def _repo_context(request: HttpRequest, repo: ModelRepo, **extra) -> dict:
    return {
        "repo": repo,
        "versions": selectors.model_version_list(repo=repo),
        "can_write": request.user.has_role(*WRITER_ROLES),
        "can_import_path": request.user.has_role(Role.ADMIN),
        "import_form": ImportPathForm(),
        "upload_limit": settings.UPLOAD_MAX_BYTES,
        "hf_form": HfImportForm(),
        "hf_endpoint": settings.HF_ENDPOINT,
        "imports": selectors.model_import_list(repo=repo)[:5],
        **extra,
    }


@login_required
def repo_detail(request: HttpRequest, name: str) -> HttpResponse:
    repo = _repo_or_404(request, name)
    return render(request, "registry/repo_detail.html", _repo_context(request, repo))


@role_required(*WRITER_ROLES)
@require_POST
def model_import_create(request: HttpRequest, name: str) -> HttpResponse:
    """The repo page's "Import from Hugging Face" form; the job runs on a worker."""
    repo = _repo_or_404(request, name)
    form = HfImportForm(request.POST)
    if form.is_valid():
        try:
            job = model_imports.model_import_request(
                actor=request.user, repo=repo, **form.cleaned_data
            )
        except ValidationError as exc:
            form.add_error(None, exc)
        else:
            messages.success(request, f"Import of {job} queued.")
            return redirect("registry:repo", name=repo.name)
    context = _repo_context(request, repo, hf_form=form)
    return render(request, "registry/repo_detail.html", context, status=400)


@login_required
def model_import_detail(request: HttpRequest, pk: int) -> HttpResponse:
    try:
        job = selectors.model_import_get(user=request.user, pk=pk)
    except ModelImport.DoesNotExist as exc:
        raise Http404("No such import.") from exc
    if request.htmx:
        return render(request, "registry/_import_status.html", {"job": job})
    return render(request, "registry/import_detail.html", {"job": job})


@streamed_upload
@role_required(*WRITER_ROLES)
@require_POST
def version_upload(request: HttpRequest, name: str, handler: ArtifactUploadHandler) -> HttpResponse:
    """The upload form posts here (with a progress bar); answers JSON for the page's script."""
    repo = _repo_or_404(request, name)
    upload, message, code = received_file(request, handler)
    if upload is None:
        return JsonResponse({"error": message or "Choose a file to upload."}, status=code)
    try:
        result = ingest_upload(actor=request.user, repo=repo, upload=upload, via="web")
    except ValidationError as exc:
        return JsonResponse({"error": " ".join(exc.messages)}, status=400)
    except PermissionDenied as exc:
        return JsonResponse({"error": str(exc)}, status=403)
    version = result.version
    note = "created" if result.created else "already exists (identical file)"
    messages.success(request, f"{version} {note}.")
    return JsonResponse(
        {
            "version": version.pk,
            "created": result.created,
            "url": reverse("registry:version", args=[version.pk]),
        },
        status=201 if result.created else 200,
    )


@role_required(Role.ADMIN)
@require_POST
def version_import_path(request: HttpRequest, name: str) -> HttpResponse:
    repo = _repo_or_404(request, name)
    form = ImportPathForm(request.POST)
    if form.is_valid():
        try:
            result = services.model_version_import_path(
                actor=request.user, repo=repo, path=form.cleaned_data["path"]
            )
        except (ValidationError, ArtifactError) as exc:
            text = " ".join(exc.messages) if isinstance(exc, ValidationError) else str(exc)
            messages.error(request, text)
        else:
            messages.success(request, f"Imported {result.version}.")
            return redirect("registry:version", pk=result.version.pk)
    return redirect("registry:repo", name=repo.name)


def _version_or_404(request: HttpRequest, pk: int) -> ModelVersion:
    try:
        return selectors.model_version_get(user=request.user, pk=pk)
    except ModelVersion.DoesNotExist as exc:
        raise Http404("No such model version.") from exc


@login_required
@require_http_methods(["GET", "POST"])
def version_detail(request: HttpRequest, pk: int) -> HttpResponse:
    version = _version_or_404(request, pk)
    action = request.POST.get("action") if request.method == "POST" else None
    form = ReasonForm(request.POST if action in ("approve", "deprecate") else None)
    override_form = ReasonForm(
        request.POST if action == "licence_override" else None, prefix="override"
    )
    if action == "licence_override":
        if not request.user.has_role(Role.ADMIN):
            raise PermissionDenied("Only admins may override a licence check.")
        if override_form.is_valid():
            try:
                services.licence_override_create(
                    actor=request.user, version=version, reason=override_form.cleaned_data["reason"]
                )
            except ValidationError as exc:
                override_form.add_error(None, exc)
            else:
                messages.success(request, f"Licence override recorded for {version}.")
                return redirect("registry:version", pk=version.pk)
    elif action is not None:
        service = {
            "approve": services.model_version_approve,
            "deprecate": services.model_version_deprecate,
        }.get(action)
        if service is None:
            return HttpResponse("Unknown action.", status=400)
        if form.is_valid():
            try:
                service(actor=request.user, version=version, reason=form.cleaned_data["reason"])
            except ValidationError as exc:
                form.add_error(None, exc)
            else:
                messages.success(request, f"{version} is now {version.get_state_display()}.")
                return redirect("registry:version", pk=version.pk)
    licence = version_licence(version)
    not_allowed = licence_not_allowed(licence)
    see_overrides = request.user.has_role(*APPROVER_ROLES)
    context = {
        "version": version,
        "form": form,
        "override_form": override_form,
        "can_change_state": request.user.has_role(*APPROVER_ROLES),
        "can_override": request.user.has_role(Role.ADMIN),
        "licence": licence,
        "not_allowed": not_allowed,
        "overrides": version.licence_overrides.select_related("created_by")
        if see_overrides
        else None,
        "uncovered": [
            t
            for t in not_allowed
            if t not in {x for o in version.licence_overrides.all() for x in o.terms}
        ],
    }
    status = 400 if (form.errors or override_form.errors) else 200
    return render(request, "registry/version_detail.html", context, status=status)
