"""Importing a dataset file from a Hugging Face dataset repo: the API and pages, a real
Celery worker, the real huggingface_hub client, and a hub served by tests/hubserver.py."""

from __future__ import annotations

import hashlib

import pytest

from apps.accounts.models import Role
from apps.audit.models import AuditEvent
from apps.datasets import hub_imports
from apps.datasets.models import DatasetImport, DatasetVersion, SourceKind, State
from apps.registry.artifacts import artifact_store
from apps.registry.models import ImportState
from tests.conftest import client_for, make_user
from tests.datasets.conftest import CHAT_ROWS, jsonl, wait_validated
from tests.registry.conftest import (
    import_leftovers,
    wait_import_ended,
    wait_job_finished,
)

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def hub(settings, fake_hub):
    """The fake hub, with this process pointed at it (the artifact store already points
    at the live worker's: tests/datasets/conftest.py)."""
    settings.HF_ENDPOINT = fake_hub.url
    return fake_hub


def request_import(user, dataset, **payload):
    return client_for(user).post(
        f"/api/v1/datasets/{dataset.name}/import-hf", payload, content_type="application/json"
    )


def test_a_jsonl_file_is_imported_with_provenance_and_then_validated(hub, users, dataset):
    dana = users[Role.DATA_SCIENTIST]
    content = jsonl(CHAT_ROWS)
    commit = hub.add_file(
        "acme/chats", "data/train.jsonl", content, repo_type="dataset", licence="cc-by-4.0"
    )

    response = request_import(dana, dataset, repo_id="acme/chats", filename="data/train.jsonl")
    assert response.status_code == 202, response.content
    body = response.json()
    assert body["state"] == "queued" and body["url"] == f"/api/v1/dataset-imports/{body['id']}/"
    assert body["page"] == f"/datasets/imports/{body['id']}/"
    assert body["endpoint"] == hub.url and body["revision"] == "main"
    assert body["dataset"] == dataset.name

    done = wait_import_ended(client_for(dana), body["url"])
    assert done["state"] == "succeeded", done["reason"]
    sha256 = hashlib.sha256(content).hexdigest()
    assert done["bytes_done"] == done["bytes_total"] == len(content)
    assert done["resolved"]["commit"] == commit and done["resolved"]["sha256"] == sha256
    assert done["notes"] == ""  # the card's licence is the dataset's

    version = wait_validated(done["version"])
    assert version.state == State.VALID, version.state_reason
    assert (version.rows, version.valid_rows, version.shape) == (2, 2, "chat")
    assert version.file_name == "train.jsonl" and version.created_by == dana
    assert version.source_kind == SourceKind.HUGGING_FACE
    assert version.source == {
        "repo_id": "acme/chats",
        "filename": "data/train.jsonl",
        "revision": "main",
        "commit": commit,
        "etag": sha256,
        "sha256_hub": sha256,
        "endpoint": hub.url,
        "licence": "cc-by-4.0",
        "import": body["id"],
    }
    assert artifact_store().verify(sha256).read_bytes() == content
    assert import_leftovers("0" * 64) == []
    # The hub was asked about a dataset repo, never a model repo.
    assert any(r.path.startswith("/api/datasets/acme/chats") for r in hub.requests)
    assert not any(r.path.startswith("/api/models/") for r in hub.requests)

    events = {
        e.action: e
        for e in AuditEvent.objects.filter(target_id__in=[str(body["id"]), str(version.pk)])
    }
    assert events["dataset_import.request"].actor_label == "dana"
    assert events["dataset_version.create"].actor_label == "dana"
    assert events["dataset_version.validated"].actor_label == "system"
    succeeded = events["dataset_import.succeeded"]
    assert succeeded.actor_label == "system" and succeeded.details["version"] == version.pk
    assert succeeded.details["dataset"] == dataset.name
    assert succeeded.details["commit"] == commit and succeeded.details["requested_by"] == "dana"

    # A duplicate delivery of the task finds the job ended and changes nothing.
    before = AuditEvent.objects.count()
    hub_imports.dataset_import_run(import_id=body["id"])
    assert AuditEvent.objects.count() == before
    assert DatasetVersion.objects.count() == 1


def test_settings_travel_with_the_import_and_a_differing_licence_is_noted(hub, users, dataset):
    content = b"question,answer\nWhat is 2+2?,4\nCapital of France?,Paris\n"
    hub.add_file("acme/qa", "qa.csv", content, repo_type="dataset", licence="mit")
    dana = users[Role.DATA_SCIENTIST]
    body = request_import(
        dana,
        dataset,
        repo_id="acme/qa",
        filename="qa.csv",
        shape="prompt_completion",
        column_mapping={"prompt": "question", "completion": "answer"},
    ).json()
    assert body["declared_shape"] == "prompt_completion", body
    done = wait_import_ended(client_for(dana), body["url"])
    assert done["state"] == "succeeded", done["reason"]
    assert "dataset card gives the licence mit, but this dataset records cc-by-4.0" in done["notes"]
    version = wait_validated(done["version"])
    assert version.state == State.VALID, version.state_reason
    assert version.column_mapping == {"prompt": "question", "completion": "answer"}
    assert (version.format, version.shape, version.rows) == ("csv", "prompt_completion", 2)


@pytest.mark.parametrize(
    ("repo_id", "filename", "message"),
    [
        ("acme/chats", "other.jsonl", "dataset acme/chats has no file 'other.jsonl' at main"),
        # The same id as a model repo is not a dataset repo.
        ("acme/a-model", "train.jsonl", "No repository dataset acme/a-model@main on http://"),
    ],
)
def test_a_missing_file_or_repo_fails_with_a_reason(
    hub, users, dataset, repo_id, filename, message
):
    hub.add_file("acme/chats", "train.jsonl", jsonl(CHAT_ROWS), repo_type="dataset")
    hub.add_file("acme/a-model", "train.jsonl", jsonl(CHAT_ROWS), repo_type="model")
    dana = users[Role.DATA_SCIENTIST]
    body = request_import(dana, dataset, repo_id=repo_id, filename=filename).json()
    done = wait_import_ended(client_for(dana), body["url"])
    assert done["state"] == "failed" and message in done["reason"], done["reason"]
    assert done["version"] is None and not DatasetVersion.objects.exists()
    failed = AuditEvent.objects.get(action="dataset_import.failed")
    assert failed.outcome == "failure" and message in failed.details["reason"]


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ({"repo_id": "acme/d", "filename": "data/train.pkl"}, "pickle-based format (.pkl)"),
        ({"repo_id": "acme/d", "filename": "model.bin"}, "can run arbitrary code"),
        ({"repo_id": "acme/d", "filename": "notes.txt"}, "not a supported data file"),
        ({"repo_id": "acme", "filename": "train.jsonl"}, "not a Hugging Face repo id"),
        ({"repo_id": "acme/d", "filename": "../train.jsonl"}, "not a file name in a repo"),
        ({"repo_id": "acme/d", "filename": "t.jsonl", "shape": "poem"}, "not a dataset shape"),
        (
            {"repo_id": "acme/d", "filename": "t.csv", "column_mapping": {"answer": "a"}},
            "'answer' is not a dataset field",
        ),
        ({"repo_id": "acme/d", "filename": "t.jsonl", "max_tokens": 100}, "needs a model"),
    ],
)
def test_refused_before_anything_is_queued(hub, users, dataset, payload, message):
    response = request_import(users[Role.DATA_SCIENTIST], dataset, **payload)
    assert response.status_code == 400 and message in response.json()["detail"]
    assert not DatasetImport.objects.exists()
    assert not AuditEvent.objects.filter(action__startswith="dataset_import").exists()
    assert hub.requests == []  # the hub was never asked


def test_bytes_that_differ_from_the_hubs_sha256_fail_and_nothing_is_stored(hub, users, dataset):
    # Bytes no other test stores: the worker's store outlives each test's rows.
    content = jsonl([{"text": "Only the sha256 test has this row."}])
    hub.add_file("acme/liar", "t.jsonl", content, repo_type="dataset", announced_sha256="cd" * 32)
    dana = users[Role.DATA_SCIENTIST]
    body = request_import(dana, dataset, repo_id="acme/liar", filename="t.jsonl").json()
    done = wait_import_ended(client_for(dana), body["url"])
    assert done["state"] == "failed" and "but the hub announced cdcd" in done["reason"]
    assert import_leftovers(hashlib.sha256(content).hexdigest()) == []
    assert not DatasetVersion.objects.exists()


def test_a_file_that_is_not_data_fails_with_the_uploads_reason(hub, users, dataset):
    junk = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)) + b"hf-import"
    hub.add_file("acme/junk", "train.jsonl", junk, repo_type="dataset")
    dana = users[Role.DATA_SCIENTIST]
    body = request_import(dana, dataset, repo_id="acme/junk", filename="train.jsonl").json()
    done = wait_import_ended(client_for(dana), body["url"])
    assert done["state"] == "failed" and "'train.jsonl' was refused" in done["reason"]
    assert "binary" in done["reason"]
    assert import_leftovers(hashlib.sha256(junk).hexdigest()) == []


def test_only_the_owner_and_admins_import(hub, users, dataset):
    dora = make_user(Role.DATA_SCIENTIST, username="dora")
    payload = {"repo_id": "acme/chats", "filename": "train.jsonl"}
    assert request_import(dora, dataset, **payload).status_code == 404
    assert request_import(users[Role.APP_DEVELOPER], dataset, **payload).status_code == 403
    assert request_import(users[Role.COMPLIANCE_OFFICER], dataset, **payload).status_code == 403
    assert not DatasetImport.objects.exists()

    response = request_import(users[Role.ADMIN], dataset, **payload)
    assert response.status_code == 202
    url = response.json()["url"]
    # No such repo on the hub; waited for, so nothing runs on after the test.
    assert wait_import_ended(client_for(users[Role.ADMIN]), url)["state"] == "failed"
    assert client_for(dora).get(url).status_code == 404
    assert client_for(users[Role.APP_DEVELOPER]).get(url).status_code == 403
    assert client_for(users[Role.COMPLIANCE_OFFICER]).get(url).status_code == 200
    assert client_for(users[Role.DATA_SCIENTIST]).get(url).status_code == 200
    assert client_for(dora).get(f"/datasets/imports/{response.json()['id']}/").status_code == 404


def test_the_dataset_page_imports_and_shows_the_progress_block(hub, users, dataset):
    content = jsonl([{"text": "A row from the page test."}, {"text": "Another one."}])
    hub.add_file("acme/notes", "notes.jsonl", content, repo_type="dataset", licence="cc-by-4.0")
    dana = client_for(users[Role.DATA_SCIENTIST])
    page = dana.get(f"/datasets/{dataset.name}/").content.decode()
    assert "Import from Hugging Face" in page and hub.url in page
    cora = client_for(users[Role.COMPLIANCE_OFFICER])
    assert "Import from Hugging Face" not in cora.get(f"/datasets/{dataset.name}/").content.decode()

    response = dana.post(
        f"/datasets/{dataset.name}/import-hf", {"repo_id": "acme/notes", "filename": "notes.jsonl"}
    )
    assert response.status_code == 302
    job = DatasetImport.objects.get()
    page = dana.get(f"/datasets/{dataset.name}/").content.decode()
    assert f'id="import-{job.pk}"' in page
    wait_job_finished(job)
    assert job.state == ImportState.SUCCEEDED, job.reason
    assert wait_validated(job.version_id).state == State.VALID

    fragment = dana.get(f"/datasets/imports/{job.pk}/", HTTP_HX_REQUEST="true").content.decode()
    assert "<html" not in fragment and "hx-get" not in fragment  # ended: it stops polling
    assert f'href="/datasets/versions/{job.version_id}/"' in fragment
    full = cora.get(f"/datasets/imports/{job.pk}/").content.decode()
    assert "<html" in full and job.resolved["commit"] in full and "dataset card" in full
    version_page = dana.get(f"/datasets/versions/{job.version_id}/").content.decode()
    assert "acme/notes/notes.jsonl" in version_page and job.resolved["commit"][:12] in version_page


def test_one_url_serves_a_running_imports_page_and_its_polled_block(hub, users, dataset):
    job = DatasetImport.objects.create(
        dataset=dataset,
        hf_repo_id="acme/x",
        filename="x.jsonl",
        endpoint=hub.url,
        state=ImportState.RUNNING,
        bytes_done=512,
        bytes_total=2048,
        declared_shape="text",
    )
    cora = client_for(users[Role.COMPLIANCE_OFFICER])
    url = f"/datasets/imports/{job.pk}/"
    page = cora.get(url).content.decode()
    block = cora.get(url, HTTP_HX_REQUEST="true").content.decode()
    assert "<html" in page and "Plain text" in page  # the settings the version will get
    assert "<html" not in block and "Plain text" not in block
    for html in (page, block):
        assert f'hx-get="{url}"' in html
        assert '<progress max="2048" value="512">' in html and "25%" in html


def test_a_refused_form_shows_the_reason_on_the_page(hub, users, dataset):
    response = client_for(users[Role.DATA_SCIENTIST]).post(
        f"/datasets/{dataset.name}/import-hf", {"repo_id": "acme/d", "filename": "dump.pkl"}
    )
    assert response.status_code == 400
    assert "pickle-based format (.pkl)" in response.content.decode()
    assert not DatasetImport.objects.exists()


def test_a_requester_who_lost_the_dataset_gets_no_version(fake_hub, settings, users, dataset):
    """The task body, run here: the requester's right is checked again when it runs."""
    settings.HF_CACHE_DIR = settings.ARTIFACT_ROOT / "hf-downloads"
    content = jsonl([{"text": "Only the lost-role test has this row."}])
    fake_hub.add_file("acme/chats", "t.jsonl", content, repo_type="dataset")
    dana = users[Role.DATA_SCIENTIST]
    job = DatasetImport.objects.create(
        dataset=dataset,
        hf_repo_id="acme/chats",
        filename="t.jsonl",
        endpoint=fake_hub.url,
        created_by=dana,
    )
    dataset.owner = users[Role.ADMIN]
    dataset.save()
    hub_imports.dataset_import_run(import_id=job.pk)
    job.refresh_from_db()
    assert job.state == ImportState.FAILED and "Only the dataset's owner" in job.reason
    assert not DatasetVersion.objects.exists()
    assert import_leftovers(hashlib.sha256(content).hexdigest()) == []
