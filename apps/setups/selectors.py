"""Reads: setups and trials a user may see, and the advisor's answer for the box now."""

from __future__ import annotations

from dataclasses import dataclass

from django.core.exceptions import ValidationError

from apps.accounts.models import User
from apps.deployments import selectors as deployment_selectors
from apps.registry.models import Format, ModelVersion
from apps.registry.models import State as VersionState
from apps.setups import advisor
from apps.setups.models import Setup, Trial, TrialState


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
    candidates = advisor.advise(
        use_case=use_case,
        experience=experience,
        versions=deployable_versions(),
        workers=workers,
        trials=trials_succeeded(),
    )
    return Advice(use_case, experience, [w.hostname for w in workers], candidates)
