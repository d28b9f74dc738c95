"""Requests checked before anything is queued: bad input is refused with the reason."""

from __future__ import annotations

import pytest

from apps.accounts.models import Role
from apps.datasets.models import DatasetVersion, Shape
from apps.datasets.models import State as DataState
from apps.datasets.services import dataset_create
from apps.optimise.models import Evaluation, JobState, ModelJob
from apps.optimise.runs import jobs_reap
from apps.registry.services import model_repo_create
from tests.conftest import client_for
from tests.datasets.conftest import jsonl, upload
from tests.registry.conftest import upload_version, write_tiny_gguf


@pytest.fixture
def world(users, settings, tmp_path):
    settings.ARTIFACT_ROOT = tmp_path / "artifacts"
    dana = users[Role.DATA_SCIENTIST]
    repo = model_repo_create(actor=dana, name="tiny", licence="mit")
    base = upload_version(dana, repo, write_tiny_gguf(tmp_path / "base.gguf"))
    other = upload_version(dana, repo, write_tiny_gguf(tmp_path / "other.gguf", seed=1))
    adapter = upload_version(
        dana,
        repo,
        write_tiny_gguf(tmp_path / "adapter.gguf", adapter=True),
        parents=[base],
    )
    dataset = dataset_create(actor=dana, name="notes", licence="cc0-1.0")
    # No worker here: the upload stays "validating", as one not validated yet would.
    pending = DatasetVersion.objects.get(
        pk=upload(dana, dataset, "notes.jsonl", jsonl([{"text": "hello"}])).json()["id"]
    )
    chats = DatasetVersion.objects.get(
        pk=upload(
            dana,
            dataset,
            "chats.jsonl",
            jsonl([{"messages": [{"role": "user", "content": "hi"}]}]),
        ).json()["id"]
    )
    DatasetVersion.objects.filter(pk=chats.pk).update(state=DataState.VALID, shape=Shape.CHAT)
    return {
        "dana": dana,
        "base": base,
        "other": other,
        "adapter": adapter,
        "pending": pending,
        "chats": chats,
    }


def _refused(user, path: str, body: dict) -> dict:
    before = ModelJob.objects.count(), Evaluation.objects.count()
    response = client_for(user).post(path, body, content_type="application/json")
    assert response.status_code == 400, response.content
    assert (ModelJob.objects.count(), Evaluation.objects.count()) == before, "nothing queued"
    return response.json()


def test_an_unknown_quantisation_type_is_refused(world):
    body = _refused(
        world["dana"],
        "/api/v1/optimise/jobs/",
        {"operation": "quantize", "source": world["base"].pk, "quant_type": "Q9_9"},
    )
    assert "Unknown quantisation type 'Q9_9'" in body["quant_type"][0]
    assert "Q4_K_M" in body["quant_type"][0]


def test_an_importance_matrix_is_asked_for_where_needed_and_computed_on_text(world):
    body = _refused(
        world["dana"],
        "/api/v1/optimise/jobs/",
        {"operation": "quantize", "source": world["base"].pk, "quant_type": "IQ2_XS"},
    )
    assert "IQ2_XS needs an importance matrix" in body["imatrix_dataset"][0]
    body = _refused(
        world["dana"],
        "/api/v1/optimise/jobs/",
        {
            "operation": "quantize",
            "source": world["base"].pk,
            "quant_type": "IQ2_XS",
            "imatrix_dataset": world["chats"].pk,
        },
    )
    assert "plain text is needed" in body["imatrix_dataset"][0]


def test_an_adapter_is_not_a_source_and_not_merged_onto_another_base(world):
    body = _refused(
        world["dana"],
        "/api/v1/optimise/jobs/",
        {"operation": "export", "source": world["adapter"].pk},
    )
    assert "not a GGUF model" in body["source"][0]
    body = _refused(
        world["dana"],
        "/api/v1/optimise/jobs/",
        {"operation": "export", "source": world["other"].pk, "adapter": world["adapter"].pk},
    )
    assert body["adapter"] == [
        f"{world['adapter']} was trained on {world['base']}, not on {world['other']}."
    ]
    body = _refused(
        world["dana"],
        "/api/v1/optimise/jobs/",
        {"operation": "export", "source": world["base"].pk, "out_type": "q4"},
    )
    assert "out_type" in body


def test_evaluating_on_data_that_is_not_valid_or_of_the_wrong_shape_is_refused(world):
    body = _refused(
        world["dana"],
        "/api/v1/optimise/evaluations/",
        {"model_version": world["base"].pk, "dataset_version": world["pending"].pk},
    )
    assert "not valid" in body["dataset_version"][0]
    # A reference compares token distributions on text; chat data has none to compare.
    body = _refused(
        world["dana"],
        "/api/v1/optimise/evaluations/",
        {
            "model_version": world["base"].pk,
            "dataset_version": world["chats"].pk,
            "reference": world["other"].pk,
        },
    )
    assert "compared on text data" in body["reference"][0]
    body = _refused(
        world["dana"],
        "/api/v1/optimise/evaluations/",
        {"model_version": world["base"].pk, "dataset_version": world["chats"].pk, "n_ctx": 9},
    )
    assert "n_ctx" in body


def test_roles_that_may_not_launch_are_refused_on_the_page_too(world, users):
    for role in (Role.APP_DEVELOPER, Role.COMPLIANCE_OFFICER):
        response = client_for(users[role]).post(
            f"/optimise/versions/{world['base'].pk}/quantize", {"quant_type": "Q8_0"}
        )
        assert response.status_code == 403
    assert ModelJob.objects.count() == 0


def test_the_page_form_shows_the_services_reason(world):
    response = client_for(world["dana"]).post(
        f"/optimise/versions/{world['other'].pk}/export",
        {"adapter": world["adapter"].pk, "out_type": "f16", "adapter_scale": 1},
    )
    assert response.status_code == 400
    assert f"was trained on {world['base']}" in response.content.decode()


def test_a_job_whose_worker_went_silent_is_failed_with_the_reason(world):
    from datetime import timedelta

    from django.utils import timezone

    from apps.audit.models import AuditEvent

    job = ModelJob.objects.create(
        operation="quantize",
        source=world["base"],
        params={"quant_type": "Q8_0"},
        output_repo="tiny",
        state=JobState.RUNNING,
        worker="train-gone@host",
        heartbeat_at=timezone.now() - timedelta(minutes=10),
    )
    assert jobs_reap() == [str(job)]
    job.refresh_from_db()
    assert job.state == JobState.FAILED and "train-gone@host went silent" in job.reason
    assert AuditEvent.objects.filter(action="optimise.job.reaped").exists()
    assert jobs_reap() == []


def test_every_optimise_page_checks_the_caller(world, users):
    """Each page of the app × every role and an anonymous caller: all signed-in roles read,
    only admins and data scientists launch, nobody signed out gets in."""
    from django.test import Client

    job = ModelJob.objects.create(
        operation="quantize",
        source=world["base"],
        params={"quant_type": "Q8_0"},
        output_repo="tiny",
    )
    evaluation = Evaluation.objects.create(
        model_version=world["base"],
        dataset_version=world["chats"],
        dataset_sha256=world["chats"].sha256,
        params={"metric": "task", "max_items": 5},
    )
    version = world["base"].pk
    reads = [
        f"/optimise/versions/{version}/",
        f"/optimise/jobs/{job.pk}/",
        f"/optimise/evaluations/{evaluation.pk}/",
        "/optimise/compare/tiny/",
    ]
    launches = [
        f"/optimise/versions/{version}/{action}" for action in ("quantize", "export", "evaluate")
    ]
    for role, user in users.items():
        client = client_for(user)
        for path in reads:
            assert client.get(path).status_code == 200, (role, path)
        for path in launches:
            # An empty form: refused by role first, else redisplayed with its errors.
            expected = 400 if role in (Role.ADMIN, Role.DATA_SCIENTIST) else 403
            assert client.post(path, {}).status_code == expected, (role, path)
    anonymous = Client()
    for path in reads + launches:
        response = anonymous.get(path)
        assert response.status_code == 302 and response["Location"].startswith("/login/")
    assert ModelJob.objects.count() == 1 and Evaluation.objects.count() == 1
