"""Reads: setups and trials a user may see, and the advisor's answer for the box now."""

from __future__ import annotations

from dataclasses import dataclass

from django.core.exceptions import ValidationError

from apps.accounts.models import User
from apps.deployments import selectors as deployment_selectors
from apps.deployments.models import Deployment, State
from apps.deployments.services import REVISION_FIELDS
from apps.optimise import selectors as optimise_selectors
from apps.registry.models import Format, ModelVersion
from apps.registry.models import State as VersionState
from apps.setups import advisor
from apps.setups.models import Experience, RevisionSetup, Setup, Trial, TrialState, UseCase


def setup_list(*, user: User):
    return Setup.objects.visible_to(user).select_related(
        "model_version__repo", "model_version__artifact", "adapter__repo"
    )


def trial_list(*, user: User):
    return Trial.objects.filter(setup__in=Setup.objects.visible_to(user)).select_related(
        "setup__model_version__repo", "setup__model_version__artifact"
    )


def trials_succeeded():
    """Succeeded trials, newest first: what the advisor takes as measured."""
    return list(
        Trial.objects.filter(state=TrialState.SUCCEEDED)
        .select_related("setup__model_version__artifact")
        .order_by("-finished_at", "-id")[:500]
    )


def deployable_versions():
    return (
        ModelVersion.objects.filter(format=Format.GGUF_MODEL, state=VersionState.APPROVED)
        .select_related("repo", "artifact")
        .order_by("repo__name", "-number")
    )


@dataclass(frozen=True)
class Advice:
    use_case: str
    experience: str
    worker_names: list[str]
    candidates: list[advisor.Candidate]

    @property
    def proposed(self) -> list[advisor.Candidate]:
        return [c for c in self.candidates if c.suitable and c.fits_somewhere]

    @property
    def not_proposed(self) -> list[advisor.Candidate]:
        return [c for c in self.candidates if not (c.suitable and c.fits_somewhere)]


def advice(*, use_case: str, experience: str, worker: str | None = None) -> Advice:
    """The advisor's ranked candidates on the serving workers online now (or on one)."""
    workers = [w for w in deployment_selectors.worker_list() if w.serving]
    if worker:
        workers = [w for w in workers if w.hostname == worker]
        if not workers:
            raise ValidationError({"worker": f"The worker '{worker}' is not online and serving."})
    versions = list(deployable_versions())
    candidates = advisor.advise(
        use_case=use_case,
        experience=experience,
        versions=versions,
        workers=workers,
        trials=trials_succeeded(),
        quality=quality_of(versions),
    )
    return Advice(use_case, experience, [w.hostname for w in workers], candidates)


def quality_of(versions: list[ModelVersion]) -> dict[int, advisor.Quality]:
    """The advisor's quality figures: each version's perplexity, on the text dataset most
    of them were evaluated on (apps/optimise)."""
    return {
        pk: advisor.Quality(
            perplexity=e.perplexity,
            uncertainty=e.perplexity_uncertainty or 0.0,
            dataset=str(e.dataset_version),
            evaluation=e.pk,
        )
        for pk, e in optimise_selectors.quality_by_version(versions).items()
    }


@dataclass(frozen=True)
class FitNote:
    """Something an admin should know about a running deployment now the workers are
    what they are: a better-fitting setup, or no room anywhere."""

    deployment: str
    kind: str  # "better" or "no_fit"
    message: str


def _setup_of(deployment: Deployment) -> Setup | None:
    """The setup the served revision came from (or, after a rollback, the setup of the
    earlier revision whose model and settings it runs)."""
    revision = deployment.revision
    if revision is None:
        return None
    link = RevisionSetup.objects.filter(revision=revision).select_related("setup").first()
    if link is not None:
        return link.setup
    for link in RevisionSetup.objects.filter(revision__deployment=deployment).select_related(
        "setup", "revision"
    ):
        earlier = link.revision
        if (
            earlier.model_version_id == revision.model_version_id
            and earlier.values == revision.values
        ):
            return link.setup
    return None


def fit_notes(*, user: User) -> list[FitNote]:
    """For every running deployment: whether it still fits on an online worker, and
    whether the advisor now ranks another model first for the setup's use case and
    experience (a worker joined or left since it was chosen)."""
    workers = [w for w in deployment_selectors.worker_list() if w.serving]
    deployments = deployment_selectors.deployment_list(user=user).filter(running=True)
    versions = list(deployable_versions())
    trials = trials_succeeded()
    quality = quality_of(versions)
    tops: dict[tuple[str, str], advisor.Candidate | None] = {}
    notes = []
    for deployment in deployments:
        version = deployment.model_version
        values = {f: getattr(deployment, f) for f in REVISION_FIELDS}
        needed = advisor.needed_bytes(version, values)
        # A worker holding its replicas has that memory in use already: count it as free.
        holding = {
            r.worker
            for r in deployment.replica_set.all()
            if r.state in (State.LOADING, State.READY) and r.revision_id == deployment.revision_id
        }
        fits = [
            advisor.Fit(f.worker, f.gpu_index, f.needed_bytes, f.free_bytes + needed, f.device)
            if f.worker in holding
            else f
            for f in advisor.fits_on(version, values, workers)
        ]
        if not any(f.fits for f in fits):
            roomiest = max(fits, key=lambda f: f.free_bytes, default=None)
            where = (
                f"the roomiest online worker, {roomiest.where}, has "
                f"{max(roomiest.free_bytes, 0) / 2**20:,.0f} MiB free"
                if roomiest
                else "no worker is online to serve"
            )
            notes.append(
                FitNote(
                    deployment.name,
                    "no_fit",
                    f"{deployment.name} no longer fits anywhere: it needs about "
                    f"{needed / 2**20:,.0f} MiB a replica and {where}.",
                )
            )
        setup = _setup_of(deployment)
        if setup is None:
            continue
        key = (setup.use_case, setup.experience)
        if key not in tops:  # deployments for the same need share one ranking
            ranked = advisor.advise(
                use_case=setup.use_case,
                experience=setup.experience,
                versions=versions,
                workers=workers,
                trials=trials,
                quality=quality,
            )
            tops[key] = next((c for c in ranked if c.suitable and c.fits_somewhere), None)
        top = tops[key]
        if top is not None and top.version.pk != version.pk:
            notes.append(
                FitNote(
                    deployment.name,
                    "better",
                    f"{deployment.name} runs {version} for "
                    f"{UseCase(setup.use_case).label.lower()}, "
                    f"{Experience(setup.experience).label.lower()}: the advisor now ranks "
                    f"{top.version} first, which fits on {top.best_fit.where}.",
                )
            )
    return notes
