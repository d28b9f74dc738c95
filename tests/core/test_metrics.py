"""/metrics: refused without credentials, Prometheus text that its own parser reads,
holding what the database and the workers' heartbeats say."""

from __future__ import annotations

import json
import time
from datetime import timedelta

import pytest
import redis
from django.conf import settings
from django.core.exceptions import ValidationError
from django.test import Client
from django.utils import timezone
from prometheus_client.parser import text_string_to_metric_families

from apps.accounts.models import Role
from apps.accounts.services import api_key_create, system_user
from apps.deployments.models import Deployment, Replica, State
from apps.inference.models import Outcome
from apps.ops.services import usage_prune
from apps.registry.artifacts import artifact_store
from apps.registry.models import SourceKind
from apps.registry.services import model_repo_create, model_version_ingest
from tests.conftest import client_for
from tests.inference.factories import make_usage
from tests.registry.conftest import write_tiny_gguf
from workers import redis_keys
from workers.inference.runtime import heartbeat_payload

pytestmark = pytest.mark.django_db


def bearer(key: str, **extra) -> Client:
    return Client(HTTP_AUTHORIZATION=f"Bearer {key}", REMOTE_ADDR="10.9.8.7", **extra)


def samples(text: str) -> dict[tuple[str, tuple], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(parsed: dict, metric: str, /, **labels) -> float:
    return parsed[(metric, tuple(sorted(labels.items())))]


@pytest.fixture
def metrics_key(users) -> str:
    admin = users[Role.ADMIN]
    return api_key_create(actor=admin, owner=admin, name="prometheus", scopes=["metrics"]).secret


def test_refused_without_credentials_or_the_scope(users, metrics_key):
    anonymous = Client(REMOTE_ADDR="10.9.8.7")
    response = anonymous.get("/metrics")
    assert response.status_code == 401
    assert response["WWW-Authenticate"].startswith("Bearer")
    assert bearer("aibox_nope_wrong").get("/metrics").status_code == 401

    admin = users[Role.ADMIN]
    inference_only = api_key_create(actor=admin, owner=admin, name="app", scopes=["inference"])
    response = bearer(inference_only.secret).get("/metrics")
    assert response.status_code == 403 and "metrics" in response.json()["detail"]
    # A key never lifts its owner's role: a data scientist cannot hold metrics anyway.
    dana = users[Role.DATA_SCIENTIST]
    dana_key = api_key_create(actor=dana, owner=dana, name="mine", scopes=["inference"])
    assert bearer(dana_key.secret).get("/metrics").status_code == 403
    for role in (Role.DATA_SCIENTIST, Role.APP_DEVELOPER, Role.COMPLIANCE_OFFICER):
        assert client_for(users[role]).get("/metrics").status_code == 403

    response = bearer(metrics_key).get("/metrics")
    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/plain; version=")
    assert client_for(admin).get("/metrics").status_code == 200


def test_scrapers_on_an_allowed_network_need_no_key(settings, db):
    import ipaddress

    settings.METRICS_ALLOWED_NETWORKS = [ipaddress.ip_network("10.20.0.0/16")]
    assert Client(REMOTE_ADDR="10.20.3.4").get("/metrics").status_code == 200
    assert Client(REMOTE_ADDR="10.21.3.4").get("/metrics").status_code == 401
    assert Client(REMOTE_ADDR="::1").get("/metrics").status_code == 401


def test_behind_a_proxy_the_client_cannot_forge_an_allowed_address(settings, db):
    """X-Forwarded-For is read from the right: the client's own entries prove nothing."""
    import ipaddress

    settings.METRICS_ALLOWED_NETWORKS = [ipaddress.ip_network("10.20.0.0/16")]
    settings.TRUST_X_FORWARDED_FOR = True
    proxy = Client(REMOTE_ADDR="192.168.0.2")  # the reverse proxy's own address
    forged = {"HTTP_X_FORWARDED_FOR": "10.20.3.4, 198.51.100.7"}
    assert proxy.get("/metrics", **forged).status_code == 401
    assert proxy.get("/metrics", HTTP_X_FORWARDED_FOR="10.20.3.4").status_code == 200
    # Two proxies: the second appended the first's address, the first the client's.
    settings.TRUSTED_PROXY_COUNT = 2
    chain = {"HTTP_X_FORWARDED_FOR": "198.51.100.7, 10.20.3.4, 192.168.0.9"}
    assert proxy.get("/metrics", **chain).status_code == 200
    # Fewer entries than proxies: not forwarded by them all, so the connection's address.
    assert proxy.get("/metrics", HTTP_X_FORWARDED_FOR="10.20.3.4").status_code == 401


@pytest.fixture
def deployment(users, settings, tmp_path) -> Deployment:
    settings.ARTIFACT_ROOT = tmp_path / "artifacts"
    admin = users[Role.ADMIN]
    repo = model_repo_create(actor=admin, name="tiny", licence="mit")
    version = model_version_ingest(
        actor=admin,
        repo=repo,
        staged=artifact_store().stage_copy(write_tiny_gguf(tmp_path / "tiny.gguf")),
        file_name="tiny.gguf",
        source_kind=SourceKind.UPLOAD,
        source={},
    ).version
    deployment = Deployment.objects.create(
        name="chat", model_version=version, state=State.READY, replicas=2
    )
    Replica.objects.create(deployment=deployment, index=0, worker="gpu@metrics", state=State.READY)
    Replica.objects.create(deployment=deployment, index=1, worker="cpu@gone", state=State.READY)
    return deployment


@pytest.fixture
def gpu_worker(deployment):
    """gpu@metrics holds replica 0 and has two requests queued on it; cpu@gone is silent."""
    client = redis.Redis.from_url(settings.REDIS_URL)
    name = "gpu@metrics"
    replica = deployment.replica_set.get(index=0)
    payload = heartbeat_payload(name, pool="threads", serving=True)
    payload["gpus"] = [
        {"index": 0, "name": "NVIDIA H100", "memory_total_mib": 81559, "memory_free_mib": 80000}
    ]
    payload["replicas"] = [
        {
            "replica_id": replica.pk,
            "generation": replica.generation,
            "deployment_id": deployment.pk,
            "deployment": deployment.name,
            "queue_depth": 2,
        }
    ]
    client.set(redis_keys.heartbeat_key(name), json.dumps(payload), ex=60)
    client.sadd(redis_keys.WORKERS_SET, name)
    yield payload
    client.delete(redis_keys.heartbeat_key(name))
    client.srem(redis_keys.WORKERS_SET, name)


def test_samples_say_what_the_records_and_heartbeats_say(metrics_key, deployment, gpu_worker):
    now = timezone.now()
    for latency, outcome in ((80, Outcome.OK), (300, Outcome.OK), (4000, Outcome.ERROR)):
        make_usage(
            at=now,
            deployment="chat",
            worker="gpu@metrics",
            outcome=outcome,
            latency_ms=latency,
            prompt_tokens=7,
            completion_tokens=11,
        )
    make_usage(
        at=now - timedelta(days=400),
        deployment="chat",
        worker="gpu@metrics",
        latency_ms=50,
        prompt_tokens=1,
        completion_tokens=1,
    )

    before = time.time()
    text = bearer(metrics_key).get("/metrics").content.decode()
    after = time.time()
    parsed = samples(text)

    w = {"deployment": "chat", "worker": "gpu@metrics"}
    assert value(parsed, "aibox_requests_total", **w, outcome="ok") == 3
    assert value(parsed, "aibox_requests_total", **w, outcome="error") == 1
    assert value(parsed, "aibox_prompt_tokens_total", **w) == 22
    assert value(parsed, "aibox_completion_tokens_total", **w) == 34
    assert value(parsed, "aibox_request_latency_seconds_bucket", **w, le="0.05") == 1
    assert value(parsed, "aibox_request_latency_seconds_bucket", **w, le="0.1") == 2
    assert value(parsed, "aibox_request_latency_seconds_bucket", **w, le="0.5") == 3
    assert value(parsed, "aibox_request_latency_seconds_bucket", **w, le="5.0") == 4
    assert value(parsed, "aibox_request_latency_seconds_count", **w) == 4
    assert value(parsed, "aibox_request_latency_seconds_sum", **w) == pytest.approx(4.43)

    assert value(parsed, "aibox_deployment_state", deployment="chat", state="ready") == 1
    assert value(parsed, "aibox_deployment_state", deployment="chat", state="failed") == 0
    assert value(parsed, "aibox_deployment_replicas_wanted", deployment="chat") == 2
    assert value(parsed, "aibox_deployment_queue_depth", deployment="chat") == 2
    held = {"deployment": "chat", "replica": "0", "worker": "gpu@metrics"}
    lost = {"deployment": "chat", "replica": "1", "worker": "cpu@gone"}
    assert value(parsed, "aibox_replica_state", **held, state="ready") == 1
    # Its worker sends no heartbeat: clients get nothing from it, whatever the row says.
    assert value(parsed, "aibox_replica_state", **lost, state="ready") == 0
    assert value(parsed, "aibox_replica_state", **lost, state="unavailable") == 1

    assert value(parsed, "aibox_worker_up", worker="gpu@metrics", pool="threads") == 1
    # The age is the scrape's clock minus the beat's own timestamp.
    age = value(parsed, "aibox_worker_heartbeat_age_seconds", worker="gpu@metrics")
    assert before - gpu_worker["sent_at"] <= age <= after - gpu_worker["sent_at"]
    gpu = {"worker": "gpu@metrics", "gpu": "0", "name": "NVIDIA H100"}
    assert value(parsed, "aibox_worker_gpu_memory_total_bytes", **gpu) == 81559 * 1024**2
    assert value(parsed, "aibox_worker_gpu_memory_free_bytes", **gpu) == 80000 * 1024**2
    assert value(parsed, "aibox_worker_queue_depth", worker="gpu@metrics") == 2
    assert value(parsed, "aibox_worker_memory_total_bytes", worker="gpu@metrics") == (
        gpu_worker["ram_total_mib"] * 1024**2
    )
    assert value(parsed, "aibox_finetune_jobs", state="running") == 0
    assert value(parsed, "aibox_redis_up") == 1


def test_counters_do_not_go_down_when_retention_prunes(metrics_key, users):
    now = timezone.now()
    make_usage(at=now - timedelta(days=200), latency_ms=700, outcome=Outcome.TIMEOUT)
    make_usage(at=now - timedelta(days=100), latency_ms=90, completion_tokens=5)
    make_usage(at=now, latency_ms=90, completion_tokens=5)
    before = samples(bearer(metrics_key).get("/metrics").content.decode())

    assert usage_prune(actor=system_user()).records_deleted == 2
    make_usage(at=now, latency_ms=90, completion_tokens=5)
    after = samples(bearer(metrics_key).get("/metrics").content.decode())

    for key, old in before.items():
        if key[0].endswith(("_total", "_bucket", "_count", "_sum")):
            grew = 1 if key[0] != "aibox_requests_total" or ("outcome", "ok") in key[1] else 0
            assert after[key] >= old, key
            if key[0] == "aibox_requests_total":
                assert after[key] == old + grew, key
    labels = {"deployment": "chat", "worker": "cpu@box"}
    assert value(after, "aibox_request_latency_seconds_count", **labels) == 4
    assert value(after, "aibox_completion_tokens_total", **labels) == 20 + 5 + 5 + 5


def test_only_admins_can_hold_the_metrics_scope(users):
    cora = users[Role.COMPLIANCE_OFFICER]
    with pytest.raises(ValidationError, match="metrics"):
        api_key_create(actor=cora, owner=cora, name="scraper", scopes=["metrics"])
