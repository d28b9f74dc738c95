"""Setups and trials: create a setup, deploy it, and measure it on a worker.

Admins change setups; every change is one transaction with one audit event. Workers
report a trial's progress and figures through Redis (a Celery task on the control queue)
and ``trial_report_apply`` persists them idempotently.

About 500 lines on purpose: a setup and its trials are one subject (a trial measures a
setup, and its figures are what recipes carry); recipes' format is ``recipe_format``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from django.conf import settings as django_settings
from django.core.exceptions import ValidationError
from django.db import transaction
from django.utils import timezone

from apps.accounts.models import Role, User
from apps.accounts.services import require_role, system_user
from apps.audit.chain import format_timestamp
from apps.audit.models import Outcome
from apps.audit.services import audit_record
from apps.audit.signing import public_key
from apps.deployments import selectors as deployment_selectors
from apps.deployments.checks import deployment_settings_check, deployment_values_check
from apps.deployments.models import Deployment, Revision, SplitMode, tensor_split_parse
from apps.deployments.placement import worker_task_send
from apps.deployments.services import deployment_create, deployment_switch
from apps.registry.artifacts import artifact_store
from apps.registry.models import Format, ModelVersion
from apps.setups import advisor, recipe_format, recipes, selectors
from apps.setups.models import SETUP_SETTINGS, Origin, RevisionSetup, Setup, Trial, TrialState
from workers.inference.protocol import ReplicaSpec

MANAGER_ROLES = (Role.ADMIN,)
# Trial figures a worker reports, as stored on the trial and carried by recipes.
TRIAL_FIGURES = recipe_format.FIGURE_VALUES


def setup_create(
    *,
    actor: User,
    name: str,
    use_case: str,
    experience: str,
    model_version: ModelVersion,
    notes: str = "",
    origin: str = Origin.MANUAL,
    recipe_signer: str = "",
    recipe_signer_trusted: bool = False,
    **values: Any,
) -> Setup:
    """Save a setup: a model version with runtime settings, for a use case and experience.

    The model need not be approved yet (a recipe may name one under review); deploying
    or trying the setup checks that.
    """
    require_role(actor, MANAGER_ROLES, "create setups")
    unknown = set(values) - set(SETUP_SETTINGS)
    if unknown:
        raise ValidationError(f"Unknown setup setting(s): {', '.join(sorted(unknown))}.")
    if Setup.objects.filter(name=name).exists():
        raise ValidationError({"name": f"A setup named '{name}' already exists."})
    setup = Setup(
        name=name,
        use_case=use_case,
        experience=experience,
        model_version=model_version,
        notes=notes,
        origin=origin,
        recipe_signer=recipe_signer,
        recipe_signer_trusted=recipe_signer_trusted,
        created_by=actor,
        **values,
    )
    setup.full_clean()
    deployment_values_check(version=model_version, values=_deployment_values(setup))
    with transaction.atomic():
        setup.save()
        audit_record(
            actor=actor,
            action="setup.create",
            target=setup,
            details={
                "model_version": model_version.pk,
                "sha256": model_version.sha256,
                "use_case": use_case,
                "experience": experience,
                "origin": origin,
                "recipe_signer": recipe_signer,
                "settings": setup.settings_dict(),
            },
        )
    return setup


def _deployment_values(setup: Setup) -> dict[str, Any]:
    return {field: getattr(setup, field) for field in SETUP_SETTINGS}


def setup_deploy(*, actor: User, setup: Setup, name: str, replicas: int = 1) -> Deployment:
    """Serve a setup under a public name (a new deployment running it)."""
    require_role(actor, MANAGER_ROLES, "deploy setups")
    with transaction.atomic():
        deployment = deployment_create(
            actor=actor,
            name=name,
            model_version=setup.model_version,
            replicas=replicas,
            **_deployment_values(setup),
        )
        RevisionSetup.objects.create(revision=deployment.revision, setup=setup)
        audit_record(
            actor=actor,
            action="setup.deploy",
            target=setup,
            details={"deployment": deployment.name, "deployment_id": deployment.pk},
        )
    return deployment


def setup_switch(
    *, actor: User, setup: Setup, deployment: Deployment, stop_then_start: bool = False
) -> Revision:
    """Switch a running deployment to this setup under the same public name (a new
    revision: loaded beside the serving one, then given the traffic)."""
    require_role(actor, MANAGER_ROLES, "switch deployments")
    with transaction.atomic():
        revision = deployment_switch(
            actor=actor,
            deployment=deployment,
            model_version=setup.model_version,
            label=f"setup {setup.name}",
            stop_then_start=stop_then_start,
            **_deployment_values(setup),
        )
        RevisionSetup.objects.create(revision=revision, setup=setup)
        audit_record(
            actor=actor,
            action="setup.switch",
            target=setup,
            details={"deployment": deployment.name, "revision": revision.number},
        )
    return revision


def _trial_worker(setup: Setup, hostname: str | None) -> advisor.Fit:
    """Where to run the trial: the worker asked for, or the roomiest that holds the
    setup (and on a GPU worker, its roomiest GPU)."""
    workers = [w for w in deployment_selectors.worker_list() if w.serving]
    if hostname:
        workers = [w for w in workers if w.hostname == hostname]
        if not workers:
            raise ValidationError({"worker": f"The worker '{hostname}' is not online and serving."})
    if not workers:
        raise ValidationError({"worker": "No worker is online to run the trial."})
    fits = advisor.fits_on(setup.model_version, setup.settings_dict(), workers)
    fitting = [f for f in fits if f.fits]
    if not fitting:
        roomiest = max(fits, key=lambda f: f.free_bytes)
        raise ValidationError(
            {
                "worker": f"The setup needs about {roomiest.needed_bytes // 2**20:,} MiB; "
                f"{roomiest.where} has {max(roomiest.free_bytes, 0) // 2**20:,} MiB free."
            }
        )
    return max(fitting, key=lambda f: f.free_bytes)


def _trial_spec(trial: Trial, gpu_index: int | None) -> dict[str, Any]:
    setup = trial.setup
    version, adapter = setup.model_version, setup.adapter
    store = artifact_store()
    replica = ReplicaSpec(
        replica_id=-trial.pk,
        generation=1,
        deployment_id=0,
        deployment_name=f"trial-{trial.pk}",
        sha256=version.sha256,
        source_path=str(store.path_for(version.sha256)),
        adapter_sha256=adapter.sha256 if adapter else "",
        adapter_source_path=str(store.path_for(adapter.sha256)) if adapter else "",
        adapter_scale=setup.adapter_scale,
        architecture=version.architecture,
        context_length=setup.context_length,
        threads=setup.threads,
        gpu_layers=setup.gpu_layers if gpu_index is not None else 0,
        gpu_index=gpu_index,
        split_mode=setup.split_mode if gpu_index is not None else SplitMode.NONE,
        tensor_split=tensor_split_parse(setup.tensor_split) if gpu_index is not None else [],
        batch_size=setup.batch_size,
        parallel_slots=setup.parallel_slots,
        kv_cache_type=setup.kv_cache_type,
        flash_attention=setup.flash_attention,
        serving_mode=setup.serving_mode,
        chat_template=setup.chat_template,
        has_chat_template=version.has_chat_template,
        queue_size=max(8, setup.parallel_slots * 2),
        stream_interval_ms=0,
    )
    return {"trial_id": trial.pk, "replica": replica.as_dict()}


def trial_request(*, actor: User, setup: Setup, worker: str | None = None) -> Trial:
    """Queue a trial of ``setup`` on a worker (the roomiest that fits, unless named)."""
    require_role(actor, MANAGER_ROLES, "run trials")
    deployment_settings_check(version=setup.model_version, values=_deployment_values(setup))
    place = _trial_worker(setup, worker)
    hostname = place.worker
    with transaction.atomic():
        trial = Trial.objects.create(setup=setup, worker=hostname, created_by=actor)
        audit_record(
            actor=actor,
            action="trial.request",
            target=setup,
            details={"trial": trial.pk, "worker": hostname},
        )
        spec = _trial_spec(trial, place.gpu_index)

        # Runs in the placed worker's process (worker_tasks.py), sent by name.
        transaction.on_commit(lambda: worker_task_send("setups.trial_run", hostname, spec))
    return trial


def trial_report_apply(
    *,
    trial_id: int,
    state: str,
    progress: int = 0,
    message: str = "",
    reason: str = "",
    result: dict[str, Any] | None = None,
) -> bool:
    """Persist what a worker reported about a trial; True if it changed anything.

    Reports arrive at least once and possibly late: a running report only moves a queued
    or running trial, and a finished trial never changes again.
    """
    now = timezone.now()
    open_states = [TrialState.QUEUED, TrialState.RUNNING]
    trials = Trial.objects.filter(pk=trial_id, state__in=open_states)
    if state == TrialState.RUNNING:
        changed = trials.update(
            state=TrialState.RUNNING,
            progress=max(0, min(progress, 99)),
            progress_message=message[:200],
        )
        Trial.objects.filter(pk=trial_id, started_at__isnull=True).update(started_at=now)
        return bool(changed)
    if state not in (TrialState.SUCCEEDED, TrialState.FAILED):
        raise ValueError(f"unknown trial state {state!r}")
    result = result or {}
    with transaction.atomic():
        trial = trials.select_for_update().first()
        if trial is None:
            return False
        trial.state = state
        trial.reason = reason
        trial.finished_at = now
        trial.started_at = trial.started_at or now
        if state == TrialState.SUCCEEDED:
            trial.progress, trial.progress_message = 100, "Done."
            for figure in TRIAL_FIGURES:
                setattr(trial, figure, result.get(figure))
            trial.details = result.get("details", {})
            trial.hardware = result.get("hardware", {})
            trial.hardware_class = trial.hardware.get("hardware_class", "")[:200]
        trial.save()
        audit_record(
            actor=system_user(),
            action=f"trial.{state}",
            target=trial.setup,
            outcome=Outcome.SUCCESS if state == TrialState.SUCCEEDED else Outcome.FAILURE,
            details={
                "trial": trial.pk,
                "worker": trial.worker,
                "reason": reason,
                **{f: result.get(f) for f in TRIAL_FIGURES if state == TrialState.SUCCEEDED},
            },
        )
    return True


def trial_reap(*, older_than_seconds: float = 900) -> int:
    """Fail trials whose worker went away: queued or running, their worker offline, and
    not heard of for ``older_than_seconds``. Run by beat."""
    online = {w.hostname for w in deployment_selectors.worker_list() if w.online}
    cutoff = timezone.now() - timezone.timedelta(seconds=older_than_seconds)
    stale = Trial.objects.filter(
        state__in=[TrialState.QUEUED, TrialState.RUNNING], created_at__lt=cutoff
    ).exclude(worker__in=online)
    reaped = 0
    for trial_id, worker in stale.values_list("pk", "worker"):
        reaped += trial_report_apply(
            trial_id=trial_id,
            state=TrialState.FAILED,
            reason=f"The worker {worker} went offline before the trial finished.",
        )
    return reaped


def candidate_apply(
    *,
    actor: User,
    use_case: str,
    experience: str,
    model_version: ModelVersion,
    action: str,
    worker: str | None = None,
    name: str | None = None,
    deployment_name: str | None = None,
) -> tuple[Setup, Deployment | Trial]:
    """Save the advisor's candidate for ``model_version`` as a setup, then deploy it or
    run a trial of it (``action``: "deploy" or "trial"), all or nothing."""
    require_role(actor, MANAGER_ROLES, "apply the advisor's setups")
    advice = selectors.advice(use_case=use_case, experience=experience, worker=worker)
    candidate = next((c for c in advice.candidates if c.version.pk == model_version.pk), None)
    if candidate is None:
        raise ValidationError(
            {"model_version": f"{model_version} is not an approved GGUF model the box can run."}
        )
    if not candidate.suitable or (action == "deploy" and not candidate.fits_somewhere):
        raise ValidationError({"model_version": " ".join(candidate.why_not)})
    name = name or _free_name(candidate.name)
    with transaction.atomic():
        setup = setup_create(
            actor=actor,
            name=name,
            use_case=use_case,
            experience=experience,
            model_version=model_version,
            notes="Proposed by the advisor: " + "; ".join(candidate.reasons) + ".",
            origin=Origin.ADVISOR,
            **candidate.settings,
        )
        if action == "trial":
            return setup, trial_request(actor=actor, setup=setup, worker=worker)
        return setup, setup_deploy(
            actor=actor, setup=setup, name=deployment_name or _free_name(name, Deployment)
        )


def _free_name(base: str, model: type[Setup] | type[Deployment] = Setup) -> str:
    """``base``, or ``base-2``, ``base-3``... whichever no setup (or deployment) has."""
    name, n = base, 1
    while model.objects.filter(name=name).exists():
        n += 1
        name = f"{base[:95]}-{n}"
    return name


# -- recipes -----------------------------------------------------------------------


def _model_entry(version: ModelVersion) -> dict[str, Any]:
    return {
        "sha256": version.sha256,
        "file_name": version.file_name,
        "size_bytes": version.size,
        "architecture": version.architecture,
        "quantization": version.quantization,
        "parameter_count": version.parameter_count,
        "licence": version.repo.licence,
        "source": recipes.recipe_source(
            source_kind=version.source_kind, source=version.source or {}
        ),
    }


def _figures(setup: Setup) -> list[dict[str, Any]]:
    trials = setup.trials.filter(state=TrialState.SUCCEEDED).order_by("-finished_at")[:20]
    return [
        {
            **{figure: getattr(trial, figure) for figure in TRIAL_FIGURES},
            "hardware": {**trial.hardware, "hardware_class": trial.hardware_class},
            "measured_at": format_timestamp(trial.finished_at),
        }
        for trial in trials
    ]


def setup_export(*, actor: User, setup: Setup) -> bytes:
    """The setup as a recipe file signed with the box's key, with its trials' figures."""
    require_role(actor, MANAGER_ROLES, "export recipes")
    adapter = None
    if setup.adapter is not None:
        adapter = {**_model_entry(setup.adapter), "scale": setup.adapter_scale}
    document = recipes.recipe_document(
        name=setup.name,
        notes=setup.notes,
        use_case=setup.use_case,
        experience=setup.experience,
        model=_model_entry(setup.model_version),
        adapter=adapter,
        settings=setup.settings_dict(),
        figures=_figures(setup),
        exported_at=format_timestamp(timezone.now()),
    )
    data = recipes.recipe_dump(document)
    audit_record(
        actor=actor,
        action="setup.export",
        target=setup,
        details={
            "recipe_sha256": hashlib.sha256(data).hexdigest(),
            "key": public_key().fingerprint,
        },
    )
    return data


def trusted_recipe_keys() -> set[str]:
    """Fingerprints of the keys whose recipes this box trusts: its own and configured ones."""
    return {public_key().fingerprint, *django_settings.RECIPE_TRUSTED_KEYS}


@dataclass(frozen=True)
class RecipeImport:
    """What importing a recipe did: the setup it created, or the model it lacks."""

    recipe: recipes.Recipe
    setup: Setup | None = None
    missing: dict[str, Any] | None = None

    def as_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "signer": self.recipe.signer_fingerprint,
            "trusted": self.recipe.trusted,
            "warning": ""
            if self.recipe.trusted
            else "The recipe is signed by a key this box does not trust: check where it "
            "came from before you run it.",
        }
        if self.missing is not None:
            hub = (self.missing.get("source") or {}).get("hugging_face")
            body["detail"] = f"This box has no model with sha256 {self.missing['sha256']}. " + (
                f"Import {hub['file']} from the Hugging Face repo {hub['repo']} "
                f"(revision {hub['revision'] or 'main'}), then import the recipe again."
                if hub
                else "Upload the model file to the registry, then import the recipe again."
            )
            body["missing_model"] = self.missing
        return body


def _version_by_sha(sha256: str, fmt: str) -> ModelVersion | None:
    return (
        ModelVersion.objects.filter(artifact_id=sha256, format=fmt)
        .select_related("repo")
        .order_by("-number")
        .first()
    )


def recipe_import(*, actor: User, data: bytes, name: str | None = None) -> RecipeImport:
    """Verify a recipe and save it as a setup. A tampered recipe is refused; one from a
    signer the box does not trust is imported with the warning kept on the setup; one
    naming a model the box lacks creates nothing and says where to get the model."""
    require_role(actor, MANAGER_ROLES, "import recipes")
    try:
        recipe = recipes.recipe_load(data, trusted_keys=trusted_recipe_keys())
    except recipes.RecipeError as exc:
        raise ValidationError({exc.field: str(exc)}) from exc
    return recipe_apply(actor=actor, recipe=recipe, name=name)


def recipe_apply(*, actor: User, recipe: recipes.Recipe, name: str | None = None) -> RecipeImport:
    """Save a verified recipe (an imported one, or one of the built-in book) as a setup,
    or report the model the box lacks."""
    require_role(actor, MANAGER_ROLES, "import recipes")
    doc = recipe.document
    version = _version_by_sha(doc["model"]["sha256"], Format.GGUF_MODEL)
    if version is None:
        return RecipeImport(recipe, missing=doc["model"])
    values = dict(doc["settings"])
    if doc.get("adapter"):
        adapter = _version_by_sha(doc["adapter"]["sha256"], Format.GGUF_LORA)
        if adapter is None:
            return RecipeImport(recipe, missing=doc["adapter"])
        values.update(adapter=adapter, adapter_scale=doc["adapter"]["scale"])
    setup = setup_create(
        actor=actor,
        name=name or _free_name(doc["name"]),
        use_case=doc["use_case"],
        experience=doc["experience"],
        model_version=version,
        notes=doc.get("notes", ""),
        origin=Origin.RECIPE,
        recipe_signer=recipe.signer_fingerprint,
        recipe_signer_trusted=recipe.trusted,
        **values,
    )
    return RecipeImport(recipe, setup=setup)
