"""The REST API takes JSON objects: any other JSON value is a 400, never a 500."""

import pytest
from rest_framework.test import APIClient

from apps.accounts.models import Role


@pytest.mark.parametrize("body", ["3", "[1, 2]", '"replicas"', "null"])
def test_a_json_body_that_is_not_an_object_is_refused(users, body):
    client = APIClient()
    client.force_login(users[Role.ADMIN])
    for path in (
        "/api/v1/registry/repos/",
        "/api/v1/datasets/",
        "/api/v1/api-keys/",
        "/api/v1/deployments/",
    ):
        response = client.post(path, body, content_type="application/json")
        assert response.status_code == 400, (path, response.content[:200])
        assert response.json() == {"detail": "The request body must be a JSON object."}
