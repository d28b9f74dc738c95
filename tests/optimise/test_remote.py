"""Optimise jobs on a training worker on "another host": no database, no shared disk, its
own credential (``remote_trainer_running`` in tests/conftest.py, on the ``optimise``
queue). It claims a quantisation (with an importance matrix on a dataset) and an
evaluation, pulls their inputs over HTTP, reports progress through the control plane,
and sends back the new GGUF file and the figures; the control plane registers and
stores them as for a worker with the database.

The session's training worker is stopped for the live test, so the jobs can only go to
the remote one, and started again afterwards.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from apps.accounts.models import Role
from apps.accounts.services import system_user
from apps.audit.models import AuditEvent
from apps.datasets.models import DatasetVersion
from apps.datasets.services import dataset_create
from apps.optimise.models import Evaluation, JobState, ModelJob, Operation
from apps.registry.artifacts import artifact_store
from apps.registry.bundled import model_register_bundled
from apps.registry.models import ModelVersion, SourceKind
from tests.conftest import RemoteTrainer, remote_trainer_running
from tests.datasets.conftest import jsonl, upload, wait_validated
from tests.optimise.conftest import TEXT_ROWS, run_evaluation, run_job
from workers.artifacts import file_sha256

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(autouse=True)
def artifact_root(settings, live_worker) -> Path:
    settings.ARTIFACT_ROOT = live_worker.artifact_root
    return live_worker.artifact_root


@pytest.fixture
def gemma() -> ModelVersion:
    return model_register_bundled(actor=system_user()).version


@pytest.fixture
def prose(users) -> DatasetVersion:
    dana = users[Role.DATA_SCIENTIST]
    dataset = dataset_create(actor=dana, name="prose", licence="cc-by-4.0")
    return wait_validated(upload(dana, dataset, "prose.jsonl", jsonl(TEXT_ROWS)).json()["id"])


@pytest.fixture
def remote_optimiser(control_plane, training_worker, tmp_path) -> Iterator[RemoteTrainer]:
    with remote_trainer_running(
        control_plane, training_worker, tmp_path, queues="optimise"
    ) as trainer:
        yield trainer


def test_a_worker_without_database_access_quantises_and_evaluates(
    users, gemma, prose, remote_optimiser
):
    dana = users[Role.DATA_SCIENTIST]
    job = run_job(
        dana,
        {
            "operation": "quantize",
            "source": gemma.pk,
            "quant_type": "Q8_0",
            "allow_requantize": True,
            "imatrix_dataset": prose.pk,
            "imatrix_chunks": 2,
            "output_repo": "gemma-remote",
        },
    )
    assert job.worker == remote_optimiser.name
    # Its progress and heartbeat came through the control plane.
    assert job.progress == 100 and job.progress_message
    assert job.heartbeat_at > job.started_at
    # The new file is in the registry, with the same provenance as a local job's.
    q8 = job.output_version
    assert (q8.repo.name, q8.quantization, q8.source_kind) == (
        "gemma-remote",
        "Q8_0",
        SourceKind.QUANTIZED,
    )
    assert list(q8.parents.all()) == [gemma]
    assert q8.source["optimise_job"] == job.pk and q8.source["source_sha256"] == gemma.sha256
    assert q8.source["requantized"] is True and q8.source["llama_cpp"]
    assert q8.source["imatrix"]["sha256"] == prose.sha256 and q8.source["imatrix"]["chunks"] == 2
    assert artifact_store().verify(q8.sha256).stat().st_size == q8.size
    assert AuditEvent.objects.filter(action="optimise.quantize.succeeded", target_id=str(job.pk))

    evaluation = run_evaluation(
        dana,
        {
            "model_version": q8.pk,
            "dataset_version": prose.pk,
            "reference": gemma.pk,
            "n_ctx": 128,
            "max_chunks": 4,
        },
    )
    assert evaluation.worker == remote_optimiser.name
    assert evaluation.perplexity > 1 and evaluation.perplexity_uncertainty > 0
    assert evaluation.kl_divergence >= 0 and 0 < evaluation.top_token_agreement <= 1
    assert evaluation.result["rows"] == len(TEXT_ROWS) and evaluation.result["hardware"]

    # Every input was pulled over HTTP into the worker's own cache, checked, and audited
    # under its name: the source, the text, and the new file the evaluation measured.
    inputs = {gemma.sha256, prose.sha256, q8.sha256}
    for sha256 in inputs:
        cached = remote_optimiser.cache / sha256[:2] / sha256
        assert cached.is_file() and file_sha256(cached) == sha256
    pulls = AuditEvent.objects.filter(
        action="artifact.pulled", actor_label=f"worker:{remote_optimiser.name}"
    )
    assert set(pulls.values_list("target_id", flat=True)) == inputs
    # The work folders are gone from the worker.
    assert not list(remote_optimiser.work.glob("optimise-*"))


def test_the_internal_optimise_endpoints_take_only_a_worker_credential_and_the_running_worker(
    users, gemma, prose, control_plane
):
    dana = users[Role.DATA_SCIENTIST]
    job = ModelJob.objects.create(
        operation=Operation.QUANTIZE,
        source=gemma,
        params={"quant_type": "Q8_0", "allow_requantize": True},
        output_repo="remote-refusals",
        created_by=dana,
    )
    evaluation = Evaluation.objects.create(
        model_version=gemma,
        dataset_version=prose,
        dataset_sha256=prose.sha256,
        params={"metric": "perplexity", "n_ctx": 128, "max_chunks": 2},
        created_by=dana,
    )
    base = f"{control_plane.url}/internal/v1/optimise"
    jobs, evaluations = f"{base}/jobs/{job.pk}", f"{base}/evaluations/{evaluation.pk}"
    worker = {"Authorization": f"Bearer {control_plane.token}"}
    with httpx.Client(timeout=30) as http:
        # No credential, or one that is not real: refused, whatever the route.
        assert http.post(f"{jobs}/claim", json={"worker": "w1"}).status_code == 401
        bad = {"Authorization": "Bearer aibw_not-a-real-one"}
        refused = http.post(f"{jobs}/progress", json={"worker": "w1"}, headers=bad)
        assert refused.status_code == 401
        assert (
            http.post(f"{base}/models/1/claim", json={"worker": "w1"}, headers=worker).status_code
            == 404
        )

        # A queued job: a claim hands over its order; a second claim gets 409.
        claim = http.post(f"{jobs}/claim", json={"worker": "w1@otherhost"}, headers=worker)
        assert claim.status_code == 200, claim.text
        order = claim.json()["order"]
        assert order["source_sha256"] == gemma.sha256 and order["operation"] == "quantize"
        again = http.post(f"{jobs}/claim", json={"worker": "w2@otherhost"}, headers=worker)
        assert again.status_code == 409

        # Only the worker that claimed it reports; its progress lands on the row.
        other = http.post(
            f"{jobs}/progress", json={"worker": "w2@otherhost", "percent": 10}, headers=worker
        )
        assert other.status_code == 409 and "not running on w2@otherhost" in other.json()["detail"]
        ours = http.post(
            f"{jobs}/progress",
            json={"worker": "w1@otherhost", "percent": 40, "message": "Quantising"},
            headers=worker,
        )
        assert ours.status_code == 200, ours.text
        job.refresh_from_db()
        assert (job.progress, job.progress_message) == (40, "Quantising")

        # A file whose bytes do not match its declared sha256 is refused and not kept.
        upload_url = f"{jobs}/files/model.gguf"
        body = b"GGUF-ish"
        who = {"X-AIBox-Worker": "w1@otherhost"}
        wrong = http.put(
            upload_url, content=body, headers=worker | who | {"X-Content-SHA256": "0" * 64}
        )
        assert wrong.status_code == 400 and "send it again" in wrong.json()["detail"]
        digest = {"X-Content-SHA256": hashlib.sha256(body).hexdigest()}
        assert (
            http.put(
                f"{jobs}/files/evil.sh", content=body, headers=worker | who | digest
            ).status_code
            == 404
        )
        stranger = http.put(
            upload_url, content=body, headers=worker | digest | {"X-AIBox-Worker": "w2@otherhost"}
        )
        assert stranger.status_code == 409

        # Succeeded without its file: refused, the job still runs.
        early = http.post(
            f"{jobs}/finish",
            json={"worker": "w1@otherhost", "state": "succeeded", "sha256": "0" * 64},
            headers=worker,
        )
        assert early.status_code == 400 and "Upload model.gguf" in early.json()["detail"]
        # A failure is recorded with the worker's reason; the job then takes nothing more.
        failed = http.post(
            f"{jobs}/finish",
            json={"worker": "w1@otherhost", "state": "failed", "reason": "out of disk"},
            headers=worker,
        )
        assert failed.json() == {"state": "failed", "reason": "out of disk"}
        late = http.post(
            f"{jobs}/progress", json={"worker": "w1@otherhost", "percent": 50}, headers=worker
        )
        assert late.status_code == 409 and "it is failed" in late.json()["detail"]

        # An evaluation's dataset is pulled while the evaluation waits or runs, not after.
        pull = f"{control_plane.url}/internal/v1/artifacts/{prose.sha256}"
        assert http.get(pull, headers=worker).status_code == 200
        claimed = http.post(f"{evaluations}/claim", json={"worker": "w1@otherhost"}, headers=worker)
        assert claimed.json()["order"]["dataset"]["sha256"] == prose.sha256
        unknown = http.post(
            f"{evaluations}/finish",
            json={"worker": "w1@otherhost", "state": "succeeded", "figures": {"state": "x"}},
            headers=worker,
        )
        assert unknown.status_code == 400 and "Unknown figures state" in unknown.json()["detail"]
        done = http.post(
            f"{evaluations}/finish",
            json={
                "worker": "w1@otherhost",
                "state": "succeeded",
                "figures": {"perplexity": 12.5, "tokens_per_s": 300},
                "result": {"rows": 20},
            },
            headers=worker,
        )
        assert done.json() == {"state": "succeeded", "reason": ""}
        assert http.get(pull, headers=worker).status_code == 404
    job.refresh_from_db()
    evaluation.refresh_from_db()
    assert job.state == JobState.FAILED and job.reason == "out of disk"
    assert (evaluation.state, evaluation.perplexity, evaluation.result) == (
        JobState.SUCCEEDED,
        12.5,
        {"rows": 20},
    )
    assert AuditEvent.objects.filter(
        action="optimise.evaluation.succeeded", target_id=str(evaluation.pk)
    )
