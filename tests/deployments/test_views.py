"""The deployments page as an admin uses it: form errors, not 500s; other roles refused."""

from __future__ import annotations

import pytest

from apps.accounts.models import Role
from apps.deployments.models import Deployment, State
from tests.conftest import client_for
from tests.deployments.conftest import deployment_form


def test_bad_settings_are_form_errors(users, version):
    client = client_for(users[Role.ADMIN])
    response = client.post("/deployments/", deployment_form(version, context_length=4096))
    assert response.status_code == 200
    assert "above the model&#x27;s 256 tokens" in response.content.decode()
    response = client.post("/deployments/", deployment_form(version, name="no spaces allowed"))
    assert response.status_code == 200
    assert "Use letters, digits" in response.content.decode()
    response = client.post("/deployments/", deployment_form(version, stream_interval_ms=5000))
    assert response.status_code == 200
    assert "less than or equal to 1000" in response.content.decode()
    assert not Deployment.objects.exists()


def test_a_duplicate_name_is_refused_with_a_message(users, version):
    client = client_for(users[Role.ADMIN])
    response = client.post("/deployments/", deployment_form(version))
    # No worker is online in this test: the deployment waits for one.
    assert response.status_code == 302
    deployment = Deployment.objects.get(name="tiny-chat")
    assert deployment.state == State.PENDING
    assert "Waiting for a worker" in deployment.state_reason
    response = client.post("/deployments/", deployment_form(version))
    assert response.status_code == 200
    assert "already exists" in response.content.decode()
    assert Deployment.objects.count() == 1


@pytest.mark.parametrize("role", [Role.DATA_SCIENTIST, Role.APP_DEVELOPER, Role.COMPLIANCE_OFFICER])
def test_only_admins_create_deployments(users, version, role):
    response = client_for(users[role]).post("/deployments/", deployment_form(version))
    assert response.status_code == 403
    assert not Deployment.objects.exists()
