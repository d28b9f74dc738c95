from __future__ import annotations

from django.contrib import messages
from django.core.exceptions import PermissionDenied, ValidationError
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.views.decorators.http import require_http_methods, require_POST

from apps.accounts.access import login_required
from apps.deployments import selectors as deployment_selectors
from apps.deployments.services import SwitchNeedsRoom
from apps.registry.models import ModelVersion
from apps.setups import plots, recipes, selectors, services
from apps.setups.forms import AdviseForm, ApplyForm, DeployForm, RecipeImportForm, SwitchForm
from apps.setups.models import Experience, Setup, TrialState, UseCase


def _can_manage(request: HttpRequest) -> bool:
    return request.user.has_role(*services.MANAGER_ROLES)


def _require_manager(request: HttpRequest, doing: str) -> None:
    if not _can_manage(request):
        raise PermissionDenied(f"Only admins may {doing}.")


def _setup_or_404(request: HttpRequest, name: str) -> Setup:
    setup = selectors.setup_list(user=request.user).filter(name=name).first()
    if setup is None:
        raise Http404("No such setup.")
    return setup


def _serving_workers() -> list[str]:
    return [w.hostname for w in deployment_selectors.worker_list() if w.serving]


@login_required
def setup_list(request: HttpRequest) -> HttpResponse:
    trials = selectors.trial_list(user=request.user)
    succeeded = [t for t in trials[:200] if t.state == TrialState.SUCCEEDED]
    return render(
        request,
        "setups/setup_list.html",
        {
            "setups": selectors.setup_list(user=request.user),
            "trials": trials[:50],
            "plot": plots.trial_plot(succeeded),
            "can_manage": _can_manage(request),
        },
    )


@login_required
@require_http_methods(["GET", "POST"])
def advisor(request: HttpRequest) -> HttpResponse:
    workers = _serving_workers()
    form = AdviseForm(request.GET or None, workers=workers)
    advice = None
    if request.method == "POST":
        _require_manager(request, "deploy or try the advisor's setups")
        apply = ApplyForm(request.POST, workers=workers)
        if apply.is_valid():
            data = apply.cleaned_data
            version = ModelVersion.objects.filter(pk=data["model_version"]).first()
            if version is None:
                raise Http404("No such model version.")
            try:
                setup, outcome = services.candidate_apply(
                    actor=request.user,
                    use_case=data["use_case"],
                    experience=data["experience"],
                    model_version=version,
                    worker=data["worker"] or None,
                    action=data["action"],
                )
            except ValidationError as exc:
                messages.error(request, " ".join(exc.messages))
            else:
                if data["action"] == "trial":
                    messages.success(request, f"Setup {setup.name} saved; its trial is queued.")
                    return redirect("setups:detail", name=setup.name)
                messages.success(request, f"Setup {setup.name} deployed as {outcome.name}.")
                return redirect("deployments:detail", name=outcome.name)
        form = AdviseForm(request.POST, workers=workers)
    if form.is_bound and form.is_valid():
        try:
            advice = selectors.advice(
                use_case=form.cleaned_data["use_case"],
                experience=form.cleaned_data["experience"],
                worker=form.cleaned_data["worker"] or None,
            )
        except ValidationError as exc:
            form.add_error("worker", exc.messages[0])
    return render(
        request,
        "setups/advisor.html",
        {"form": form, "advice": advice, "can_manage": _can_manage(request)},
    )


@login_required
@require_http_methods(["GET", "POST"])
def setup_detail(request: HttpRequest, name: str) -> HttpResponse:
    setup = _setup_or_404(request, name)
    deploy_form = DeployForm(request.POST or None, initial={"name": setup.name})
    if request.method == "POST":
        _require_manager(request, "deploy setups")
        if deploy_form.is_valid():
            try:
                deployment = services.setup_deploy(
                    actor=request.user, setup=setup, **deploy_form.cleaned_data
                )
            except ValidationError as exc:
                deploy_form.add_error(None, " ".join(exc.messages))
            else:
                messages.success(request, f"Setup {setup.name} deployed as {deployment.name}.")
                return redirect("deployments:detail", name=deployment.name)
    trials = selectors.trial_list(user=request.user).filter(setup=setup)
    context = {
        "setup": setup,
        "trials": trials,
        "running": any(t.state in (TrialState.QUEUED, TrialState.RUNNING) for t in trials),
        "deploy_form": deploy_form,
        "workers": _serving_workers(),
        "can_manage": _can_manage(request),
    }
    if request.htmx and request.method == "GET":
        return render(request, "setups/_trials.html", context)
    return render(request, "setups/setup_detail.html", context)


@login_required
@require_POST
def trial_start(request: HttpRequest, name: str) -> HttpResponse:
    setup = _setup_or_404(request, name)
    _require_manager(request, "run trials")
    try:
        services.trial_request(
            actor=request.user, setup=setup, worker=request.POST.get("worker") or None
        )
    except ValidationError as exc:
        messages.error(request, " ".join(exc.messages))
    else:
        messages.success(request, "Trial queued.")
    return redirect("setups:detail", name=setup.name)


@login_required
@require_POST
def recipe_export(request: HttpRequest, name: str) -> HttpResponse:
    # POST (with the CSRF token): the export is audited, so another site must not be
    # able to make a signed-in browser fetch it.
    setup = _setup_or_404(request, name)
    _require_manager(request, "export recipes")
    data = services.setup_export(actor=request.user, setup=setup)
    response = HttpResponse(data, content_type="application/yaml; charset=utf-8")
    response["Content-Disposition"] = f'attachment; filename="{setup.name}.recipe.yaml"'
    return response


@login_required
@require_http_methods(["GET", "POST"])
def recipe_list(request: HttpRequest) -> HttpResponse:
    form = RecipeImportForm(request.POST or None, request.FILES or None)
    missing = None
    if request.method == "POST":
        _require_manager(request, "import recipes")
        if form.is_valid():
            upload = form.cleaned_data["file"]
            if upload.size > recipes.MAX_RECIPE_BYTES:
                form.add_error(
                    "file", f"A recipe file is at most {recipes.MAX_RECIPE_BYTES // 1024} KiB."
                )
            else:
                try:
                    outcome = services.recipe_import(
                        actor=request.user,
                        data=upload.read(),
                        name=form.cleaned_data["name"] or None,
                    )
                except ValidationError as exc:
                    form.add_error(None, " ".join(exc.messages))
                else:
                    if outcome.setup is None:
                        missing = outcome.as_dict()
                    else:
                        if not outcome.recipe.trusted:
                            messages.warning(request, outcome.as_dict()["warning"])
                        messages.success(request, f"Recipe imported as setup {outcome.setup.name}.")
                        return redirect("setups:detail", name=outcome.setup.name)
    builtin = recipes.builtin_recipes()
    filters = {k: request.GET.get(k, "") for k in ("use_case", "experience", "hardware")}
    hardware_classes = sorted(
        {f["hardware"].get("hardware_class", "") for r in builtin for f in r.document["figures"]}
        - {""}
    )
    if filters["use_case"]:
        builtin = [r for r in builtin if r.document["use_case"] == filters["use_case"]]
    if filters["experience"]:
        builtin = [r for r in builtin if r.document["experience"] == filters["experience"]]
    if filters["hardware"]:
        builtin = [
            r
            for r in builtin
            if any(
                f["hardware"].get("hardware_class") == filters["hardware"]
                for f in r.document["figures"]
            )
        ]
    return render(
        request,
        "setups/recipe_list.html",
        {
            "builtin": builtin,
            "filters": filters,
            "use_cases": UseCase.choices,
            "experiences": Experience.choices,
            "hardware_classes": hardware_classes,
            "imported": selectors.setup_list(user=request.user).filter(origin="recipe"),
            "form": form,
            "missing": missing,
            "can_manage": _can_manage(request),
            "box_key": services.public_key().fingerprint,
        },
    )


@login_required
@require_POST
def recipe_use(request: HttpRequest, name: str) -> HttpResponse:
    """Save one of the built-in recipes as a setup."""
    _require_manager(request, "import recipes")
    recipe = next((r for r in recipes.builtin_recipes() if r.document["name"] == name), None)
    if recipe is None:
        raise Http404("No such built-in recipe.")
    outcome = services.recipe_apply(actor=request.user, recipe=recipe)
    if outcome.setup is None:
        messages.error(request, outcome.as_dict()["detail"])
        return redirect("setups:recipes")
    messages.success(request, f"Recipe {name} saved as setup {outcome.setup.name}.")
    return redirect("setups:detail", name=outcome.setup.name)


@login_required
@require_http_methods(["GET", "POST"])
def switch(request: HttpRequest, deployment: str) -> HttpResponse:
    """Switch a deployment to a setup (the form sits on the deployment's page)."""
    _require_manager(request, "switch deployments")
    target = deployment_selectors.deployment_list(user=request.user).filter(name=deployment).first()
    if target is None:
        raise Http404("No such deployment.")
    form = SwitchForm(request.POST or None, setups=selectors.setup_list(user=request.user))
    needs_room = None
    if request.method == "POST" and form.is_valid():
        try:
            revision = services.setup_switch(
                actor=request.user,
                setup=form.cleaned_data["setup"],
                deployment=target,
                stop_then_start=form.cleaned_data["stop_then_start"],
            )
        except SwitchNeedsRoom as exc:
            needs_room = exc.interruption_seconds
            form.add_error(None, " ".join(exc.messages))
        except ValidationError as exc:
            form.add_error(None, " ".join(exc.messages))
        else:
            messages.success(
                request,
                f"{target.name}: revision {revision.number} ({form.cleaned_data['setup'].name}) "
                + (
                    "is loading beside the serving one; traffic moves to it once it is ready."
                    if revision.state == "pending"
                    else "is starting."
                ),
            )
            return redirect("deployments:detail", name=target.name)
    context = {"form": form, "deployment": target, "needs_room": needs_room}
    template = "setups/_switch_form.html" if request.htmx else "setups/switch.html"
    return render(request, template, context)


@login_required
def fit_notes(request: HttpRequest) -> HttpResponse:
    """What the deployments page says about running deployments and today's workers."""
    return render(
        request, "setups/_fit_notes.html", {"notes": selectors.fit_notes(user=request.user)}
    )
