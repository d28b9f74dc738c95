"""Pages: the optimisation panel of a model version, job and evaluation pages, and the
comparison of a model's versions by quality, size and speed."""

from __future__ import annotations

from typing import Any

from django.contrib import messages
from django.core.exceptions import PermissionDenied, ValidationError
from django.forms import Form
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.views.decorators.http import require_GET, require_http_methods

from apps.accounts.access import login_required
from apps.optimise import selectors, services
from apps.optimise.forms import EvaluateForm, ExportForm, QuantizeForm
from apps.optimise.models import LAUNCHER_ROLES, Evaluation, ModelJob
from apps.registry.models import ModelRepo, ModelVersion
from workers.optimise.quantize import is_quantised


def _version(pk: int) -> ModelVersion:
    return get_object_or_404(ModelVersion.objects.select_related("repo", "artifact"), pk=pk)


def _add_errors(form: Form, exc: ValidationError) -> None:
    """A service's field errors on the form's fields; the rest above the form."""
    if not hasattr(exc, "error_dict"):
        form.add_error(None, exc)
        return
    for name, errors in exc.message_dict.items():
        form.add_error(name if name in form.fields else None, errors)


def _forms(request: HttpRequest, version: ModelVersion, **bound: Form) -> dict[str, Form]:
    return {
        "quantize_form": bound.get("quantize") or QuantizeForm(user=request.user),
        "export_form": bound.get("export") or ExportForm(),
        "evaluate_form": bound.get("evaluate") or EvaluateForm(user=request.user),
    }


def _panel_context(request: HttpRequest, version: ModelVersion, **bound: Form) -> dict[str, Any]:
    return {
        "version": version,
        "can_launch": request.user.has_role(*LAUNCHER_ROLES),
        "quantised": is_quantised(version.quantization),
        "jobs": selectors.model_job_list(user=request.user, version=version)[:20],
        "evaluations": selectors.evaluation_list(user=request.user, version=version)[:50],
        **_forms(request, version, **bound),
    }


@login_required
@require_GET
def version_panel(request: HttpRequest, pk: int) -> HttpResponse:
    """The version page's 'Optimise and evaluate' card (loaded by htmx, or as a page)."""
    version = _version(pk)
    context = _panel_context(request, version)
    template = "optimise/_panel.html" if request.htmx else "optimise/panel.html"
    return render(request, template, context)


def _launch(request: HttpRequest, pk: int, name: str, form: Form, start: Any) -> HttpResponse:
    version = _version(pk)
    if request.method == "POST":
        if not request.user.has_role(*LAUNCHER_ROLES):
            raise PermissionDenied("Your role does not allow you to optimise or evaluate models.")
        if form.is_valid():
            try:
                job = start(version, form.cleaned_data)
            except ValidationError as exc:
                _add_errors(form, exc)
            else:
                messages.success(request, f"{job} queued.")
                return redirect(job.get_absolute_url())
    context = _panel_context(request, version, **{name: form})
    return render(request, "optimise/panel.html", context, status=400 if form.errors else 200)


@login_required
@require_http_methods(["GET", "POST"])
def quantize(request: HttpRequest, pk: int) -> HttpResponse:
    def start(version: ModelVersion, data: dict) -> ModelJob:
        return services.quantize_request(
            actor=request.user,
            source=version,
            quant_type=data["quant_type"],
            allow_requantize=data["allow_requantize"],
            output_repo=data["output_repo"],
            imatrix_dataset=data["imatrix_dataset"],
            imatrix_chunks=data["imatrix_chunks"] or 32,
        )

    form = QuantizeForm(request.POST if request.method == "POST" else None, user=request.user)
    return _launch(request, pk, "quantize", form, start)


@login_required
@require_http_methods(["GET", "POST"])
def export(request: HttpRequest, pk: int) -> HttpResponse:
    def start(version: ModelVersion, data: dict) -> ModelJob:
        return services.export_request(
            actor=request.user,
            source=version,
            adapter=data["adapter"],
            out_type=data["out_type"],
            adapter_scale=data["adapter_scale"],
            output_repo=data["output_repo"],
        )

    form = ExportForm(request.POST if request.method == "POST" else None)
    return _launch(request, pk, "export", form, start)


@login_required
@require_http_methods(["GET", "POST"])
def evaluate(request: HttpRequest, pk: int) -> HttpResponse:
    def start(version: ModelVersion, data: dict) -> Evaluation:
        return services.evaluation_request(
            actor=request.user,
            model_version=version,
            dataset_version=data["dataset_version"],
            adapter=data["adapter"],
            reference=data["reference"],
            n_ctx=data["n_ctx"],
            max_chunks=data["max_chunks"],
            max_items=data["max_items"],
        )

    form = EvaluateForm(request.POST if request.method == "POST" else None, user=request.user)
    return _launch(request, pk, "evaluate", form, start)


@login_required
@require_GET
def job_detail(request: HttpRequest, pk: int) -> HttpResponse:
    job = selectors.model_job_list(user=request.user).filter(pk=pk).first()
    if job is None:
        raise Http404("No such job.")
    template = "optimise/_job_state.html" if request.htmx else "optimise/job_detail.html"
    return render(request, template, {"job": job})


@login_required
@require_GET
def evaluation_detail(request: HttpRequest, pk: int) -> HttpResponse:
    evaluation = selectors.evaluation_list(user=request.user).filter(pk=pk).first()
    if evaluation is None:
        raise Http404("No such evaluation.")
    template = (
        "optimise/_evaluation_state.html" if request.htmx else "optimise/evaluation_detail.html"
    )
    return render(request, template, {"evaluation": evaluation})


@login_required
@require_GET
def compare(request: HttpRequest, name: str) -> HttpResponse:
    repo = get_object_or_404(ModelRepo, name=name)
    return render(
        request,
        "optimise/compare.html",
        {"repo": repo, "comparison": selectors.comparison(user=request.user, repo=repo)},
    )
