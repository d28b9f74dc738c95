"""Every role × every action, against the running application and docs/permissions.md."""

from pathlib import Path

import pytest
from django.conf import settings
from django.test import Client
from rest_framework.test import APIClient

from apps.accounts.models import ApiKey, Role, Scope
from apps.accounts.services import api_key_create
from apps.datasets.models import DatasetImport
from apps.datasets.services import dataset_create
from apps.deployments.models import Deployment, State
from apps.registry.models import ModelImport
from apps.registry.services import model_repo_create
from tests.conftest import make_user
from tests.registry.conftest import upload_version, write_tiny_gguf

ADMIN, DS, DEV, CO = (
    Role.ADMIN,
    Role.DATA_SCIENTIST,
    Role.APP_DEVELOPER,
    Role.COMPLIANCE_OFFICER,
)
ROLES = (ADMIN, DS, DEV, CO)

# action: (docs row, method, path template, {role: expected status})
# "{victim}" is another user's id, "{victim_key}" another user's API key id.
MATRIX = {
    "dashboard": (
        "View the dashboard (admins: the operations dashboard; others: their own summary)",
        "get",
        "/",
        dict.fromkeys(ROLES, 200),
    ),
    "password": ("Change own password", "get", "/account/password/", dict.fromkeys(ROLES, 200)),
    "own_keys": (
        "List, create and revoke own API keys",
        "get",
        "/account/api-keys/",
        dict.fromkeys(ROLES, 200),
    ),
    "revoke_other_key": (
        "See and revoke other users' API keys",
        "post",
        "/account/api-keys/{victim_key}/revoke/",
        {ADMIN: 302, DS: 404, DEV: 404, CO: 404},
    ),
    "user_list": ("List users", "get", "/users/", {ADMIN: 200, DS: 403, DEV: 403, CO: 403}),
    "user_create": (
        "Create users",
        "post",
        "/users/new/",
        {ADMIN: 302, DS: 403, DEV: 403, CO: 403},
    ),
    "user_edit": (
        "Edit users, set roles, deactivate",
        "post",
        "/users/{victim}/",
        {ADMIN: 302, DS: 403, DEV: 403, CO: 403},
    ),
    "limits_set": (
        "See and set inference usage limits of keys, users and roles",
        "post",
        "/limits/roles/app_developer/",
        {ADMIN: 302, DS: 403, DEV: 403, CO: 403},
    ),
    "audit_list": (
        "View the audit log",
        "get",
        "/audit/",
        {ADMIN: 200, DS: 403, DEV: 403, CO: 200},
    ),
    "audit_export": (
        "Export the audit log (signed CSV, JSON Lines, PDF)",
        "post",
        "/audit/export.csv",
        {ADMIN: 200, DS: 403, DEV: 403, CO: 200},
    ),
    "audit_report": (
        "Compliance reports and model dossiers",
        "get",
        "/audit/models/{version}/",
        {ADMIN: 200, DS: 403, DEV: 403, CO: 200},
    ),
    "api_me": (
        "API: who am I (`GET /api/v1/me`)",
        "get",
        "/api/v1/me",
        dict.fromkeys(ROLES, 200),
    ),
    "api_users": (
        "API: list users (`GET /api/v1/users/`)",
        "get",
        "/api/v1/users/",
        {ADMIN: 200, DS: 403, DEV: 403, CO: 403},
    ),
    "api_limits": (
        "API: read and set inference usage limits (`/api/v1/limits/`, `.../limits` of a key, "
        "user or role)",
        "put",
        "/api/v1/roles/app_developer/limits",
        {ADMIN: 200, DS: 403, DEV: 403, CO: 403},
    ),
    "registry_browse": (
        "Browse the model registry",
        "get",
        "/registry/",
        dict.fromkeys(ROLES, 200),
    ),
    "registry_create": (
        "Create models and upload versions",
        "post",
        "/api/v1/registry/repos/",
        {ADMIN: 201, DS: 201, DEV: 403, CO: 403},
    ),
    "registry_import_path": (
        "Import a model file from a server path",
        "post",
        "/api/v1/registry/repos/{repo}/import-path",
        {ADMIN: 400, DS: 403, DEV: 403, CO: 403},  # admin: allowed, but not an import dir
    ),
    "registry_import_hf": (
        "Import a model from Hugging Face",
        "post",
        "/api/v1/registry/repos/{repo}/import-hf",
        {ADMIN: 202, DS: 202, DEV: 403, CO: 403},
    ),
    "registry_import_view": (
        "Follow a Hugging Face import",
        "get",
        "/api/v1/registry/imports/{model_import}/",
        dict.fromkeys(ROLES, 200),
    ),
    "registry_approve": (
        "Approve or deprecate model versions",
        "post",
        "/api/v1/registry/versions/{version}/approve",
        {ADMIN: 200, DS: 403, DEV: 403, CO: 200},
    ),
    "registry_lineage": (
        "View a version's lineage and export its CycloneDX ML-BOM",
        "get",
        "/api/v1/registry/versions/{version}/bom.cdx.json",
        dict.fromkeys(ROLES, 200),
    ),
    "registry_overrides_view": (
        "See licence overrides",
        "get",
        "/api/v1/registry/versions/{version}/licence-overrides",
        {ADMIN: 200, DS: 403, DEV: 403, CO: 200},
    ),
    # The version's licence (mit) is allowed, so an admin is told no override is needed.
    "registry_override": (
        "Record a licence override for deployment",
        "post",
        "/api/v1/registry/versions/{version}/licence-overrides",
        {ADMIN: 400, DS: 403, DEV: 403, CO: 403},
    ),
    "datasets_browse": (
        "Browse datasets (data scientists: their own)",
        "get",
        "/datasets/",
        {ADMIN: 200, DS: 200, DEV: 403, CO: 200},
    ),
    "datasets_create": (
        "Create datasets, upload and derive versions",
        "post",
        "/api/v1/datasets/",
        {ADMIN: 201, DS: 201, DEV: 403, CO: 403},
    ),
    "datasets_import_hf": (
        "Import a dataset file from Hugging Face (data scientists: into their own)",
        "post",
        "/api/v1/datasets/{own_dataset}/import-hf",
        {ADMIN: 202, DS: 202, DEV: 403, CO: 403},
    ),
    "datasets_import_view": (
        "Follow a dataset import (data scientists: their own)",
        "get",
        "/api/v1/dataset-imports/{dataset_import}/",
        {ADMIN: 200, DS: 200, DEV: 403, CO: 200},
    ),
    "datasets_other": (
        "See another data scientist's dataset",
        "get",
        "/api/v1/datasets/{dataset}/",
        {ADMIN: 200, DS: 404, DEV: 403, CO: 200},
    ),
    "deployments_view": (
        "View deployments and workers",
        "get",
        "/deployments/",
        dict.fromkeys(ROLES, 200),
    ),
    "deployment_manage": (
        "Create, start, stop, restart and scale deployments",
        "post",
        "/api/v1/deployments/{deployment}/stop",
        {ADMIN: 200, DS: 403, DEV: 403, CO: 403},
    ),
    "deployment_load_on_demand": (
        "Set a deployment's load on demand (unload when idle, load timeout)",
        "post",
        "/api/v1/deployments/{deployment}/load-on-demand",
        {ADMIN: 200, DS: 403, DEV: 403, CO: 403},
    ),
    "worker_credentials": (
        "Issue, list and revoke worker credentials (workers on other hosts)",
        "get",
        "/api/v1/workers/credentials/",
        {ADMIN: 200, DS: 403, DEV: 403, CO: 403},
    ),
    "setups_view": (
        "View setups, trials and recipes; ask the setup advisor",
        "get",
        "/setups/",
        dict.fromkeys(ROLES, 200),
    ),
    "setups_manage": (
        "Create, deploy, try, import and export setups (and apply the advisor's)",
        "post",
        "/api/v1/setups/",
        # An admin's empty request is let through to validation.
        {ADMIN: 400, DS: 403, DEV: 403, CO: 403},
    ),
    "optimise_view": (
        "View optimisation jobs, evaluations and the quality comparison of a model",
        "get",
        "/optimise/versions/{version}/",
        dict.fromkeys(ROLES, 200),
    ),
    "optimise_launch": (
        "Quantise, export (merge an adapter) and evaluate model versions",
        "post",
        "/api/v1/optimise/evaluations/",
        # Let through to validation: the request names no model or data.
        {ADMIN: 400, DS: 400, DEV: 403, CO: 403},
    ),
    "playground": (
        "Use the playground and the inference API (`/v1/`)",
        "get",
        "/deployments/playground/",
        {ADMIN: 200, DS: 200, DEV: 200, CO: 403},
    ),
    "usage_page": (
        "See own inference usage: totals, tokens per day, failures, requests (admins and "
        "compliance officers: everyone's, by key, user, deployment and day)",
        "get",
        "/usage/",
        dict.fromkeys(ROLES, 200),
    ),
    "usage_export": (
        "Export usage as CSV (the same filtered view)",
        "get",
        "/usage/export.csv",
        dict.fromkeys(ROLES, 200),
    ),
    "api_usage": (
        "API: read usage (`GET /api/v1/usage/`, `/api/v1/usage/daily/`, "
        "`/api/v1/usage/limits/`; admins and compliance officers: everyone's)",
        "get",
        "/api/v1/usage/",
        dict.fromkeys(ROLES, 200),
    ),
    "api_audit": (
        "API: read audit events (`GET /api/v1/audit/events/`)",
        "get",
        "/api/v1/audit/events/",
        {ADMIN: 200, DS: 403, DEV: 403, CO: 200},
    ),
    "api_audit_export": (
        "API: export the audit log, signed (`POST /api/v1/audit/export.csv`, `.jsonl`, `.pdf`)",
        "post",
        "/api/v1/audit/export.jsonl",
        {ADMIN: 200, DS: 403, DEV: 403, CO: 200},
    ),
    "api_audit_public_key": (
        "API: the audit signing key's public half and fingerprint (`GET /api/v1/audit/public-key`)",
        "get",
        "/api/v1/audit/public-key",
        {ADMIN: 200, DS: 403, DEV: 403, CO: 200},
    ),
    "metrics": (
        "Read Prometheus metrics (`GET /metrics`)",
        "get",
        "/metrics",
        {ADMIN: 200, DS: 403, DEV: 403, CO: 403},
    ),
}

POST_DATA = {
    "registry_create": {"name": "new-model", "licence": "mit"},
    "registry_import_path": {"path": "/etc/passwd"},
    "registry_approve": {"reason": "checked"},
    "registry_override": {"reason": "legal agreed"},
    "registry_import_hf": {"repo_id": "acme/model", "filename": "model.gguf"},
    "datasets_create": {"name": "new-data", "licence": "cc-by-4.0"},
    "datasets_import_hf": {"repo_id": "acme/data", "filename": "train.jsonl"},
    "user_create": {"username": "newbie", "role": DEV, "password": "long enough password"},
    "user_edit": {"role": DEV, "is_active": "on"},
    "limits_set": {"requests_per_minute": "60"},
    "api_limits": {"requests_per_minute": 60},
    "deployment_load_on_demand": {"idle_unload_seconds": 300},
}
ROLE_COLUMNS = {
    "Admin": ADMIN,
    "Data scientist": DS,
    "App developer": DEV,
    "Compliance officer": CO,
}


@pytest.fixture
def world(users, settings, tmp_path):
    victim = make_user(Role.APP_DEVELOPER, username="victim")
    key = api_key_create(actor=victim, owner=victim, name="victim-key", scopes=["inference"])
    settings.ARTIFACT_ROOT = tmp_path / "artifacts"
    ds = users[Role.DATA_SCIENTIST]
    repo = model_repo_create(actor=ds, name="tiny", licence="mit")
    version = upload_version(ds, repo, write_tiny_gguf(tmp_path / "tiny.gguf"))
    deployment = Deployment.objects.create(
        name="tiny-served", model_version=version, running=False, state=State.STOPPED
    )
    model_import = ModelImport.objects.create(
        repo=repo, hf_repo_id="acme/model", filename="model.gguf", endpoint="http://hub.invalid"
    )
    dora = make_user(Role.DATA_SCIENTIST, username="dora")
    dataset = dataset_create(actor=dora, name="dora-data", licence="cc0-1.0")
    own_dataset = dataset_create(actor=ds, name="dana-data", licence="cc0-1.0")
    dataset_import = DatasetImport.objects.create(
        dataset=own_dataset,
        hf_repo_id="acme/data",
        filename="train.jsonl",
        endpoint="http://hub.invalid",
    )
    return {
        "dataset": dataset.name,
        "own_dataset": own_dataset.name,
        "dataset_import": dataset_import.pk,
        "deployment": deployment.name,
        "model_import": model_import.pk,
        "victim": victim.pk,
        "victim_key": key.api_key.pk,
        "repo": repo.name,
        "version": version.pk,
    }


@pytest.mark.parametrize("role", ROLES, ids=[r.value for r in ROLES])
@pytest.mark.parametrize("action", MATRIX)
def test_role_action(users, world, role, action):
    _, method, path, expected = MATRIX[action]
    path = path.format(**world)
    client = APIClient() if path.startswith("/api/") else Client()
    client.force_login(users[role])
    response = getattr(client, method)(path, POST_DATA.get(action, {}))
    assert response.status_code == expected[role], response.content[:300]
    if action == "revoke_other_key":
        revoked = ApiKey.objects.get(pk=world["victim_key"]).revoked_at is not None
        assert revoked == (expected[role] == 302)


@pytest.mark.parametrize("action", MATRIX)
def test_anonymous_callers_are_turned_away(db, world, action):
    _, method, path, _ = MATRIX[action]
    path = path.format(**world)
    response = getattr(Client(), method)(path)
    if path.startswith("/api/") or path == "/metrics":
        assert response.status_code == 401
    else:
        assert response.status_code == 302 and response["Location"].startswith("/login/")


def test_docs_table_matches_this_matrix():
    text = (Path(settings.BASE_DIR) / "docs" / "permissions.md").read_text()
    section = text.split("## Permission matrix", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ")]
    header = [cell.strip() for cell in rows[0].strip("|").split("|")]
    documented = {}
    for line in rows[2:]:
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        documented[cells[0]] = {
            ROLE_COLUMNS[column]: cell.startswith("yes")
            for column, cell in zip(header[1:], cells[1:], strict=True)
        }
    tested = {
        label: {role: status not in (401, 403, 404) for role, status in expected.items()}
        for label, _, _, expected in MATRIX.values()
    }
    assert documented == tested


# The workers' internal routes (/internal/v1/…): a worker credential opens them, and
# nothing else does, whatever the role of a signed-in session or the scopes of a key.
INTERNAL_ROUTES = {
    "internal_artifact": ("get", "/internal/v1/artifacts/" + "0" * 64),
    "internal_finetune_status": ("get", "/internal/v1/finetune/999999"),
    "internal_finetune_claim": ("post", "/internal/v1/finetune/999999/claim"),
    "internal_finetune_file": ("put", "/internal/v1/finetune/999999/attempts/1/files/adapter.gguf"),
    "internal_finetune_finish": ("post", "/internal/v1/finetune/999999/attempts/1/finish"),
    "internal_optimise_claim": ("post", "/internal/v1/optimise/jobs/999999/claim"),
    "internal_optimise_progress": ("post", "/internal/v1/optimise/evaluations/999999/progress"),
    "internal_optimise_file": ("put", "/internal/v1/optimise/jobs/999999/files/model.gguf"),
    "internal_optimise_finish": ("post", "/internal/v1/optimise/jobs/999999/finish"),
}


def test_every_internal_route_is_in_the_table():
    from django.urls import get_resolver

    names = {n for n in get_resolver().reverse_dict if isinstance(n, str)}
    assert {n for n in names if n.startswith("internal_")} == set(INTERNAL_ROUTES)


@pytest.mark.django_db
@pytest.mark.parametrize("name", sorted(INTERNAL_ROUTES))
def test_internal_routes_take_only_a_worker_credential(name):
    from apps.deployments.credentials import worker_credential_issue

    method, path = INTERNAL_ROUTES[name]
    admin = make_user(ADMIN, username="internal-admin")

    def call(client: Client, **headers):
        return client.generic(
            method.upper(), path, b"{}", content_type="application/json", **headers
        )

    for role in ROLES:
        client = Client()
        client.force_login(admin if role == ADMIN else make_user(role))
        assert call(client).status_code == 401, f"{name}: a {role} session was let in"
    scopes = [scope.value for scope in Scope]
    key = api_key_create(actor=admin, owner=admin, name="all", scopes=scopes).secret
    assert call(Client(), HTTP_AUTHORIZATION=f"Bearer {key}").status_code == 401, name
    secret = worker_credential_issue(actor=admin, name="permission-check").secret
    opened = call(Client(), HTTP_AUTHORIZATION=f"Bearer {secret}")
    # Let in: the job or file does not exist (404), or the body is not enough (400).
    assert opened.status_code in (400, 404), f"{name}: {opened.status_code} {opened.content!r}"
