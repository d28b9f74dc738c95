"""Lineage of a fine-tuned adapter: the graph (API and page) and its CycloneDX ML-BOM,
validated against the official CycloneDX 1.6 schema bundled with cyclonedx-python-lib."""

from __future__ import annotations

import json
import re

import pytest
from cyclonedx.schema import SchemaVersion
from cyclonedx.validation.json import JsonStrictValidator

from apps.accounts.models import Role
from apps.audit.models import AuditEvent
from apps.datasets.models import Dataset, DatasetVersion
from apps.datasets.models import SourceKind as DataSourceKind
from apps.datasets.models import State as DataState
from apps.deployments.services import deployment_create
from apps.finetune.models import FineTuneJob, JobState
from apps.registry.artifacts import artifact_store
from apps.registry.models import Artifact, SourceKind
from apps.registry.services import model_repo_create, model_version_approve, model_version_ingest
from tests.conftest import client_for
from tests.registry.conftest import upload_version, write_tiny_gguf


def _ingest(actor, repo, path, **kw):
    return model_version_ingest(
        actor=actor,
        repo=repo,
        staged=artifact_store().stage_copy(path),
        file_name=path.name,
        **kw,
    ).version


def _dataset_version(dataset, number, *, parent=None, content: bytes, actor):
    staged = artifact_store().stage_chunks([content])
    artifact, _ = Artifact.objects.get_or_create(sha256=staged.sha256, defaults={"size": 1})
    artifact_store().commit(staged)
    return DatasetVersion.objects.create(
        dataset=dataset,
        number=number,
        artifact=artifact,
        file_name=f"{dataset.name}-{number}.jsonl",
        format="jsonl",
        source_kind=DataSourceKind.DERIVED if parent else DataSourceKind.UPLOAD,
        parent=parent,
        transformation={"operation": "split", "part": "train"} if parent else {},
        state=DataState.VALID,
        rows=4,
        created_by=actor,
    )


@pytest.fixture
def family(users, tmp_path):
    """A base model (apache-2.0) fine-tuned by a job on a derived cc-by-4.0 dataset into a
    LoRA adapter, which a deployment serves with the base; a second base version is a
    child of the first."""
    admin, dana = users[Role.ADMIN], users[Role.DATA_SCIENTIST]
    base_repo = model_repo_create(
        actor=admin,
        name="tiny",
        licence="apache-2.0",
        licence_url="https://www.apache.org/licenses/LICENSE-2.0",
    )
    base = _ingest(
        admin,
        base_repo,
        write_tiny_gguf(tmp_path / "tiny.gguf"),
        source_kind=SourceKind.HUGGING_FACE,
        source={
            "repo_id": "acme/tiny",
            "filename": "tiny.gguf",
            "commit": "a" * 40,
            "endpoint": "https://hub.example",
        },
    )
    model_version_approve(actor=admin, version=base, reason="test")
    requant = _ingest(
        admin,
        base_repo,
        write_tiny_gguf(tmp_path / "tiny-q.gguf", seed=3),
        source_kind=SourceKind.UPLOAD,
        source={},
        parents=[base],
    )
    dataset = Dataset.objects.create(name="chats", licence="cc-by-4.0", owner=dana)
    raw = _dataset_version(dataset, 1, content=b'{"text": "a"}\n' * 8, actor=dana)
    train = _dataset_version(dataset, 2, parent=raw, content=b'{"text": "a"}\n' * 4, actor=dana)
    job = FineTuneJob.objects.create(
        name="tiny-lora",
        base_model=base,
        dataset_version=train,
        params={"lora_rank": 8, "seed": 1},
        output_repo="tiny-lora",
        state=JobState.SUCCEEDED,
        created_by=dana,
    )
    adapter_repo = model_repo_create(actor=dana, name="tiny-lora", licence="apache-2.0")
    adapter = _ingest(
        dana,
        adapter_repo,
        write_tiny_gguf(tmp_path / "lora.gguf", adapter=True, seed=1),
        source_kind=SourceKind.FINE_TUNE,
        source={
            "finetune_job": job.pk,
            "base_model_version": base.pk,
            "dataset_versions": [{"id": train.pk, "sha256": train.sha256}],
            "final_train_loss": 1.25,
        },
        parents=[base],
    )
    job.adapter = adapter
    job.save()
    model_version_approve(actor=admin, version=adapter, reason="test")
    deployment = deployment_create(
        actor=admin, name="tiny-chat", model_version=base, adapter=adapter, context_length=256
    )
    return {
        "base": base,
        "requant": requant,
        "raw": raw,
        "train": train,
        "job": job,
        "adapter": adapter,
        "deployment": deployment,
    }


def test_lineage_json_walks_both_ways_across_models_data_jobs_and_deployments(users, family):
    base, adapter, job = family["base"], family["adapter"], family["job"]
    client = client_for(users[Role.COMPLIANCE_OFFICER])

    body = client.get(f"/api/v1/registry/versions/{adapter.pk}/lineage").json()
    nodes = {n["id"]: n for n in body["nodes"]}
    edges = {(e["source"], e["target"], e["kind"]) for e in body["edges"]}
    assert body["root"] == f"model_version:{adapter.pk}"
    assert nodes[f"model_version:{base.pk}"]["relation"] == "ancestor"
    assert nodes[f"dataset_version:{family['raw'].pk}"]["relation"] == "ancestor"
    assert edges >= {
        (f"model_version:{base.pk}", f"finetune_job:{job.pk}", "base_model"),
        (f"dataset_version:{family['train'].pk}", f"finetune_job:{job.pk}", "training_data"),
        (
            f"dataset_version:{family['raw'].pk}",
            f"dataset_version:{family['train'].pk}",
            "dataset_derived",
        ),
        (f"finetune_job:{job.pk}", f"model_version:{adapter.pk}", "produced"),
        (f"model_version:{adapter.pk}", f"deployment:{family['deployment'].pk}", "adapter_of"),
    }
    # The sibling re-quantisation is neither an ancestor nor a descendant of the adapter.
    assert f"model_version:{family['requant'].pk}" not in nodes

    body = client.get(f"/api/v1/registry/versions/{base.pk}/lineage").json()
    relations = {n["id"]: n["relation"] for n in body["nodes"]}
    assert relations == {
        f"model_version:{base.pk}": "root",
        f"model_version:{family['requant'].pk}": "descendant",
        f"finetune_job:{job.pk}": "descendant",
        f"model_version:{adapter.pk}": "descendant",
        f"deployment:{family['deployment'].pk}": "descendant",
    }


def test_lineage_leaves_out_what_the_user_may_not_see(users, family):
    # An app developer may read the registry but not datasets or fine-tune jobs.
    client = client_for(users[Role.APP_DEVELOPER])
    body = client.get(f"/api/v1/registry/versions/{family['adapter'].pk}/lineage").json()
    kinds = {n["kind"] for n in body["nodes"]}
    assert kinds == {"model_version", "deployment"}
    assert body["restricted"] >= 2
    assert "chats" not in json.dumps(body)


def test_bom_is_valid_cyclonedx_1_6_and_names_the_base_model_and_datasets(users, family):
    adapter, base, train = family["adapter"], family["base"], family["train"]
    cora = users[Role.COMPLIANCE_OFFICER]
    response = client_for(cora).get(f"/api/v1/registry/versions/{adapter.pk}/bom.cdx.json")
    assert response.status_code == 200
    assert response["Content-Type"].startswith("application/vnd.cyclonedx+json")
    text = response.content.decode()

    error = JsonStrictValidator(SchemaVersion.V1_6).validate_str(text)
    assert error is None, error

    bom = json.loads(text)
    root = bom["metadata"]["component"]
    assert root["type"] == "machine-learning-model"
    assert root["hashes"] == [{"alg": "SHA-256", "content": adapter.sha256}]
    # It inherits its training data's licence.
    assert root["licenses"] == [{"expression": "Apache-2.0 AND CC-BY-4.0"}]
    components = {c["bom-ref"]: c for c in bom["components"]}
    base_c = components[f"model_version:{base.pk}"]
    assert base_c["hashes"][0]["content"] == base.sha256
    assert base_c["purl"] == "pkg:huggingface/acme/tiny@" + "a" * 40
    assert {
        "type": "distribution",
        "url": f"https://hub.example/acme/tiny/resolve/{'a' * 40}/tiny.gguf",
    }.items() <= base_c["externalReferences"][0].items()
    data = components[f"dataset_version:{train.pk}"]
    assert data["type"] == "data" and data["data"][0]["type"] == "dataset"
    assert data["hashes"][0]["content"] == train.sha256
    assert data["licenses"] == [{"license": {"id": "CC-BY-4.0"}}]
    assert f"dataset_version:{family['raw'].pk}" in components
    # The card names the training data; dependencies carry the lineage.
    assert root["modelCard"]["modelParameters"]["datasets"] == [
        {"ref": f"dataset_version:{train.pk}"}
    ]
    depends = {d["ref"]: set(d["dependsOn"]) for d in bom["dependencies"]}
    assert depends[f"model_version:{adapter.pk}"] == {
        f"model_version:{base.pk}",
        f"dataset_version:{train.pk}",
    }
    assert depends[f"dataset_version:{train.pk}"] == {f"dataset_version:{family['raw'].pk}"}
    # The export is audited.
    event = AuditEvent.objects.filter(action="model_version.bom_export").latest("id")
    assert event.actor_label == cora.username
    assert event.details["serial_number"] == bom["serialNumber"]


def test_bom_licence_expression_uses_licence_refs_for_named_licences(users, family, tmp_path):
    admin = users[Role.ADMIN]
    repo = model_repo_create(actor=admin, name="gemma-ish", licence="gemma")
    child = _ingest(
        admin,
        repo,
        write_tiny_gguf(tmp_path / "child.gguf", seed=9),
        source_kind=SourceKind.UPLOAD,
        source={},
        parents=[family["base"]],
    )
    response = client_for(admin).get(f"/api/v1/registry/versions/{child.pk}/bom.cdx.json")
    text = response.content.decode()
    assert JsonStrictValidator(SchemaVersion.V1_6).validate_str(text) is None
    root = json.loads(text)["metadata"]["component"]
    assert root["licenses"] == [{"expression": "LicenseRef-gemma AND Apache-2.0"}]


def test_lineage_page_draws_the_graph_with_links(users, family):
    adapter = family["adapter"]
    response = client_for(users[Role.DATA_SCIENTIST]).get(
        f"/registry/versions/{adapter.pk}/lineage"
    )
    assert response.status_code == 200
    html = response.content.decode()
    svg = html[html.index('<svg id="lineage-graph"') : html.index("</svg>")]
    for url in (
        f"/registry/versions/{family['base'].pk}/",
        f"/datasets/versions/{family['train'].pk}/",
        f"/datasets/versions/{family['raw'].pk}/",
        f"/finetunes/{family['job'].pk}/",
        f"/deployments/{family['deployment'].name}/",
    ):
        assert f'href="{url}"' in svg
    assert len(re.findall(r"<path class=\"edge ", svg)) == 5
    assert not re.search(r"<script[^>]+src=\"https?:", html)  # nothing fetched at run time
    # The version page links here and to the BOM download.
    page = client_for(users[Role.DATA_SCIENTIST]).get(f"/registry/versions/{adapter.pk}/")
    assert f"/registry/versions/{adapter.pk}/lineage" in page.content.decode()
    download = client_for(users[Role.DATA_SCIENTIST]).post(
        f"/registry/versions/{adapter.pk}/bom.cdx.json"
    )
    assert download.status_code == 200
    assert "attachment" in download["Content-Disposition"]
    assert JsonStrictValidator(SchemaVersion.V1_6).validate_str(download.content.decode()) is None


def test_lineage_of_an_unknown_version_is_404(users):
    client = client_for(users[Role.ADMIN])
    assert client.get("/api/v1/registry/versions/999999/lineage").status_code == 404
    assert client.get("/api/v1/registry/versions/999999/bom.cdx.json").status_code == 404


def test_a_bom_download_cannot_be_started_from_another_site(users, tmp_path, settings):
    settings.ARTIFACT_ROOT = tmp_path / "artifacts"
    admin = users[Role.ADMIN]
    repo = model_repo_create(actor=admin, name="crossed", licence="mit")
    version = upload_version(admin, repo, write_tiny_gguf(tmp_path / "x.gguf"))
    client = client_for(admin)
    url = f"/api/v1/registry/versions/{version.pk}/bom.cdx.json"
    refused = client.get(url, HTTP_SEC_FETCH_SITE="cross-site")
    assert refused.status_code == 403 and "from AIBox itself" in refused.json()["detail"]
    assert not AuditEvent.objects.filter(action="model_version.bom_export").exists()
    assert client.get(url, HTTP_SEC_FETCH_SITE="same-origin").status_code == 200
    assert client.get(f"/registry/versions/{version.pk}/bom.cdx.json").status_code == 405
    assert client.get("/registry/versions/999999/lineage").status_code == 404
