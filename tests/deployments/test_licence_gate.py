"""The deploy check: a licence off the allow-list, or a file that failed verification,
stops a deployment, with a message that says why and what to do."""

from __future__ import annotations

import pytest
from django.core.exceptions import ValidationError
from django.utils import timezone

from apps.accounts.models import Role
from apps.deployments.models import Deployment
from apps.deployments.services import deployment_create, deployment_start, deployment_stop
from apps.registry.models import Artifact
from apps.registry.services import licence_override_create, model_repo_create, model_version_approve
from tests.conftest import client_for
from tests.deployments.conftest import deployment_form
from tests.registry.conftest import upload_version, write_tiny_gguf


def _approved(admin, tmp_path, *, licence: str, name: str = "tiny", adapter=False, parents=()):
    repo = model_repo_create(actor=admin, name=name, licence=licence)
    path = write_tiny_gguf(tmp_path / f"{name}.gguf", adapter=adapter)
    version = upload_version(admin, repo, path, parents)
    return model_version_approve(actor=admin, version=version, reason="test")


@pytest.fixture(autouse=True)
def _store(settings, tmp_path):
    settings.ARTIFACT_ROOT = tmp_path / "artifacts"


def test_a_licence_off_the_allow_list_cannot_be_deployed_until_overridden(users, tmp_path):
    admin = users[Role.ADMIN]
    version = _approved(admin, tmp_path, licence="llama3")
    with pytest.raises(ValidationError) as refused:
        deployment_create(actor=admin, name="llama-chat", model_version=version)
    assert "llama3 is not on the deployment allow-list" in refused.value.messages[0]
    assert "An admin can record a licence override" in refused.value.messages[0]
    assert not Deployment.objects.exists()

    # The deployments page shows the same message as a form error.
    response = client_for(admin).post("/deployments/", deployment_form(version, name="llama-chat"))
    assert response.status_code == 200
    assert "llama3 is not on the deployment allow-list" in response.content.decode()

    licence_override_create(actor=admin, version=version, reason="Legal approved it.")
    deployment = deployment_create(actor=admin, name="llama-chat", model_version=version)
    assert deployment.pk


def test_an_adapter_whose_licence_is_not_allowed_is_refused(users, tmp_path):
    admin = users[Role.ADMIN]
    base = _approved(admin, tmp_path, licence="mit")
    adapter = _approved(
        admin, tmp_path, licence="cc-by-nc-4.0", name="nc-lora", adapter=True, parents=[base]
    )
    with pytest.raises(ValidationError) as refused:
        deployment_create(actor=admin, name="nc-chat", model_version=base, adapter=adapter)
    assert "cc-by-nc-4.0 is not on the deployment allow-list" in refused.value.messages[0]


def test_a_file_that_failed_verification_cannot_be_started(users, tmp_path):
    admin = users[Role.ADMIN]
    version = _approved(admin, tmp_path, licence="mit")
    deployment = deployment_create(actor=admin, name="tiny-chat", model_version=version)
    deployment_stop(actor=admin, deployment=deployment)
    Artifact.objects.filter(pk=version.sha256).update(
        integrity_failed_at=timezone.now(), integrity_failure="it changed on disk"
    )
    with pytest.raises(ValidationError) as refused:
        deployment_start(actor=admin, deployment=deployment)
    assert "its stored file failed verification" in refused.value.messages[0]
    assert "it changed on disk" in refused.value.messages[0]
