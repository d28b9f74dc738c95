from __future__ import annotations

from django.contrib import messages
from django.core.exceptions import PermissionDenied, ValidationError
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.views.decorators.http import require_http_methods, require_POST

from apps.accounts.access import role_required
from apps.accounts.models import Role
from apps.finetune import selectors, services
from apps.finetune.forms import LaunchForm
from apps.finetune.models import LAUNCHER_ROLES, FineTuneJob

READER_ROLES = (*LAUNCHER_ROLES, Role.COMPLIANCE_OFFICER)


def _job_or_404(request: HttpRequest, pk: int) -> FineTuneJob:
    try:
        job = selectors.finetune_job_get(user=request.user, pk=pk)
    except FineTuneJob.DoesNotExist as exc:
        raise Http404("No such fine-tune.") from exc
    return job


def _estimate(form: LaunchForm) -> tuple[dict | None, str | None]:
    """(estimate, None), or (None, why not) for parameters the service would refuse."""
    try:
        params = services.clean_params(form.params())
    except ValidationError as exc:
        return None, " ".join(exc.messages)
    estimate = services.finetune_estimate(
        base_model=form.cleaned_data["base_model"],
        dataset_version=form.cleaned_data["dataset_version"],
        params=params,
    )
    return estimate, None


@role_required(*READER_ROLES)
@require_http_methods(["GET", "POST"])
def job_list(request: HttpRequest) -> HttpResponse:
    can_launch = request.user.has_role(*LAUNCHER_ROLES)
    initial = {"dataset_version": request.GET.get("dataset_version")}
    form = LaunchForm(request.POST or None, user=request.user, initial=initial)
    estimate = None
    if request.method == "POST":
        if not can_launch:
            raise PermissionDenied("Your role does not allow you to launch fine-tunes.")
        if form.is_valid():
            data = form.cleaned_data
            try:
                job = services.finetune_job_create(
                    actor=request.user,
                    base_model=data["base_model"],
                    dataset_version=data["dataset_version"],
                    validation_version=data["validation_version"],
                    params=form.params(),
                    output_repo=data["output_repo"],
                )
            except (ValidationError, PermissionDenied) as exc:
                for message in getattr(exc, "messages", [str(exc)]):
                    form.add_error(None, message)
            else:
                messages.success(request, f"{job} queued.")
                return redirect("finetune:job", pk=job.pk)
    if form.is_bound and form.is_valid():
        estimate, _ = _estimate(form)
    jobs = list(selectors.finetune_job_list(user=request.user)[:100])
    context = {
        "jobs": [(job, services.queue_position(job)) for job in jobs],
        "form": form,
        "can_launch": can_launch,
        "estimate": estimate,
        "active": any(job.active for job in jobs),
    }
    if request.htmx:
        return render(request, "finetune/_job_rows.html", context)
    return render(request, "finetune/job_list.html", context)


@role_required(*LAUNCHER_ROLES)
def job_estimate(request: HttpRequest) -> HttpResponse:
    """The launch form's live time and memory estimate (an htmx fragment)."""
    form = LaunchForm(request.GET, user=request.user)
    if form.is_valid():
        estimate, error = _estimate(form)
    else:
        estimate, error = None, "Choose a base model and training data to see an estimate."
    return render(request, "finetune/_estimate.html", {"estimate": estimate, "error": error})


def _job_context(request: HttpRequest, job: FineTuneJob) -> dict:
    return {
        "job": job,
        "chart": selectors.loss_chart(job.history),
        "position": services.queue_position(job),
        "can_manage": request.user.has_role(*LAUNCHER_ROLES)
        and (request.user.has_role(Role.ADMIN) or job.created_by_id == request.user.pk),
        "logs": job.logs[-200:],
        # Read only: the beat task (finetune.reap, every 30 s) marks such a job failed.
        "silent": selectors.finetune_job_silent(job),
    }


@role_required(*READER_ROLES)
def job_detail(request: HttpRequest, pk: int) -> HttpResponse:
    job = _job_or_404(request, pk)
    context = _job_context(request, job)
    if request.htmx:
        return render(request, "finetune/_job_status.html", context)
    return render(request, "finetune/job_detail.html", context)


@role_required(*LAUNCHER_ROLES)
@require_POST
def job_action(request: HttpRequest, pk: int, action: str) -> HttpResponse:
    job = _job_or_404(request, pk)
    service = {"cancel": services.finetune_job_cancel, "retry": services.finetune_job_retry}.get(
        action
    )
    if service is None:
        raise Http404("No such action.")
    try:
        service(actor=request.user, job=job)
    except ValidationError as exc:
        messages.error(request, " ".join(exc.messages))
    else:
        done = "cancelling" if action == "cancel" else "queued again"
        messages.success(request, f"{job}: {done}.")
    return redirect("finetune:job", pk=job.pk)
