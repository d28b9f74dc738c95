import json
from datetime import timedelta

import pytest
from django.test import Client
from django.utils import timezone

from apps.accounts.models import Role
from apps.accounts.services import api_key_create, api_key_revoke
from apps.audit import signing
from apps.audit.models import AuditEvent
from apps.audit.verification import verify_export
from apps.deployments.models import Deployment, State
from apps.inference.models import UsageRecord
from apps.registry.services import model_repo_create, model_version_approve
from tests.conftest import client_for, make_user
from tests.registry.conftest import upload_version, write_tiny_gguf


@pytest.fixture
def world(users, settings, tmp_path):
    settings.ARTIFACT_ROOT = tmp_path / "artifacts"
    admin, ds = users[Role.ADMIN], users[Role.DATA_SCIENTIST]
    repo = model_repo_create(actor=ds, name="tiny", licence="mit")

    def ingest(seed: bytes, parents=()):
        path = write_tiny_gguf(tmp_path / f"{seed.decode()}.gguf")
        with path.open("ab") as f:
            f.write(seed)  # a different file, so a different version
        version = upload_version(ds, repo, path)
        version.parents.set(parents)
        return version

    base = ingest(b"base")
    middle = ingest(b"middle", [base])
    top = ingest(b"top", [middle])
    model_version_approve(actor=users[Role.COMPLIANCE_OFFICER], version=top, reason="reviewed")
    deployment = Deployment.objects.create(
        name="tiny-served", model_version=top, running=False, state=State.STOPPED
    )
    key = api_key_create(actor=admin, owner=admin, name="app", scopes=["inference"]).api_key
    api_key_revoke(actor=admin, api_key=key)
    for tokens in (3, 4):
        UsageRecord.objects.create(
            username="ada",
            api_key_prefix=key.prefix,
            deployment=deployment,
            deployment_name="tiny-served",
            model_sha256=top.artifact_id,
            endpoint="chat",
            prompt_tokens=tokens,
            completion_tokens=10,
            latency_ms=5.0,
            outcome="ok",
            status_code=200,
        )
    from apps.accounts.services import user_update

    leaver = make_user(Role.APP_DEVELOPER, username="lee")
    user_update(actor=admin, user=leaver, role=Role.DATA_SCIENTIST, is_active=True)
    return {"base": base, "middle": middle, "top": top, "key": key, "users": users}


def period(**extra: str) -> dict[str, str]:
    now = timezone.now()
    fmt = "%Y-%m-%dT%H:%M"
    return {
        "start": f"{(now - timedelta(hours=1)):{fmt}}",
        "end": f"{(now + timedelta(hours=1)):{fmt}}",
        **extra,
    }


def test_report_json_is_signed_and_complete(world):
    officer = world["users"][Role.COMPLIANCE_OFFICER]
    response = client_for(officer).post("/audit/report/", period(format="json"))
    assert response.status_code == 200
    assert response["Content-Disposition"].startswith('attachment; filename="aibox-compliance')
    report = verify_export(response.content, public_key=signing.public_key().raw)
    assert report.ok, report.problems
    doc = json.loads(response.content)["document"]
    assert [e["action"] for e in doc["user_changes"]] == ["user.role_change"]
    assert doc["user_changes"][0]["details"]["changes"]["role"] == {
        "from": "app_developer",
        "to": "data_scientist",
    }
    assert [e["action"] for e in doc["api_keys"]] == ["apikey.create", "apikey.revoke"]
    top = world["top"]
    approved = [m for m in doc["models"] if m["id"] == top.pk][0]
    assert approved["state"] == "approved" and approved["licence"] == "mit"
    assert [e["details"]["reason"] for e in doc["approvals"]] == ["reviewed"]
    assert doc["deployments"][0]["name"] == "tiny-served"
    assert doc["usage_per_deployment"] == [
        {
            "deployment_name": "tiny-served",
            "requests": 2,
            "errors": 0,
            "prompt_tokens": 7,
            "completion_tokens": 20,
        }
    ]
    assert doc["usage_per_key"][0]["api_key_prefix"] == world["key"].prefix
    assert AuditEvent.objects.filter(action="audit.report", actor_label="cora").exists()


def test_report_pdf_is_signed_and_tamper_evident(world):
    response = client_for(world["users"][Role.ADMIN]).post("/audit/report/", period(format="pdf"))
    assert response.status_code == 200 and response.content.startswith(b"%PDF")
    assert verify_export(response.content, public_key=signing.public_key().raw).ok
    tampered = bytearray(response.content)
    tampered[100] ^= 1
    report = verify_export(bytes(tampered), public_key=signing.public_key().raw)
    assert any("sha256 differs" in p for p in report.problems)


def test_report_needs_a_valid_period(world):
    client = client_for(world["users"][Role.ADMIN])
    assert client.get("/audit/report/").status_code == 200
    bad = client.post(
        "/audit/report/", {"start": "2026-02-01T00:00", "end": "2026-01-01T00:00", "format": "pdf"}
    )
    assert bad.status_code == 400 and b"must be before" in bad.content
    assert client.post("/audit/report/", period(format="xls")).status_code == 400


def test_report_and_dossier_downloads_are_posts_with_a_csrf_token(world):
    """A link on another site cannot make a signed-in officer's browser produce one."""
    client = Client(enforce_csrf_checks=True)
    client.force_login(world["users"][Role.COMPLIANCE_OFFICER])
    top = world["top"].pk
    for url, data in (
        ("/audit/report/", period(format="json")),
        (f"/audit/models/{top}/", {"format": "json"}),
        ("/audit/export.csv", {}),
    ):
        assert client.post(url, data).status_code == 403  # no CSRF token
    # A GET with the download's parameters only shows the page, or is refused.
    assert client.get("/audit/report/", period(format="json"))["Content-Type"].startswith("text/h")
    assert client.get(f"/audit/models/{top}/", {"format": "json"})["Content-Type"].startswith(
        "text/html"
    )
    assert client.get("/audit/export.csv").status_code == 405
    assert not AuditEvent.objects.filter(
        action__in=["audit.report", "audit.dossier", "audit.export"]
    ).exists()


def test_dossier_walks_the_provenance_chain(world):
    top, middle, base = world["top"], world["middle"], world["base"]
    client = client_for(world["users"][Role.COMPLIANCE_OFFICER])
    page = client.get(f"/audit/models/{top.pk}/")
    assert page.status_code == 200
    html = page.content.decode()
    assert str(middle) in html and str(base) in html and "tiny-served" in html
    data = client.post(f"/audit/models/{top.pk}/", {"format": "json"})
    assert verify_export(data.content, public_key=signing.public_key().raw).ok
    doc = json.loads(data.content)["document"]
    assert [(p["id"], p["depth"]) for p in doc["provenance"]] == [(middle.pk, 1), (base.pk, 2)]
    assert "model_version.approve" in [e["action"] for e in doc["history"]]
    assert doc["deployments"] == [{"name": "tiny-served", "state": "stopped", "as": "model"}]
    assert doc["usage"]["requests"] == 2
    pdf = client.post(f"/audit/models/{top.pk}/", {"format": "pdf"})
    assert verify_export(pdf.content, public_key=signing.public_key().raw).ok
    assert client.get("/audit/models/999999/").status_code == 404


@pytest.mark.parametrize("role", [Role.DATA_SCIENTIST, Role.APP_DEVELOPER])
def test_reports_are_for_compliance_only(world, role):
    client = client_for(world["users"][role])
    assert client.post("/audit/report/", period(format="json")).status_code == 403
    assert client.get(f"/audit/models/{world['top'].pk}/").status_code == 403


def test_rows_link_to_what_still_exists(world):
    top = world["top"]
    officer = client_for(world["users"][Role.COMPLIANCE_OFFICER])
    html = officer.get("/audit/?target_type=registry.modelversion").content.decode()
    assert f'href="/registry/versions/{top.pk}/"' in html
    html = officer.get("/audit/?target_type=deployments.deployment").content.decode()
    # user pages are for admins only: a compliance officer gets no link to them.
    html = officer.get("/audit/?action=user.").content.decode()
    assert 'href="/users/' not in html
    admin_html = client_for(world["users"][Role.ADMIN]).get("/audit/?action=user.").content
    assert b'href="/users/' in admin_html
    # A target that is gone keeps its row but loses its link.
    lee = world["users"][Role.ADMIN].__class__.objects.get(username="lee")
    lee_id = lee.pk
    lee.delete()
    admin_html = client_for(world["users"][Role.ADMIN]).get(
        f"/audit/?target_type=accounts.user&target_id={lee_id}"
    )
    body = admin_html.content.decode()
    assert "user.role_change" in body and f'href="/users/{lee_id}/"' not in body


def test_dossier_of_an_adapter_counts_the_requests_it_answered(world):
    """An adapter serves on top of a base model; its requests are its usage too."""
    adapter, base = world["middle"], world["base"]
    UsageRecord.objects.create(
        username="ada",
        deployment_name="tiny-tuned",
        model_sha256=base.artifact_id,
        adapter_sha256=adapter.artifact_id,
        endpoint="completion",
        prompt_tokens=7,
        completion_tokens=5,
        latency_ms=5.0,
        outcome="ok",
        status_code=200,
    )
    client = client_for(world["users"][Role.COMPLIANCE_OFFICER])
    for version, requests in ((adapter, 1), (base, 1), (world["top"], 2)):
        doc = json.loads(client.post(f"/audit/models/{version.pk}/", {"format": "json"}).content)
        assert doc["document"]["usage"]["requests"] == requests, version
