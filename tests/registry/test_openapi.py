"""The OpenAPI schema: generated without warnings, served to signed-in callers with a
docs page whose scripts come from the box itself."""

from __future__ import annotations

import re

import pytest
from django.core.management import call_command
from django.test import Client

from apps.accounts.models import Role
from apps.accounts.services import api_key_create
from tests.conftest import client_for


def test_the_schema_generates_without_warnings(tmp_path):
    # --fail-on-warn turns any warning (an APIView it cannot describe, a name clash)
    # into an error; --validate checks the result against the OpenAPI 3 specification.
    call_command("spectacular", "--validate", "--fail-on-warn", "--file", str(tmp_path / "s.yaml"))
    assert (tmp_path / "s.yaml").read_text().startswith("openapi: 3.")


def test_the_schema_lists_the_main_endpoints(users):
    response = client_for(users[Role.DATA_SCIENTIST]).get("/api/schema/?format=json")
    assert response.status_code == 200
    schema = response.json()
    paths = schema["paths"]
    for path, method in [
        ("/api/v1/registry/repos/", "post"),
        ("/api/v1/registry/repos/{name}/versions/", "post"),
        ("/api/v1/registry/versions/{id}/", "get"),
        ("/api/v1/registry/versions/{id}/approve", "post"),
        ("/api/v1/registry/versions/{id}/lineage", "get"),
        ("/api/v1/registry/versions/{id}/bom.cdx.json", "get"),
        ("/api/v1/registry/versions/{id}/licence-overrides", "post"),
        ("/api/v1/datasets/", "get"),
        ("/api/v1/finetunes/", "post"),
        ("/api/v1/deployments/", "post"),
        ("/api/v1/audit/events/", "get"),
        ("/api/v1/api-keys/", "post"),
    ]:
        assert method in paths.get(path, {}), (path, method)
    assert "/metrics" not in paths
    # The OpenAI-compatible endpoint, written by hand (apps/inference/openapi.py).
    assert {"/v1/chat/completions", "/v1/completions", "/v1/models"} <= set(paths)
    version = schema["components"]["schemas"]["ModelVersion"]["properties"]
    assert {"sha256", "licence", "parents", "integrity_failed_at"} <= set(version)
    assert schema["components"]["securitySchemes"]["apiKey"]["scheme"] == "bearer"


@pytest.mark.django_db
def test_the_schema_and_docs_need_a_signed_in_caller_or_a_key(users):
    assert Client().get("/api/schema/").status_code in (401, 403)
    assert Client().get("/api/docs/").status_code in (401, 403)
    issued = api_key_create(
        actor=users[Role.APP_DEVELOPER],
        owner=users[Role.APP_DEVELOPER],
        name="docs",
        scopes=["registry:read"],
    )
    response = Client().get(
        "/api/schema/?format=json", HTTP_AUTHORIZATION=f"Bearer {issued.secret}"
    )
    assert response.status_code == 200


def test_the_docs_page_is_served_from_the_box(users):
    response = client_for(users[Role.APP_DEVELOPER]).get("/api/docs/")
    assert response.status_code == 200
    html = response.content.decode()
    assert "swagger-ui" in html
    sources = re.findall(r'(?:src|href)="([^"]+)"', html)
    assert sources and all(not s.startswith(("http://", "https://", "//")) for s in sources)
    assert "/api/schema/" in html
