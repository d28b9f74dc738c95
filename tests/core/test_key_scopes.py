"""Every route × every API key scope, with the routes read from the URL configuration.

A new route fails ``test_every_route_is_in_the_table`` until it is given its scopes
below, so no key-authenticated route can be added without its scope check. Each key is
an admin's, whose role allows everything: only the key's scope can refuse. Objects in
the paths do not exist, so an allowed call answers 404 or 400, and a refused one 403.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from django.conf import settings
from django.test import Client
from django.urls import URLPattern, URLResolver, get_resolver

from apps.accounts.models import Role, Scope
from apps.accounts.services import ROLE_SCOPES, api_key_create
from tests.conftest import make_user

ADMIN, INFERENCE, REGISTRY, REVIEW, DATASETS, AUDIT, METRICS = (
    Scope.ADMIN,
    Scope.INFERENCE,
    Scope.REGISTRY_READ,
    Scope.REGISTRY_REVIEW,
    Scope.DATASETS,
    Scope.AUDIT_READ,
    Scope.METRICS,
)
ANY = frozenset(Scope)

# (route name, method): the scopes besides ``admin`` (which allows everything) that let a
# key call it. Routes named here are the ones API keys authenticate; every other route is
# a page that a key does not open.
KEY_ROUTES: dict[tuple[str, str], frozenset[str]] = {
    ("api:me", "GET"): ANY,
    ("api:users", "GET"): frozenset(),
    ("api:api_keys", "GET"): frozenset(),
    ("api:api_keys", "POST"): frozenset(),
    ("api:api_key_revoke", "POST"): frozenset(),
    ("api:limits", "GET"): frozenset(),
    ("api:api_key_limits", "GET"): frozenset(),
    ("api:user_limits", "GET"): frozenset(),
    ("api:role_limits", "GET"): frozenset(),
    ("api:audit_events", "GET"): frozenset({AUDIT}),
    ("api:audit_export_csv", "POST"): frozenset({AUDIT}),
    ("api:audit_export_jsonl", "POST"): frozenset({AUDIT}),
    ("api:audit_export_pdf", "POST"): frozenset({AUDIT}),
    ("api:audit_public_key", "GET"): frozenset({AUDIT}),
    ("api:usage", "GET"): frozenset({INFERENCE, AUDIT}),
    ("api:usage_daily", "GET"): frozenset({INFERENCE, AUDIT}),
    ("api:usage_limits", "GET"): frozenset({INFERENCE, AUDIT}),
    ("api:repos", "GET"): frozenset({REGISTRY}),
    ("api:repos", "POST"): frozenset(),
    ("api:repo", "GET"): frozenset({REGISTRY}),
    ("api:version_upload", "POST"): frozenset(),
    ("api:version_import_path", "POST"): frozenset(),
    ("api:model_import_request", "POST"): frozenset(),
    ("api:model_import", "GET"): frozenset({REGISTRY}),
    ("api:version", "GET"): frozenset({REGISTRY}),
    ("api:version_approve", "POST"): frozenset({REVIEW}),
    ("api:version_deprecate", "POST"): frozenset({REVIEW}),
    ("api:version_lineage", "GET"): frozenset({REGISTRY}),
    ("api:version_bom", "GET"): frozenset({REGISTRY}),
    ("api:version_licence_overrides", "GET"): frozenset({REGISTRY}),
    ("api:version_licence_overrides", "POST"): frozenset(),
    ("api:optimise_jobs", "GET"): frozenset({REGISTRY}),
    ("api:optimise_jobs", "POST"): frozenset(),
    ("api:optimise_job", "GET"): frozenset({REGISTRY}),
    ("api:evaluations", "GET"): frozenset({REGISTRY}),
    ("api:evaluations", "POST"): frozenset({DATASETS}),
    ("api:evaluation", "GET"): frozenset({REGISTRY}),
    ("api:optimise_compare", "GET"): frozenset({REGISTRY}),
    ("api:datasets", "GET"): frozenset({DATASETS}),
    ("api:datasets", "POST"): frozenset({DATASETS}),
    ("api:dataset", "GET"): frozenset({DATASETS}),
    ("api:dataset_version_upload", "POST"): frozenset({DATASETS}),
    ("api:dataset_import_request", "POST"): frozenset({DATASETS}),
    ("api:dataset_import", "GET"): frozenset({DATASETS}),
    ("api:dataset_version", "GET"): frozenset({DATASETS}),
    ("api:dataset_version_rows", "GET"): frozenset({DATASETS}),
    ("api:dataset_version_derive", "POST"): frozenset({DATASETS}),
    ("api:dataset_version_export", "GET"): frozenset({DATASETS}),
    ("api:dataset_transform", "GET"): frozenset({DATASETS}),
    ("api:finetunes", "GET"): frozenset({DATASETS}),
    ("api:finetunes", "POST"): frozenset({DATASETS}),
    ("api:finetune", "GET"): frozenset({DATASETS}),
    ("api:finetune_cancel", "POST"): frozenset({DATASETS}),
    ("api:finetune_retry", "POST"): frozenset({DATASETS}),
    ("api:deployments", "GET"): frozenset({REGISTRY, INFERENCE}),
    ("api:deployments", "POST"): frozenset(),
    ("api:deployment", "GET"): frozenset({REGISTRY, INFERENCE}),
    ("api:deployment_start", "POST"): frozenset(),
    ("api:deployment_stop", "POST"): frozenset(),
    ("api:deployment_restart", "POST"): frozenset(),
    ("api:deployment_scale", "POST"): frozenset(),
    ("api:deployment_switch", "POST"): frozenset(),
    ("api:deployment_rollback", "POST"): frozenset(),
    ("api:deployment_load_on_demand", "POST"): frozenset(),
    ("api:workers", "GET"): frozenset({REGISTRY, INFERENCE}),
    ("api:worker_credentials", "GET"): frozenset(),
    ("api:worker_credentials", "POST"): frozenset(),
    ("api:worker_credential_revoke", "POST"): frozenset(),
    ("api:setup_switch", "POST"): frozenset(),
    ("api:setups", "GET"): frozenset({REGISTRY}),
    ("api:setups", "POST"): frozenset(),
    ("api:setup", "GET"): frozenset({REGISTRY}),
    ("api:setup_advise", "POST"): frozenset({REGISTRY}),
    ("api:setup_advise_apply", "POST"): frozenset(),
    ("api:setup_deploy", "POST"): frozenset(),
    ("api:setup_trial", "POST"): frozenset(),
    ("api:setup_recipe", "GET"): frozenset(),
    ("api:recipe_import", "POST"): frozenset(),
    ("api:recipe_book", "GET"): frozenset({REGISTRY}),
    ("api:trials", "GET"): frozenset({REGISTRY}),
    ("api:trial", "GET"): frozenset({REGISTRY}),
    ("api_schema", "GET"): ANY,
    ("api_docs", "GET"): ANY,
    ("openai:models", "GET"): frozenset({INFERENCE}),
    ("openai:model", "GET"): frozenset({INFERENCE}),
    ("openai:chat_completions", "POST"): frozenset({INFERENCE}),
    ("openai:completions", "POST"): frozenset({INFERENCE}),
    ("openai:embeddings", "POST"): frozenset({INFERENCE}),
    ("ops:metrics", "GET"): frozenset({METRICS}),
}
# Bodies the /v1/ endpoints parse before they route (and check the scope).
BODIES = {
    "openai:chat_completions": {"model": "nope", "messages": [{"role": "user", "content": "hi"}]},
    "openai:completions": {"model": "nope", "prompt": "hi"},
    "openai:embeddings": {"model": "nope", "input": "hi"},
}


def _walk(patterns, prefix: str = "", namespace: str = ""):
    for pattern in patterns:
        if isinstance(pattern, URLResolver):
            inner = ":".join(n for n in (namespace, pattern.namespace) if n)
            yield from _walk(pattern.url_patterns, prefix + str(pattern.pattern), inner)
        elif isinstance(pattern, URLPattern):
            name = f"{namespace}:{pattern.name}" if namespace else pattern.name
            path = prefix + str(pattern.pattern)
            # Objects that do not exist: an allowed call is a 404 (or a 400), never a write.
            path = re.sub(r"<int:\w+>", "999999", path)
            yield name, "/" + re.sub(r"<(?:\w+:)?\w+>", "nope", path)


ROUTES = dict(_walk(get_resolver().url_patterns))


@pytest.fixture
def keys(db):
    owner = make_user(Role.ADMIN, username="key-owner")
    return {
        scope: api_key_create(actor=owner, owner=owner, name=scope, scopes=[scope]).secret
        for scope in Scope
    }


def call(name: str, method: str, secret: str | None):
    headers = {"HTTP_AUTHORIZATION": f"Bearer {secret}"} if secret else {}
    client = Client()
    if method == "GET":
        return client.get(ROUTES[name], **headers)
    body = json.dumps(BODIES.get(name, {}))
    return client.post(ROUTES[name], body, content_type="application/json", **headers)


def test_every_route_is_in_the_table(keys):
    """The table names exactly the methods that the API's routes answer; the routes
    outside it are pages (``test_an_api_key_opens_no_page``)."""
    api = {n for n in ROUTES if n.startswith(("api:", "openai:"))} | {n for n, _ in KEY_ROUTES}
    answered = {
        (name, method)
        for name in api
        for method in ("GET", "POST")
        if call(name, method, keys[ADMIN]).status_code != 405
    }
    assert answered == set(KEY_ROUTES)


@pytest.mark.parametrize("route", sorted(KEY_ROUTES), ids=lambda r: f"{r[1]} {r[0]}")
def test_each_scope_opens_only_its_routes(keys, route):
    name, method = route
    allowed = KEY_ROUTES[route] | {ADMIN}
    for scope, secret in keys.items():
        status = call(name, method, secret).status_code
        if scope in allowed:
            assert status not in (401, 403), f"a key with {scope} was refused ({status})"
        else:
            assert status == 403, f"a key with only {scope} was let through ({status})"


@pytest.mark.parametrize("name", sorted({n for n in ROUTES} - {n for n, _ in KEY_ROUTES}))
def test_an_api_key_opens_no_page(keys, name):
    for method in ("GET", "POST"):
        anonymous = call(name, method, None)
        keyed = call(name, method, keys[ADMIN])
        assert keyed.status_code == anonymous.status_code, (name, method)
        assert keyed.get("Location") == anonymous.get("Location"), (name, method)


def test_the_scope_table_in_the_docs_matches_the_code():
    """docs/permissions.md lists every scope once, with the roles that may hold it."""
    text = (Path(settings.BASE_DIR) / "docs" / "permissions.md").read_text()
    section = text.split("## API key scopes", 1)[1]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    names = {
        "admin": Role.ADMIN,
        "data scientist": Role.DATA_SCIENTIST,
        "app developer": Role.APP_DEVELOPER,
        "compliance officer": Role.COMPLIANCE_OFFICER,
    }
    documented = {}
    for row in rows:
        scope, _, holders = (cell.strip() for cell in row.strip("|").split("|"))
        roles = (
            set(names.values())
            if holders == "all roles"
            else {names[h.strip()] for h in holders.split(",")}
        )
        documented[scope.strip("`")] = roles
    assert documented == {
        scope: {role for role in Role if scope in ROLE_SCOPES[role]} for scope in Scope.values
    }
