from __future__ import annotations

from django.contrib import messages
from django.core.exceptions import PermissionDenied, ValidationError
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.views.decorators.http import require_http_methods, require_POST

from apps.accounts.access import login_required, role_required
from apps.deployments import placement, selectors, services
from apps.deployments.forms import DeploymentForm, LoadOnDemandForm, ScaleForm
from apps.deployments.models import (
    INFERENCE_ROLES,
    MANAGER_ROLES,
    SERVING_MODE_TRADEOFF,
    Deployment,
    RevisionState,
    State,
)

SETTLED = {State.READY, State.STOPPED, State.FAILED, State.IDLE}


def _deployment_or_404(request: HttpRequest, name: str) -> Deployment:
    deployment = selectors.deployment_list(user=request.user).filter(name=name).first()
    if deployment is None:
        raise Http404("No such deployment.")
    return deployment


def _replicas(deployment: Deployment, workers) -> list[tuple]:
    """(replica, what clients get from it now) pairs."""
    live = selectors.replica_live_states(deployment, workers)
    return [(r, live[r.pk]) for r in deployment.replica_set.all()]


def _rows(deployments, workers) -> list[dict]:
    return [{"deployment": d, "replicas": _replicas(d, workers)} for d in deployments]


@login_required
@require_http_methods(["GET", "POST"])
def deployment_list(request: HttpRequest) -> HttpResponse:
    can_manage = request.user.has_role(*MANAGER_ROLES)
    form = DeploymentForm(request.POST or None)
    if request.method == "POST":
        if not can_manage:
            raise PermissionDenied("Only admins may create deployments.")
        if form.is_valid():
            data = dict(form.cleaned_data)
            try:
                deployment = services.deployment_create(
                    actor=request.user,
                    name=data.pop("name"),
                    model_version=data.pop("model_version"),
                    **data,
                )
            except ValidationError as exc:
                form.add_error(None, exc)
            else:
                messages.success(request, f"Deployment {deployment.name} created.")
                return redirect("deployments:detail", name=deployment.name)
    workers = selectors.worker_list()
    deployments = selectors.deployment_list(user=request.user)
    context = {
        "rows": _rows(deployments, workers),
        "workers": workers,
        "form": form,
        "can_manage": can_manage,
        "settling": any(d.state not in SETTLED for d in deployments),
    }
    if request.htmx and request.method == "GET":
        return render(request, "deployments/_deployment_rows.html", context)
    return render(request, "deployments/deployment_list.html", context)


@login_required
def deployment_detail(request: HttpRequest, name: str) -> HttpResponse:
    deployment = _deployment_or_404(request, name)
    workers = selectors.worker_list()
    estimate = placement.estimate_for(deployment)
    revisions = list(deployment.revisions.select_related("model_version__repo", "adapter__repo"))
    context = {
        "deployment": deployment,
        "replicas": _replicas(deployment, workers),
        "estimate": estimate,
        "serving_mode_tradeoff": SERVING_MODE_TRADEOFF,
        "can_manage": request.user.has_role(*MANAGER_ROLES),
        "can_use": request.user.has_role(*INFERENCE_ROLES),
        "scale_form": ScaleForm(initial={"replicas": deployment.replicas}),
        "on_demand_form": LoadOnDemandForm(instance=deployment),
        "revisions": revisions,
        # Polled while it loads, and while a switch loads or drains beside it.
        "settling": deployment.state not in SETTLED
        or any(r.state == RevisionState.PENDING for r in revisions)
        or any(r.state == State.STOPPING for r in deployment.replica_set.all()),
    }
    if request.htmx:
        part = "_revisions" if request.GET.get("part") == "revisions" else "_deployment_state"
        return render(request, f"deployments/{part}.html", context)
    return render(request, "deployments/deployment_detail.html", context)


@role_required(*MANAGER_ROLES)
@require_POST
def deployment_action(request: HttpRequest, name: str, action: str) -> HttpResponse:
    deployment = _deployment_or_404(request, name)
    try:
        if action == "rollback":
            number = request.POST.get("revision", "")
            if not number.isdigit():
                raise ValidationError("Choose a revision to roll back to.")
            services.deployment_rollback(
                actor=request.user, deployment=deployment, number=int(number)
            )
        elif action == "load-on-demand":
            form = LoadOnDemandForm(request.POST, instance=deployment)
            if not form.is_valid():
                raise ValidationError(
                    [
                        f"{form.fields[f].label}: {m}" if f in form.fields else m
                        for f, errors in form.errors.items()
                        for m in errors
                    ]
                )
            services.deployment_load_on_demand_set(
                actor=request.user, deployment=deployment, **form.cleaned_data
            )
        elif action == "scale":
            form = ScaleForm(request.POST)
            if not form.is_valid():
                raise ValidationError("Give a number of replicas from 1 to 16.")
            services.deployment_scale(
                actor=request.user, deployment=deployment, replicas=form.cleaned_data["replicas"]
            )
        else:
            service = {
                "start": services.deployment_start,
                "stop": services.deployment_stop,
                "restart": services.deployment_restart,
            }.get(action)
            if service is None:
                raise Http404("No such action.")
            service(actor=request.user, deployment=deployment)
    except ValidationError as exc:
        messages.error(request, " ".join(exc.messages))
    else:
        done = "load on demand saved" if action == "load-on-demand" else f"{action} requested"
        messages.success(request, f"{deployment.name}: {done}.")
    return redirect("deployments:detail", name=deployment.name)


@login_required
def worker_list(request: HttpRequest) -> HttpResponse:
    context = {"workers": selectors.worker_list()}
    template = "deployments/_workers.html" if request.htmx else "deployments/worker_list.html"
    return render(request, template, context)


@role_required(*INFERENCE_ROLES)
def playground(request: HttpRequest) -> HttpResponse:
    deployments = selectors.deployment_list(user=request.user).filter(running=True)
    chosen = request.GET.get("deployment") or (deployments[0].name if deployments else "")
    return render(
        request,
        "deployments/playground.html",
        {"deployments": deployments, "chosen": chosen},
    )
