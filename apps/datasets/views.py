from __future__ import annotations

from django.conf import settings
from django.contrib import messages
from django.core.exceptions import PermissionDenied, ValidationError
from django.core.paginator import Paginator
from django.http import Http404, HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import redirect, render
from django.urls import reverse
from django.views.decorators.http import require_http_methods, require_POST

from apps.accounts.access import role_required
from apps.accounts.models import Role
from apps.datasets import hub_imports, selectors, services, transforms
from apps.datasets.api import export_response
from apps.datasets.forms import (
    DatasetForm,
    FilterForm,
    HfImportForm,
    SplitForm,
    UploadSettingsForm,
)
from apps.datasets.models import (
    SEE_ALL_ROLES,
    WRITER_ROLES,
    Dataset,
    DatasetImport,
    DatasetVersion,
    JobState,
    Operation,
    State,
)
from apps.datasets.uploads import ingest_upload
from apps.registry.uploads import (
    ArtifactUploadHandler,
    received_file,
    streamed_upload,
)

READER_ROLES = (*WRITER_ROLES, Role.COMPLIANCE_OFFICER)
ROWS_PER_PAGE = 20
HISTOGRAM_BAR_PX = 120


def _dataset_or_404(request: HttpRequest, name: str) -> Dataset:
    try:
        return selectors.dataset_get(user=request.user, name=name)
    except Dataset.DoesNotExist as exc:
        raise Http404("No such dataset.") from exc


def _version_or_404(request: HttpRequest, pk: int) -> DatasetVersion:
    try:
        return selectors.dataset_version_get(user=request.user, pk=pk)
    except DatasetVersion.DoesNotExist as exc:
        raise Http404("No such dataset version.") from exc


def _can_write(user, dataset: Dataset) -> bool:
    return user.has_role(Role.ADMIN) or (
        user.has_role(Role.DATA_SCIENTIST) and dataset.owner_id == user.pk
    )


@role_required(*READER_ROLES)
@require_http_methods(["GET", "POST"])
def dataset_list(request: HttpRequest) -> HttpResponse:
    can_create = request.user.has_role(*WRITER_ROLES)
    form = DatasetForm(request.POST or None)
    if request.method == "POST":
        if not can_create:
            raise PermissionDenied("Your role does not allow you to create datasets.")
        if form.is_valid():
            try:
                dataset = services.dataset_create(actor=request.user, **form.cleaned_data)
            except ValidationError as exc:
                form.add_error(None, exc)
            else:
                messages.success(request, f"Dataset {dataset.name} created. Upload its data.")
                return redirect("datasets:detail", name=dataset.name)
    context = {
        "datasets": selectors.dataset_list(user=request.user),
        "form": form,
        "can_create": can_create,
        "sees_all": request.user.has_role(*SEE_ALL_ROLES),
    }
    return render(request, "datasets/dataset_list.html", context)


def _dataset_context(request: HttpRequest, dataset: Dataset, **extra) -> dict:
    versions = selectors.dataset_version_list(dataset=dataset)
    return {
        "dataset": dataset,
        "versions": versions,
        "can_write": _can_write(request.user, dataset),
        "settings_form": UploadSettingsForm(),
        "upload_limit": settings.UPLOAD_MAX_BYTES,
        "validating": any(v.state == State.VALIDATING for v in versions),
        "hf_form": HfImportForm(),
        "hf_endpoint": settings.HF_ENDPOINT,
        "imports": selectors.dataset_import_list(dataset=dataset)[:5],
        **extra,
    }


@role_required(*READER_ROLES)
def dataset_detail(request: HttpRequest, name: str) -> HttpResponse:
    context = _dataset_context(request, _dataset_or_404(request, name))
    if request.htmx:
        return render(request, "datasets/_version_rows.html", context)
    return render(request, "datasets/dataset_detail.html", context)


@role_required(*WRITER_ROLES)
@require_POST
def dataset_import_create(request: HttpRequest, name: str) -> HttpResponse:
    """The dataset page's "Import from Hugging Face" form; the job runs on a worker."""
    dataset = _dataset_or_404(request, name)
    form = HfImportForm(request.POST)
    if form.is_valid():
        data = form.cleaned_data
        try:
            job = hub_imports.dataset_import_request(
                actor=request.user,
                dataset=dataset,
                repo_id=data["repo_id"],
                filename=data["filename"],
                revision=data["revision"],
                declared_shape=data["shape"],
                column_mapping=data["column_mapping"],
                tokenizer=data["tokenizer"],
                max_tokens=data["max_tokens"],
            )
        except ValidationError as exc:
            form.add_error(None, exc)
        else:
            messages.success(request, f"Import of {job} queued.")
            return redirect("datasets:detail", name=dataset.name)
    context = _dataset_context(request, dataset, hf_form=form)
    return render(request, "datasets/dataset_detail.html", context, status=400)


@role_required(*READER_ROLES)
def dataset_import_detail(request: HttpRequest, pk: int) -> HttpResponse:
    """An import's page or, for htmx, its status block (polled until it ends)."""
    try:
        job = selectors.dataset_import_get(user=request.user, pk=pk)
    except DatasetImport.DoesNotExist as exc:
        raise Http404("No such import.") from exc
    if request.htmx:
        return render(request, "registry/_import_status.html", {"job": job})
    return render(request, "datasets/import_detail.html", {"job": job})


@streamed_upload
@role_required(*WRITER_ROLES)
@require_POST
def version_upload(request: HttpRequest, name: str, handler: ArtifactUploadHandler) -> HttpResponse:
    """The upload form posts here (with a progress bar); answers JSON for the page's script."""
    dataset = _dataset_or_404(request, name)
    upload, message, code = received_file(request, handler)
    if upload is None:
        return JsonResponse({"error": message or "Choose a file to upload."}, status=code)
    form = UploadSettingsForm(request.POST)
    if not form.is_valid():
        errors = [f"{field}: {' '.join(e)}" for field, e in form.errors.items()]
        return JsonResponse({"error": " ".join(errors)}, status=400)
    data = form.cleaned_data
    try:
        version = ingest_upload(
            actor=request.user,
            dataset=dataset,
            upload=upload,
            via="web",
            declared_shape=data["shape"],
            column_mapping=data["column_mapping"],
            tokenizer=data["tokenizer"],
            max_tokens=data["max_tokens"],
        )
    except ValidationError as exc:
        return JsonResponse({"error": " ".join(exc.messages)}, status=400)
    except PermissionDenied as exc:
        return JsonResponse({"error": str(exc)}, status=403)
    messages.success(request, f"{version} uploaded; validating it now.")
    url = reverse("datasets:version", args=[version.pk])
    return JsonResponse({"version": version.pk, "url": url}, status=201)


def _histogram(report: dict) -> list[dict]:
    buckets = report.get("histogram") or []
    top = max((b["count"] for b in buckets), default=0) or 1
    return [{**b, "px": round(HISTOGRAM_BAR_PX * b["count"] / top)} for b in buckets]


def _version_context(request: HttpRequest, version: DatasetVersion) -> dict:
    transforms = list(selectors.dataset_transform_list(version=version))
    busy = version.state == State.VALIDATING or any(
        t.state in (JobState.QUEUED, JobState.RUNNING) for t in transforms
    )
    return {
        "version": version,
        "report": version.report,
        "histogram": _histogram(version.report),
        "transforms": transforms,
        "children": version.children.select_related("dataset"),
        "busy": busy,
        "can_write": _can_write(request.user, version.dataset),
        "split_form": SplitForm(),
        "filter_form": FilterForm(),
    }


@role_required(*READER_ROLES)
def version_detail(request: HttpRequest, pk: int) -> HttpResponse:
    version = _version_or_404(request, pk)
    context = _version_context(request, version)
    if request.htmx:
        if request.GET.get("was") == State.VALIDATING and version.state != State.VALIDATING:
            # Validation just ended: reload, so the preview and the derive forms appear.
            return HttpResponse(headers={"HX-Refresh": "true"})
        return render(request, "datasets/_version_status.html", context)
    context["page"] = _rows_page(request, version)
    return render(request, "datasets/version_detail.html", context)


def _rows_page(request: HttpRequest, version: DatasetVersion) -> dict:
    total = version.rows or 0
    paginator = Paginator(range(total), ROWS_PER_PAGE)
    page = paginator.get_page(request.GET.get("page"))
    start = (page.number - 1) * ROWS_PER_PAGE
    rows = selectors.dataset_version_rows(version=version, start=start, count=ROWS_PER_PAGE)
    return {"page": page, "rows": rows}


@role_required(*READER_ROLES)
def version_rows(request: HttpRequest, pk: int) -> HttpResponse:
    """The preview, one page of rows at a time (read by seeking, never the whole file)."""
    version = _version_or_404(request, pk)
    context = {"version": version, "page": _rows_page(request, version)}
    if request.htmx:
        return render(request, "datasets/_rows.html", context)
    return render(request, "datasets/version_rows.html", context)


@role_required(*WRITER_ROLES)
@require_POST
def version_derive(request: HttpRequest, pk: int, operation: str) -> HttpResponse:
    version = _version_or_404(request, pk)
    if operation not in Operation.values:
        raise Http404("No such operation.")
    form_class = {Operation.SPLIT: SplitForm, Operation.FILTER: FilterForm}.get(operation)
    params: dict = {}
    if form_class is not None:
        form = form_class(request.POST)
        if not form.is_valid():
            messages.error(request, " ".join(e for es in form.errors.values() for e in es))
            return redirect("datasets:version", pk=version.pk)
        params = form.cleaned_data
    try:
        job = transforms.dataset_transform_request(
            actor=request.user, version=version, operation=operation, params=params
        )
    except ValidationError as exc:
        messages.error(request, " ".join(exc.messages))
    else:
        messages.success(request, f"{job} queued.")
    return redirect("datasets:version", pk=version.pk)


@role_required(*READER_ROLES)
@require_POST  # with a CSRF token: each export is an audit event, which no other site may start
def version_export(request: HttpRequest, pk: int) -> HttpResponse:
    version = _version_or_404(request, pk)
    try:
        return export_response(request.user, version)
    except PermissionDenied as exc:
        raise PermissionDenied("Your role does not allow you to export this dataset.") from exc
    except ValidationError as exc:
        messages.error(request, " ".join(exc.messages))
        return redirect("datasets:version", pk=version.pk)
