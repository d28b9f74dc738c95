"""A trained adapter, served: one fine-tune of the bundled Gemma, approved, deployed on
its base next to the base alone, both answering through the OpenAI-compatible endpoint
of the real stack (uvicorn and a serving Celery worker, llama.cpp inside it).

The module trains once and shares the job among its tests. Its rows are committed, as
the web server and the workers are other processes; the database is flushed at the end.
"""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest
from django.conf import settings
from django.core.management import call_command

from apps.accounts.models import Role, Scope
from apps.accounts.services import api_key_create, system_user
from apps.datasets.services import dataset_create
from apps.deployments.models import State
from apps.deployments.services import deployment_create
from apps.finetune.models import FineTuneJob, JobState
from apps.registry.bundled import model_register_bundled
from apps.registry.models import ModelVersion
from apps.registry.services import model_version_approve
from tests.conftest import client_for, make_user
from tests.datasets.conftest import jsonl, upload, wait_validated
from tests.finetune.conftest import TRAIN_ROWS
from tests.live import (
    process_env,
    start_celery_worker,
    start_web_server,
    stop_processes,
    wait_until,
)
from tests.serving.conftest import wait_for_state

# The mark makes pytest-django set up the test database even when this module runs alone
# (it sets up only what marked tests need); the tests themselves only read.
pytestmark = pytest.mark.django_db

QUESTION = "What is the secret word number 3?"


@dataclass
class Served:
    url: str
    key: str
    job: FineTuneJob
    adapter: ModelVersion


@pytest.fixture(scope="module")
def served(
    test_database, django_db_blocker, live_worker, training_worker, tmp_path_factory
) -> Iterator[Served]:
    logs = tmp_path_factory.mktemp("served-adapter")
    original = settings.ARTIFACT_ROOT
    settings.ARTIFACT_ROOT = live_worker.artifact_root
    processes: list[subprocess.Popen] = []
    with django_db_blocker.unblock():
        try:
            yield _serve(logs, live_worker.artifact_root, tmp_path_factory, processes)
        finally:
            stop_processes(processes)
            call_command("flush", interactive=False, verbosity=0)
            settings.ARTIFACT_ROOT = original


def _serve(logs, artifacts, tmp_path_factory, processes) -> Served:
    dana = make_user(Role.DATA_SCIENTIST, username="ft-dana")
    admin = make_user(Role.ADMIN, username="ft-admin")
    cora = make_user(Role.COMPLIANCE_OFFICER, username="ft-cora")
    developer = make_user(Role.APP_DEVELOPER, username="ft-devon")
    gemma = model_register_bundled(actor=system_user()).version
    dataset = dataset_create(actor=dana, name="secrets", licence="cc-by-4.0")
    version = wait_validated(upload(dana, dataset, "secrets.jsonl", jsonl(TRAIN_ROWS)).json()["id"])

    # A high constant rate, so a few steps visibly change what the model says.
    params = {
        "lora_rank": 4,
        "lora_alpha": 8,
        "max_seq_length": 64,
        "learning_rate": 5e-3,
        "lr_scheduler": "constant",
        "max_steps": 6,
        "checkpoint_every": 50,
    }
    response = client_for(dana).post(
        "/api/v1/finetunes/",
        {"base_model": gemma.pk, "dataset_version": version.pk, "params": params},
        content_type="application/json",
    )
    assert response.status_code == 201, response.content

    def finished():
        job = FineTuneJob.objects.get(pk=response.json()["id"])
        return job if not job.active else None

    job = wait_until(finished, what="the fine-tune finishing", timeout=900)
    assert job.state == JobState.SUCCEEDED, job.reason
    model_version_approve(actor=cora, version=job.adapter, reason="Evaluated on secrets v1.")

    env = process_env(
        AIBOX_ARTIFACT_ROOT=str(artifacts),
        AIBOX_MODEL_CACHE_DIR=str(tmp_path_factory.mktemp("served-model-cache")),
        # Should llama.cpp crash the worker, its log keeps the last lines and the stacks.
        PYTHONUNBUFFERED="1",
        PYTHONFAULTHANDLER="1",
    )
    server, url = start_web_server(env=env, log=logs / "uvicorn.log")
    processes.append(server)
    name = f"serve-ft-{uuid.uuid4().hex[:6]}@localhost"
    processes.append(start_celery_worker(env=env, name=name, log=logs / "serving-worker.log"))

    # One at a time, so that a failure to load names the deployment that caused it.
    for name, adapter in (("gemma-base", None), ("gemma-secrets", job.adapter)):
        deployment = deployment_create(
            actor=admin, name=name, model_version=gemma, adapter=adapter, context_length=256
        )
        wait_for_state(deployment, State.READY, timeout=180)
    key = api_key_create(
        actor=developer, owner=developer, name="app", scopes=[Scope.INFERENCE]
    ).secret
    return Served(url=url, key=key, job=job, adapter=job.adapter)


def chat(served: Served, model: str) -> dict:
    response = httpx.post(
        f"{served.url}/v1/chat/completions",
        headers={"Authorization": f"Bearer {served.key}"},
        json={
            "model": model,
            "messages": [{"role": "user", "content": QUESTION}],
            "max_tokens": 16,
            "temperature": 0,
        },
        timeout=120,
    )
    assert response.status_code == 200, response.text
    return response.json()


def test_a_deployment_of_base_and_adapter_answers_what_it_learned(served):
    from apps.inference.models import UsageRecord

    adapted = chat(served, "gemma-secrets")
    assert adapted["model"] == "gemma-secrets" and adapted["object"] == "chat.completion"
    answer = adapted["choices"][0]["message"]["content"]
    assert "PAPAYA" in answer, answer
    assert adapted["usage"]["completion_tokens"] > 0

    plain = chat(served, "gemma-base")["choices"][0]["message"]["content"]
    assert plain != answer and "PAPAYA" not in plain, plain

    # The request's record leads back to the adapter, and the adapter to its job.
    record = wait_until(
        lambda: UsageRecord.objects.filter(deployment_name="gemma-secrets").first(),
        what="the request's usage record",
    )
    assert record.outcome == "ok" and record.deployment.adapter == served.adapter
    # The record names the exact weights, base and adapter, even if the deployment changes.
    assert record.adapter_sha256 == served.adapter.sha256
    assert record.model_sha256 == record.deployment.model_version.sha256
    assert served.adapter.source["finetune_job"] == served.job.pk
