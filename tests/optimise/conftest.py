"""Optimisation jobs run for real: the training worker (tests/conftest.py) quantises,
exports and evaluates the bundled Gemma with llama.cpp; the control worker validates data.

A module builds its chain of versions once in a fixture (rows committed, as the workers
are other processes) and its tests read it; the database is flushed at the end.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from django.conf import settings
from django.core.management import call_command

from apps.optimise.models import Evaluation, JobState, ModelJob
from tests.conftest import client_for
from tests.live import wait_until

# Ordinary English prose, several paragraphs, repeated with small changes: enough tokens
# for a dozen 128-token chunks of the perplexity protocol.
PARAGRAPHS = [
    "The harbour was quiet in the early morning. Fishing boats rocked gently against the "
    "wooden pier, and the gulls waited on the roofs of the sheds for the first catch of "
    "the day. An old man mended his nets in the pale light, humming a song his father "
    "had taught him many years ago.",
    "Trains leave the central station every fifteen minutes during the week. Passengers "
    "are asked to buy their tickets before boarding, either at the machines in the hall "
    "or through the mobile application. Bicycles may be taken on board outside the rush "
    "hours, in the carriages marked with a green sign.",
    "To bake a simple loaf of bread, mix flour, water, salt and a little yeast in a large "
    "bowl. Knead the dough for ten minutes until it is smooth and elastic, then leave it "
    "to rise in a warm place for about an hour. Shape it, let it rise again, and bake it "
    "in a hot oven until the crust is golden brown.",
    "The committee met on Tuesday to discuss the budget for the coming year. Several "
    "members argued that more money should be spent on repairing the roads, while others "
    "wanted to build a new library near the school. After a long debate, they agreed to "
    "ask the residents for their opinion before making a decision.",
    "In the spring the garden fills with colour. Tulips and daffodils appear first, "
    "followed by the roses along the southern wall. The children like to help with the "
    "watering, although more water usually ends up on their shoes than on the flowers.",
]
TEXT_ROWS = [
    {"text": f"{paragraph} (Part {part}.)"} for part in range(1, 5) for paragraph in PARAGRAPHS
]


def post(user, path: str, body: dict):
    return client_for(user).post(path, body, content_type="application/json")


def wait_job(pk: int, model=ModelJob, timeout: float = 600):
    def finished():
        job = model.objects.get(pk=pk)
        return job if job.state in (JobState.SUCCEEDED, JobState.FAILED) else None

    return wait_until(finished, what=f"{model.__name__} {pk} finishing", timeout=timeout)


def run_job(user, body: dict) -> ModelJob:
    response = post(user, "/api/v1/optimise/jobs/", body)
    assert response.status_code == 201, response.content
    job = wait_job(response.json()["id"])
    assert job.state == JobState.SUCCEEDED, job.reason
    return job


def run_evaluation(user, body: dict) -> Evaluation:
    response = post(user, "/api/v1/optimise/evaluations/", body)
    assert response.status_code == 201, response.content
    evaluation = wait_job(response.json()["id"], Evaluation)
    assert evaluation.state == JobState.SUCCEEDED, evaluation.reason
    return evaluation


@contextmanager
def committed_module(django_db_blocker, live_worker) -> Iterator[Callable[[], None]]:
    """Unblocked database and the live worker's artifact store for a module fixture;
    flushes what the module committed when it ends."""
    original = settings.ARTIFACT_ROOT
    settings.ARTIFACT_ROOT = live_worker.artifact_root
    with django_db_blocker.unblock():
        try:
            yield
        finally:
            call_command("flush", interactive=False, verbosity=0)
            settings.ARTIFACT_ROOT = original
