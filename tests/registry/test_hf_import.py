"""Importing models from a Hugging Face hub: the API and pages, a real Celery worker, the
real huggingface_hub client, and a hub served by tests/hubserver.py."""

from __future__ import annotations

import hashlib
import json
import socket

import pytest
from django.forms.models import model_to_dict
from rest_framework.test import APIClient

from apps.accounts.models import Role
from apps.audit.models import AuditEvent
from apps.registry import model_imports
from apps.registry.artifacts import artifact_store
from apps.registry.models import ImportState, ModelImport, ModelVersion, SourceKind
from tests.conftest import client_for
from tests.registry.conftest import (
    import_leftovers,
    wait_import_ended,
    wait_job_finished,
    write_tiny_gguf,
)

pytestmark = pytest.mark.django_db(transaction=True)

TOKEN = "hf_TestTokenThatMustNeverLeak0123456789"


@pytest.fixture
def hub(settings, live_worker, fake_hub):
    """The fake hub, with this process pointed at it and at the worker's artifact store."""
    settings.ARTIFACT_ROOT = live_worker.artifact_root
    settings.HF_ENDPOINT = fake_hub.url
    return fake_hub


@pytest.fixture
def gguf_bytes(tmp_path) -> bytes:
    return write_tiny_gguf(tmp_path / "tiny.gguf", seed=7).read_bytes()


def api_as(user) -> APIClient:
    client = APIClient()
    client.force_login(user)
    return client


def request_import(client, repo, **payload):
    return client.post(f"/api/v1/registry/repos/{repo.name}/import-hf", payload, format="json")


def test_import_through_the_api_records_provenance_progress_and_audit(hub, users, repo, gguf_bytes):
    ds = users[Role.DATA_SCIENTIST]
    commit = hub.add_file("acme/tiny-gguf", "gguf/tiny-Q4.gguf", gguf_bytes, licence="apache-2.0")
    client = api_as(ds)

    response = request_import(client, repo, repo_id="acme/tiny-gguf", filename="gguf/tiny-Q4.gguf")
    assert response.status_code == 202, response.content
    body = response.json()
    assert body["state"] == "queued" and body["url"] == f"/api/v1/registry/imports/{body['id']}/"
    assert body["endpoint"] == hub.url and body["revision"] == "main"

    done = wait_import_ended(client, body["url"])
    assert done["state"] == "succeeded", done["reason"]
    sha256 = hashlib.sha256(gguf_bytes).hexdigest()
    assert done["bytes_done"] == done["bytes_total"] == len(gguf_bytes)
    assert done["resolved"]["commit"] == commit and done["resolved"]["sha256"] == sha256
    assert done["notes"] == ""  # the card's licence is the repo's

    version = ModelVersion.objects.get(pk=done["version"])
    assert version.sha256 == sha256 and version.file_name == "tiny-Q4.gguf"
    assert version.source_kind == SourceKind.HUGGING_FACE and version.created_by == ds
    assert version.architecture == "llama"
    assert version.source == {
        "repo_id": "acme/tiny-gguf",
        "filename": "gguf/tiny-Q4.gguf",
        "revision": "main",
        "commit": commit,
        "etag": sha256,
        "sha256_hub": sha256,
        "endpoint": hub.url,
        "licence": "apache-2.0",
        "repo_licence": "apache-2.0",
        "import": body["id"],
    }
    assert artifact_store().verify(sha256).read_bytes() == gguf_bytes
    assert import_leftovers("0" * 64) == []

    events = {
        e.action: e
        for e in AuditEvent.objects.filter(target_id__in=[str(body["id"]), str(version.pk)])
    }
    assert events["model_import.request"].actor_label == "dana"
    assert events["model_version.create"].actor_label == "dana"
    succeeded = events["model_import.succeeded"]
    assert succeeded.actor_label == "system" and succeeded.details["version"] == version.pk
    assert succeeded.details["commit"] == commit and succeeded.details["requested_by"] == "dana"

    # A duplicate delivery of the task finds the job ended and changes nothing.
    before = AuditEvent.objects.count()
    model_imports.model_import_run(import_id=body["id"])
    assert AuditEvent.objects.count() == before
    assert ModelImport.objects.get(pk=body["id"]).state == ImportState.SUCCEEDED


def test_the_pages_show_the_import_and_its_progress_block(hub, users, repo, gguf_bytes):
    hub.add_file("acme/tiny-gguf", "tiny.gguf", gguf_bytes, licence="mit")
    ds = client_for(users[Role.DATA_SCIENTIST])
    page = ds.get(f"/registry/models/{repo.name}/").content.decode()
    assert "Import from Hugging Face" in page and hub.url in page
    assert "Import from Hugging Face" not in (
        client_for(users[Role.APP_DEVELOPER]).get(f"/registry/models/{repo.name}/").content.decode()
    )

    response = ds.post(
        f"/registry/models/{repo.name}/import-hf",
        {"repo_id": "acme/tiny-gguf", "filename": "tiny.gguf"},
    )
    assert response.status_code == 302
    job = ModelImport.objects.get()
    page = ds.get(f"/registry/models/{repo.name}/").content.decode()
    assert f'id="import-{job.pk}"' in page
    wait_job_finished(job)
    assert job.state == ImportState.SUCCEEDED, job.reason
    # The licence differs from the repo's: noted, not blocked.
    assert "card gives the licence mit, but this model records apache-2.0" in job.notes

    fragment = ds.get(f"/registry/imports/{job.pk}/", HTTP_HX_REQUEST="true").content.decode()
    assert "<html" not in fragment and "hx-get" not in fragment  # ended: it stops polling
    assert f'href="/registry/versions/{job.version_id}/"' in fragment and "licence mit" in fragment
    full = ds.get(f"/registry/imports/{job.pk}/").content.decode()
    assert "<html" in full and job.resolved["commit"] in full
    # Anyone who may read the registry may watch it.
    co = client_for(users[Role.COMPLIANCE_OFFICER])
    assert co.get(f"/registry/imports/{job.pk}/").status_code == 200


def test_a_running_import_polls_until_it_ends(hub, users, repo):
    job = ModelImport.objects.create(
        repo=repo, hf_repo_id="acme/x", filename="x.gguf", endpoint=hub.url, state="running"
    )
    ModelImport.objects.filter(pk=job.pk).update(bytes_done=512, bytes_total=2048)
    fragment = (
        client_for(users[Role.APP_DEVELOPER])
        .get(f"/registry/imports/{job.pk}/", HTTP_HX_REQUEST="true")
        .content.decode()
    )
    assert f'hx-get="/registry/imports/{job.pk}/"' in fragment
    assert '<progress max="2048" value="512">' in fragment and "25%" in fragment


@pytest.mark.parametrize(
    ("repo_id", "filename", "message"),
    [
        ("acme/does-not-exist", "tiny.gguf", "No repository acme/does-not-exist@main on http://"),
        ("acme/tiny-gguf", "other.gguf", "acme/tiny-gguf has no file 'other.gguf' at main"),
    ],
)
def test_missing_repo_or_file_fails_with_a_reason(
    hub, users, repo, gguf_bytes, repo_id, filename, message
):
    hub.add_file("acme/tiny-gguf", "tiny.gguf", gguf_bytes)
    client = api_as(users[Role.DATA_SCIENTIST])
    body = request_import(client, repo, repo_id=repo_id, filename=filename).json()
    done = wait_import_ended(client, body["url"])
    assert done["state"] == "failed" and message in done["reason"], done["reason"]
    assert done["version"] is None and not ModelVersion.objects.exists()
    failed = AuditEvent.objects.get(action="model_import.failed")
    assert failed.outcome == "failure" and message in failed.details["reason"]


def test_a_gated_repo_without_a_token_fails_saying_so(hub, users, repo, gguf_bytes):
    hub.add_file("acme/gated", "g.gguf", gguf_bytes, gated_token=TOKEN)
    client = api_as(users[Role.ADMIN])
    body = request_import(client, repo, repo_id="acme/gated", filename="g.gguf").json()
    done = wait_import_ended(client, body["url"])
    assert done["state"] == "failed"
    assert "acme/gated/g.gguf is gated" in done["reason"] and "AIBOX_HF_TOKEN" in done["reason"]


def test_an_unreachable_hub_fails_saying_so(hub, users, repo, settings):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        settings.HF_ENDPOINT = f"http://127.0.0.1:{s.getsockname()[1]}"
    client = api_as(users[Role.DATA_SCIENTIST])
    body = request_import(client, repo, repo_id="acme/tiny", filename="tiny.gguf").json()
    done = wait_import_ended(client, body["url"])
    assert done["state"] == "failed" and "Could not reach the hub at" in done["reason"]


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ({"repo_id": "acme/m", "filename": "pytorch_model.bin"}, "pickle-based format (.bin)"),
        ({"repo_id": "acme/m", "filename": "sub/model.ckpt"}, "can run arbitrary code"),
        ({"repo_id": "acme/m", "filename": "model.safetensors"}, "not a supported model file"),
        ({"repo_id": "acme", "filename": "model.gguf"}, "not a Hugging Face repo id"),
        ({"repo_id": "acme/m", "filename": "../model.gguf"}, "not a file name in a repo"),
        ({"repo_id": "acme/m", "filename": "m.gguf", "revision": "../x"}, "not a branch"),
    ],
)
def test_refused_before_anything_runs(hub, users, repo, payload, message):
    response = request_import(api_as(users[Role.DATA_SCIENTIST]), repo, **payload)
    assert response.status_code == 400 and message in response.json()["detail"]
    assert not ModelImport.objects.exists()
    assert not AuditEvent.objects.filter(action__startswith="model_import").exists()
    assert hub.requests == []  # the hub was never asked


def test_a_refused_form_shows_the_reason_on_the_page(hub, users, repo):
    response = client_for(users[Role.DATA_SCIENTIST]).post(
        f"/registry/models/{repo.name}/import-hf",
        {"repo_id": "acme/m", "filename": "pytorch_model.bin"},
    )
    assert response.status_code == 400
    assert "pickle-based format (.bin)" in response.content.decode()
    assert not ModelImport.objects.exists()


def test_a_file_that_is_not_gguf_fails_and_leaves_nothing(hub, users, repo):
    junk = b"GGUF but not really" * 100
    hub.add_file("acme/junk", "junk.gguf", junk)
    client = api_as(users[Role.DATA_SCIENTIST])
    body = request_import(client, repo, repo_id="acme/junk", filename="junk.gguf").json()
    done = wait_import_ended(client, body["url"])
    assert done["state"] == "failed" and "not a usable GGUF file" in done["reason"]
    assert import_leftovers(hashlib.sha256(junk).hexdigest()) == []
    assert not ModelVersion.objects.exists()


def test_bytes_that_differ_from_the_hubs_sha256_fail(hub, users, repo, tmp_path):
    # Bytes no other test stores: the worker's store outlives each test's rows.
    gguf_bytes = write_tiny_gguf(tmp_path / "other.gguf", seed=11).read_bytes()
    hub.add_file("acme/liar", "tiny.gguf", gguf_bytes, announced_sha256="ab" * 32)
    client = api_as(users[Role.DATA_SCIENTIST])
    body = request_import(client, repo, repo_id="acme/liar", filename="tiny.gguf").json()
    done = wait_import_ended(client, body["url"])
    assert done["state"] == "failed" and "but the hub announced abab" in done["reason"]
    assert import_leftovers(hashlib.sha256(gguf_bytes).hexdigest()) == []


def test_app_developers_and_compliance_cannot_import(hub, users, repo):
    for role in (Role.APP_DEVELOPER, Role.COMPLIANCE_OFFICER):
        response = request_import(api_as(users[role]), repo, repo_id="acme/m", filename="m.gguf")
        assert response.status_code == 403
    assert not ModelImport.objects.exists()


# The live worker's settings are fixed, so the token path runs the task body here.


def queued_import(repo, user, **fields) -> ModelImport:
    return ModelImport.objects.create(repo=repo, created_by=user, **fields)


def test_with_the_token_a_gated_import_succeeds_and_the_token_shows_nowhere(
    fake_hub, settings, users, repo, gguf_bytes, tmp_path
):
    settings.HF_TOKEN = TOKEN
    settings.HF_CACHE_DIR = tmp_path / "hf-downloads"
    fake_hub.add_file("acme/gated", "g.gguf", gguf_bytes, gated_token=TOKEN)
    ds = users[Role.DATA_SCIENTIST]
    job = queued_import(repo, ds, hf_repo_id="acme/gated", filename="g.gguf", endpoint=fake_hub.url)

    model_imports.model_import_run(import_id=job.pk)
    job.refresh_from_db()
    assert job.state == ImportState.SUCCEEDED, job.reason
    assert job.resolved["gated"] and job.version.source["commit"] == job.resolved["commit"]
    assert any(r.authorization == f"Bearer {TOKEN}" for r in fake_hub.requests)

    seen = [
        json.dumps(model_to_dict(job), default=str),
        json.dumps(job.version.source),
        json.dumps([e.details for e in AuditEvent.objects.all()]),
        api_as(ds).get(f"/api/v1/registry/imports/{job.pk}/").content.decode(),
        client_for(ds).get(f"/registry/imports/{job.pk}/").content.decode(),
        client_for(ds).get(f"/registry/versions/{job.version_id}/").content.decode(),
        client_for(ds).get(f"/registry/models/{repo.name}/").content.decode(),
    ]
    assert all(TOKEN not in text for text in seen)
    assert not any(p.is_file() for p in settings.HF_CACHE_DIR.rglob("*"))


def test_a_file_over_the_size_limit_is_not_downloaded(fake_hub, settings, users, repo, gguf_bytes):
    settings.UPLOAD_MAX_BYTES = 1000
    fake_hub.add_file("acme/tiny-gguf", "tiny.gguf", gguf_bytes)
    job = queued_import(
        repo,
        users[Role.DATA_SCIENTIST],
        hf_repo_id="acme/tiny-gguf",
        filename="tiny.gguf",
        endpoint=fake_hub.url,
    )
    model_imports.model_import_run(import_id=job.pk)
    job.refresh_from_db()
    assert job.state == ImportState.FAILED and "over the limit of 1,000 bytes" in job.reason
    assert not any(r.path.startswith("/_cdn/") for r in fake_hub.requests)


def test_a_requester_who_lost_the_role_gets_no_version(fake_hub, settings, users, repo, gguf_bytes):
    settings.HF_CACHE_DIR = settings.ARTIFACT_ROOT / "hf-downloads"
    fake_hub.add_file("acme/tiny-gguf", "tiny.gguf", gguf_bytes)
    ds = users[Role.DATA_SCIENTIST]
    job = queued_import(
        repo, ds, hf_repo_id="acme/tiny-gguf", filename="tiny.gguf", endpoint=fake_hub.url
    )
    ds.role = Role.APP_DEVELOPER
    ds.save()
    model_imports.model_import_run(import_id=job.pk)
    job.refresh_from_db()
    assert job.state == ImportState.FAILED and "does not allow you" in job.reason
    assert not ModelVersion.objects.exists()
    assert import_leftovers(hashlib.sha256(gguf_bytes).hexdigest()) == []
