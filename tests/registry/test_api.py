import pytest
from django.test import Client
from rest_framework.test import APIClient

from apps.accounts.models import Role, Scope
from apps.accounts.services import api_key_create
from apps.registry.artifacts import artifact_store
from apps.registry.models import ModelVersion
from tests.conftest import client_for, make_user
from tests.registry.conftest import stored_files, write_tiny_gguf


def api_as(user) -> APIClient:
    client = APIClient()
    client.force_login(user)
    return client


def upload(client, repo_name, path, name=None):
    url = f"/api/v1/registry/repos/{repo_name}/versions/"
    if name is None:
        with path.open("rb") as fh:
            return client.post(url, {"file": fh}, format="multipart")
    # A hand-made body, so the file name goes on the wire exactly as given.
    boundary = "aiboxtestboundary"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n"
        ).encode()
        + path.read_bytes()
        + f"\r\n--{boundary}--\r\n".encode()
    )
    return client.generic(
        "POST", url, body, content_type=f"multipart/form-data; boundary={boundary}"
    )


def test_upload_through_the_api(users, repo, tiny_gguf):
    client = api_as(users[Role.DATA_SCIENTIST])
    response = upload(client, repo.name, tiny_gguf)
    assert response.status_code == 201, response.content
    body = response.json()
    assert body["number"] == 1 and body["architecture"] == "llama"
    assert body["context_length"] == 256 and body["source_kind"] == "upload"
    assert body["created_by"] == "dana" and body["state"] == "draft"

    again = upload(client, repo.name, tiny_gguf)
    assert again.status_code == 200 and again.json()["id"] == body["id"]

    listed = client.get(f"/api/v1/registry/repos/{repo.name}/").json()
    assert [v["sha256"] for v in listed["versions"]] == [body["sha256"]]
    assert len(stored_files(artifact_store().root)) == 1


def test_upload_name_cannot_escape_the_store(users, repo, tiny_gguf, tmp_path):
    client = api_as(users[Role.DATA_SCIENTIST])
    response = upload(client, repo.name, tiny_gguf, name="../../../../tmp/evil.gguf")
    assert response.status_code == 201
    assert response.json()["file_name"] == "evil.gguf"  # the client's path is dropped
    assert stored_files(artifact_store().root) == [
        artifact_store().path_for(response.json()["sha256"])
    ]


@pytest.mark.parametrize(
    ("content", "name", "status", "message"),
    [
        (b"\x80\x04K\x01.", "model.ckpt", 400, "pickle-based format"),
        (b"GGUF" + b"\x00" * 100, "broken.gguf", 400, "not a usable GGUF file"),
        (b"x" * 5000, "big.gguf", 413, "larger than the upload limit of 4,096 bytes"),
    ],
)
def test_bad_uploads_get_clear_errors_and_leave_nothing(
    users, repo, tmp_path, settings, content, name, status, message
):
    settings.UPLOAD_MAX_BYTES = 4096
    path = tmp_path / name
    path.write_bytes(content)
    response = upload(api_as(users[Role.DATA_SCIENTIST]), repo.name, path)
    assert response.status_code == status
    assert message in response.json()["detail"]
    assert stored_files(artifact_store().root) == []
    assert not ModelVersion.objects.exists()


def test_missing_file_field(users, repo):
    response = api_as(users[Role.DATA_SCIENTIST]).post(
        f"/api/v1/registry/repos/{repo.name}/versions/", {"other": "x"}, format="multipart"
    )
    assert response.status_code == 400
    assert "multipart field named 'file'" in response.json()["detail"]


def test_roles_and_scopes(users, repo, tiny_gguf):
    dev = users[Role.APP_DEVELOPER]
    assert api_as(dev).get("/api/v1/registry/repos/").status_code == 200
    assert upload(api_as(dev), repo.name, tiny_gguf).status_code == 403
    created = api_as(dev).post(
        "/api/v1/registry/repos/", {"name": "x", "licence": "mit"}, format="json"
    )
    assert created.status_code == 403
    assert stored_files(artifact_store().root) == []

    key = api_key_create(actor=dev, owner=dev, name="ro", scopes=[Scope.REGISTRY_READ])
    reader = APIClient()
    reader.credentials(HTTP_AUTHORIZATION=f"Bearer {key.secret}")
    assert reader.get(f"/api/v1/registry/repos/{repo.name}/").status_code == 200
    assert reader.get("/api/v1/registry/repos/nope/").status_code == 404
    inference_only = api_key_create(actor=dev, owner=dev, name="inf", scopes=[Scope.INFERENCE])
    reader.credentials(HTTP_AUTHORIZATION=f"Bearer {inference_only.secret}")
    assert reader.get("/api/v1/registry/repos/").status_code == 403


def test_approve_and_deprecate_through_the_api(users, repo, tiny_gguf):
    version = upload(api_as(users[Role.DATA_SCIENTIST]), repo.name, tiny_gguf).json()
    url = f"/api/v1/registry/versions/{version['id']}"
    refused = api_as(users[Role.APP_DEVELOPER]).post(f"{url}/approve", {"reason": "x"})
    assert refused.status_code == 403
    no_reason = api_as(users[Role.COMPLIANCE_OFFICER]).post(f"{url}/approve", {})
    assert no_reason.status_code == 400 and "Say why" in no_reason.json()["detail"]
    ok = api_as(users[Role.COMPLIANCE_OFFICER]).post(f"{url}/approve", {"reason": "reviewed"})
    assert ok.status_code == 200 and ok.json()["state"] == "approved"
    gone = api_as(users[Role.ADMIN]).post(f"{url}/deprecate", {"reason": "old"})
    assert gone.json()["state"] == "deprecated"


def test_approving_with_a_key_needs_the_review_scope(users, repo, tiny_gguf):
    """A compliance officer's reading key (or an admin's inference key) changes no state."""
    version = upload(api_as(users[Role.DATA_SCIENTIST]), repo.name, tiny_gguf).json()
    url = f"/api/v1/registry/versions/{version['id']}"
    officer, admin = users[Role.COMPLIANCE_OFFICER], users[Role.ADMIN]
    client = APIClient()
    for owner, scopes in (
        (officer, [Scope.AUDIT_READ, Scope.REGISTRY_READ]),
        (admin, [Scope.INFERENCE]),
    ):
        key = api_key_create(actor=owner, owner=owner, name="k", scopes=scopes)
        client.credentials(HTTP_AUTHORIZATION=f"Bearer {key.secret}")
        for transition in ("approve", "deprecate"):
            refused = client.post(f"{url}/{transition}", {"reason": "automated"})
            assert refused.status_code == 403
            assert "lacks the scope" in refused.json()["detail"]
    assert ModelVersion.objects.get(pk=version["id"]).state == "draft"
    review = api_key_create(actor=officer, owner=officer, name="r", scopes=[Scope.REGISTRY_REVIEW])
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {review.secret}")
    approved = client.post(f"{url}/approve", {"reason": "reviewed by the pipeline"})
    assert approved.status_code == 200 and approved.json()["state"] == "approved"


def test_create_repo_validation(users):
    client = api_as(users[Role.DATA_SCIENTIST])
    bad = client.post("/api/v1/registry/repos/", {"name": "Bad Name!", "licence": "mit"})
    assert bad.status_code == 400 and "name" in bad.json()
    good = client.post("/api/v1/registry/repos/", {"name": "llama-3-8b", "licence": "llama3"})
    assert good.status_code == 201 and good.json()["owner"] == "dana"
    dup = client.post("/api/v1/registry/repos/", {"name": "llama-3-8b", "licence": "llama3"})
    assert dup.status_code == 400


def test_web_upload_answers_json_for_the_progress_bar(users, repo, tiny_gguf):
    client = client_for(users[Role.DATA_SCIENTIST])
    with tiny_gguf.open("rb") as fh:
        response = client.post(f"/registry/models/{repo.name}/upload", {"file": fh})
    assert response.status_code == 201
    version = ModelVersion.objects.get()
    assert response.json()["url"] == f"/registry/versions/{version.pk}/"
    assert version.source == {"client_file_name": "tiny.gguf", "via": "web"}
    page = client.get(f"/registry/models/{repo.name}/").content.decode()
    assert "tiny.gguf" in page and version.sha256[:12] in page


def test_web_upload_enforces_csrf_and_cleans_up(users, repo, tiny_gguf):
    client = Client(enforce_csrf_checks=True)
    client.force_login(users[Role.DATA_SCIENTIST])
    with tiny_gguf.open("rb") as fh:
        response = client.post(f"/registry/models/{repo.name}/upload", {"file": fh})
    assert response.status_code == 403
    assert stored_files(artifact_store().root) == []


def test_version_page_approval_form(users, repo, tiny_gguf):
    upload(api_as(users[Role.DATA_SCIENTIST]), repo.name, tiny_gguf)
    version = ModelVersion.objects.get()
    officer = client_for(users[Role.COMPLIANCE_OFFICER])
    page = officer.get(f"/registry/versions/{version.pk}/").content.decode()
    assert "Approve" in page and version.sha256 in page
    response = officer.post(
        f"/registry/versions/{version.pk}/", {"action": "approve", "reason": "licence checked"}
    )
    assert response.status_code == 302
    version.refresh_from_db()
    assert version.state == "approved"
    ds_page = client_for(users[Role.DATA_SCIENTIST]).get(f"/registry/versions/{version.pk}/")
    assert b"Deprecate" not in ds_page.content


def test_tiny_writer_makes_distinct_files(tmp_path):
    a = write_tiny_gguf(tmp_path / "a.gguf", seed=1).read_bytes()
    b = write_tiny_gguf(tmp_path / "b.gguf", seed=2).read_bytes()
    assert a != b


def test_import_path_with_a_nul_byte_is_a_clear_error(users, repo, settings, tmp_path):
    settings.IMPORT_DIRS = [tmp_path]
    response = api_as(users[Role.ADMIN]).post(
        f"/api/v1/registry/repos/{repo.name}/import-path",
        {"path": f"{tmp_path}/model\x00.gguf"},
        format="json",
    )
    assert response.status_code == 400
    assert response.json()["detail"] == "The path contains a NUL character."


def test_data_scientists_add_versions_only_to_their_own_models(users, repo, tiny_gguf):
    """The repo fixture is dana's; another data scientist can read it but not add to it."""
    dora = make_user(Role.DATA_SCIENTIST, username="dora")
    refused = upload(api_as(dora), repo.name, tiny_gguf)
    assert refused.status_code == 403
    assert refused.json()["detail"] == "Only the model's owner or an admin may add versions to it."
    hf = api_as(dora).post(
        f"/api/v1/registry/repos/{repo.name}/import-hf",
        {"repo_id": "acme/model", "filename": "model.gguf"},
        format="json",
    )
    assert hf.status_code == 403
    assert not ModelVersion.objects.filter(repo=repo).exists()
    assert stored_files(artifact_store().root) == []
    assert upload(api_as(users[Role.ADMIN]), repo.name, tiny_gguf).status_code == 201
    assert upload(api_as(users[Role.DATA_SCIENTIST]), repo.name, tiny_gguf).status_code == 200
