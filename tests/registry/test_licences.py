"""Licence governance: inherited licences as SPDX expressions, the deployment allow-list,
and admins' audited overrides (API and version page)."""

from __future__ import annotations

import pytest
from django.core.exceptions import ValidationError

from apps.accounts.models import Role
from apps.accounts.services import system_user
from apps.audit.models import AuditEvent
from apps.datasets.models import Dataset
from apps.registry.artifacts import artifact_store
from apps.registry.bundled import model_register_bundled
from apps.registry.licences import licence_and, licence_not_allowed, licence_terms, version_licence
from apps.registry.models import LicenceOverride, SourceKind
from apps.registry.services import (
    model_repo_create,
    model_version_deploy_check,
    model_version_ingest,
)
from tests.conftest import client_for
from tests.registry.conftest import write_tiny_gguf


def test_licence_and_keeps_each_term_once_in_order():
    assert licence_and(["gemma", "cc-by-4.0", "gemma AND cc-by-4.0"]) == "gemma AND cc-by-4.0"
    assert licence_and(["mit OR apache-2.0", "cc0-1.0"]) == "(mit OR apache-2.0) AND cc0-1.0"
    assert licence_and(["", " "]) == ""
    assert licence_terms("(mit OR apache-2.0) AND cc0-1.0") == ["mit", "apache-2.0", "cc0-1.0"]


def test_every_term_must_be_allowed(settings):
    settings.DEPLOY_LICENCE_ALLOWLIST = ["apache-2.0", "MIT"]
    assert licence_not_allowed("mit AND apache-2.0") == []
    assert licence_not_allowed("mit OR llama3") == ["llama3"]


@pytest.fixture
def llama(users, tmp_path):
    admin = users[Role.ADMIN]
    repo = model_repo_create(actor=admin, name="llama-tiny", licence="llama3")
    return model_version_ingest(
        actor=admin,
        repo=repo,
        staged=artifact_store().stage_copy(write_tiny_gguf(tmp_path / "l.gguf")),
        file_name="l.gguf",
        source_kind=SourceKind.UPLOAD,
        source={},
    ).version


def test_a_child_inherits_its_parents_and_its_training_datas_licences(users, llama, tmp_path):
    from apps.finetune.models import FineTuneJob

    dana = users[Role.DATA_SCIENTIST]
    repo = model_repo_create(actor=dana, name="llama-tiny-lora", licence="apache-2.0")
    dataset = Dataset.objects.create(name="notes", licence="cc-by-4.0", owner=dana)
    from tests.provenance.test_lineage import _dataset_version

    data = _dataset_version(dataset, 1, content=b'{"text": "x"}\n', actor=dana)
    job = FineTuneJob.objects.create(
        name="j", base_model=llama, dataset_version=data, output_repo=repo.name, created_by=dana
    )
    adapter = model_version_ingest(
        actor=dana,
        repo=repo,
        staged=artifact_store().stage_copy(write_tiny_gguf(tmp_path / "a.gguf", adapter=True)),
        file_name="a.gguf",
        source_kind=SourceKind.FINE_TUNE,
        source={"finetune_job": job.pk},
        parents=[llama],
    ).version
    assert version_licence(adapter) == "apache-2.0 AND llama3 AND cc-by-4.0"
    # The version page shows it.
    page = client_for(dana).get(f"/registry/versions/{adapter.pk}/").content.decode()
    assert "apache-2.0 AND llama3 AND cc-by-4.0" in page


def test_a_repo_licence_must_be_an_spdx_expression(users):
    client = client_for(users[Role.DATA_SCIENTIST])
    response = client.post(
        "/api/v1/registry/repos/",
        {"name": "bad", "licence": "mit AND"},
        content_type="application/json",
    )
    assert response.status_code == 400
    assert "not a licence id or an SPDX licence expression" in response.json()["detail"]


def test_the_bundled_gemma_is_deployable_with_the_default_allow_list(db, gemma_file):
    version = model_register_bundled(actor=system_user()).version
    assert version_licence(version) == "gemma"
    model_version_deploy_check(version=version)  # raises if refused


def test_a_licence_off_the_allow_list_is_refused_until_an_admin_overrides(users, llama):
    with pytest.raises(ValidationError) as refused:
        model_version_deploy_check(version=llama)
    message = refused.value.messages[0]
    assert "llama3 is not on the deployment allow-list (AIBOX_DEPLOY_LICENCE_ALLOWLIST)" in message
    assert f"/api/v1/registry/versions/{llama.pk}/licence-overrides" in message

    url = f"/api/v1/registry/versions/{llama.pk}/licence-overrides"
    ds = client_for(users[Role.DATA_SCIENTIST])
    assert ds.post(url, {"reason": "please"}, content_type="application/json").status_code == 403
    assert ds.get(url).status_code == 403
    admin = client_for(users[Role.ADMIN])
    blank = admin.post(url, {"reason": " "}, content_type="application/json")
    assert blank.status_code == 400
    assert not LicenceOverride.objects.exists()

    response = admin.post(
        url, {"reason": "Legal approved Llama 3 for internal use."}, content_type="application/json"
    )
    assert response.status_code == 201
    assert response.json()["terms"] == ["llama3"]
    model_version_deploy_check(version=llama)  # now allowed

    event = AuditEvent.objects.get(action="model_version.licence_override")
    assert event.actor_label == "ada"
    assert event.details["reason"] == "Legal approved Llama 3 for internal use."
    assert event.details["terms"] == ["llama3"]
    # Compliance officers see the override, with who and why.
    body = client_for(users[Role.COMPLIANCE_OFFICER]).get(url).json()
    assert body["not_allowed"] == ["llama3"]
    assert body["overrides"][0]["created_by"] == "ada"
    assert client_for(users[Role.APP_DEVELOPER]).get(url).status_code == 403


def test_an_override_is_refused_when_nothing_needs_one(users, llama, settings):
    settings.DEPLOY_LICENCE_ALLOWLIST = ["llama3"]
    response = client_for(users[Role.ADMIN]).post(
        f"/api/v1/registry/versions/{llama.pk}/licence-overrides",
        {"reason": "just in case"},
        content_type="application/json",
    )
    assert response.status_code == 400
    assert "no override is needed" in response.json()["detail"]


def test_an_admin_overrides_on_the_version_page(users, llama):
    url = f"/registry/versions/{llama.pk}/"
    page = client_for(users[Role.ADMIN]).get(url).content.decode()
    assert "llama3 is not on the deployment allow-list" in page
    assert 'value="licence_override"' in page
    # Others see why, but not the form.
    other = client_for(users[Role.DATA_SCIENTIST]).get(url).content.decode()
    assert "llama3 is not on the deployment allow-list" in other
    assert 'value="licence_override"' not in other
    refused = client_for(users[Role.DATA_SCIENTIST]).post(
        url, {"action": "licence_override", "override-reason": "x"}
    )
    assert refused.status_code == 403

    admin = client_for(users[Role.ADMIN])
    empty = admin.post(url, {"action": "licence_override", "override-reason": ""})
    assert empty.status_code == 400
    assert "This field is required." in empty.content.decode()
    done = admin.post(url, {"action": "licence_override", "override-reason": "Legal said yes."})
    assert done.status_code == 302
    assert LicenceOverride.objects.get(version=llama).reason == "Legal said yes."
    page = client_for(users[Role.COMPLIANCE_OFFICER]).get(url).content.decode()
    assert "an admin recorded an override" in page
    assert "Legal said yes." in page
