"""Load on demand without a worker process: the settings (form, page, API) and their
audit, the idle timer, the claim that starts one load, and the 503 a request gets when
the load cannot happen. The whole round trip on a real worker is
tests/serving/test_idle_unload.py."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest
import redis
from django.conf import settings
from django.utils import timezone
from rest_framework.test import APIClient

from apps.accounts.models import Role
from apps.accounts.services import system_user
from apps.audit.models import AuditEvent
from apps.deployments import lifecycle, services
from apps.deployments.models import Deployment, Replica, State
from apps.inference import gateway
from tests.conftest import client_for
from tests.deployments.conftest import deployment_form
from workers import redis_keys
from workers.inference.runtime import heartbeat_payload


@pytest.fixture
def redis_client() -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(settings.REDIS_URL)
    yield client
    client.close()


@pytest.fixture
def deployment(users, version, redis_client) -> Iterator[Deployment]:
    """A deployment with load on demand, served by one ready replica on a worker that has
    since gone (no heartbeat): nothing here sends a task to a worker."""
    deployment = services.deployment_create(
        actor=users[Role.ADMIN],
        name="tiny-idle",
        model_version=version,
        context_length=256,
        idle_unload_seconds=60,
        load_timeout_seconds=1,
    )
    Replica.objects.create(
        deployment=deployment,
        revision=deployment.revision,
        index=0,
        worker="gone@nowhere",
        state=State.READY,
        updated_at=timezone.now(),
    )
    Deployment.objects.filter(pk=deployment.pk).update(state=State.READY, state_reason="")
    deployment.refresh_from_db()
    yield deployment
    redis_client.delete(
        redis_keys.last_request_key(deployment.pk), redis_keys.admission_key(deployment.pk)
    )


@pytest.fixture
def roomy_worker(redis_client) -> Iterator[str]:
    """A serving worker's heartbeat (this machine's memory), with no process behind it."""
    name = "roomy@load-on-demand-test"
    payload = heartbeat_payload(name, pool="threads", serving=True)
    redis_client.set(redis_keys.heartbeat_key(name), json.dumps(payload), ex=60)
    redis_client.sadd(redis_keys.WORKERS_SET, name)
    yield name
    redis_client.delete(redis_keys.heartbeat_key(name))
    redis_client.srem(redis_keys.WORKERS_SET, name)


def _events(deployment: Deployment, action: str):
    return AuditEvent.objects.filter(
        target_type="deployments.deployment", target_id=str(deployment.pk), action=action
    )


def _unload(deployment: Deployment) -> None:
    assert lifecycle.deployments_idle_unload(now=time.time() + 61) == [deployment.name]
    deployment.refresh_from_db()


def test_the_create_form_takes_load_on_demand_and_refuses_under_a_minute(users, version):
    client = client_for(users[Role.ADMIN])
    response = client.post("/deployments/", deployment_form(version, idle_unload_seconds=30))
    assert response.status_code == 200
    assert "greater than or equal to 60" in response.content.decode()
    assert not Deployment.objects.exists()
    response = client.post("/deployments/", deployment_form(version, idle_unload_seconds=300))
    assert response.status_code == 302
    deployment = Deployment.objects.get(name="tiny-chat")
    assert (deployment.idle_unload_seconds, deployment.load_timeout_seconds) == (300, 120)


def test_the_api_sets_it_audited_and_names_a_bad_field(users, deployment):
    client = APIClient()
    client.force_login(users[Role.ADMIN])
    url = f"/api/v1/deployments/{deployment.name}/load-on-demand"
    response = client.post(url, {"idle_unload_seconds": 900, "load_timeout_seconds": 30}, "json")
    assert response.status_code == 200
    assert response.json()["idle_unload_seconds"] == 900
    assert response.json()["load_timeout_seconds"] == 30
    event = _events(deployment, "deployment.load_on_demand_set").get()
    assert event.actor == users[Role.ADMIN]
    assert event.details == {
        "from": {"idle_unload_seconds": 60, "load_timeout_seconds": 1},
        "to": {"idle_unload_seconds": 900, "load_timeout_seconds": 30},
    }
    response = client.post(url, {"idle_unload_seconds": 59}, "json")
    assert response.status_code == 400
    assert "greater than or equal to 60" in response.json()["idle_unload_seconds"][0]
    response = client.post(url, {"load_timeout_seconds": 0}, "json")
    assert response.status_code == 400 and "load_timeout_seconds" in response.json()
    # Left out: unchanged; null: never unload.
    response = client.post(url, {"idle_unload_seconds": None}, "json")
    assert response.status_code == 200
    deployment.refresh_from_db()
    assert (deployment.idle_unload_seconds, deployment.load_timeout_seconds) == (None, 30)
    assert _events(deployment, "deployment.load_on_demand_set").count() == 2


def test_the_page_form_sets_it_and_shows_a_bad_value(users, deployment):
    client = client_for(users[Role.ADMIN])
    url = f"/deployments/{deployment.name}/load-on-demand"
    response = client.post(url, {"idle_unload_seconds": "10", "load_timeout_seconds": "60"})
    assert response.status_code == 302
    page = client.get(response["Location"]).content.decode()
    assert "greater than or equal to 60" in page
    deployment.refresh_from_db()
    assert deployment.idle_unload_seconds == 60
    response = client.post(url, {"idle_unload_seconds": "3600", "load_timeout_seconds": "90"})
    page = client.get(response["Location"]).content.decode()
    assert "load on demand saved" in page
    assert "unloaded after 3600 s without requests" in page
    deployment.refresh_from_db()
    assert (deployment.idle_unload_seconds, deployment.load_timeout_seconds) == (3600, 90)


def test_an_idle_deployment_is_unloaded_by_the_system_and_shown_as_such(
    users, deployment, redis_client
):
    # Just loaded, or asked a moment ago: not idle yet.
    assert lifecycle.deployments_idle_unload() == []
    redis_client.set(redis_keys.last_request_key(deployment.pk), time.time() + 30)
    assert lifecycle.deployments_idle_unload(now=time.time() + 61) == []
    # A request in flight keeps it loaded however long ago the last one came.
    redis_client.zadd(redis_keys.admission_key(deployment.pk), {"req": time.time() + 600})
    assert lifecycle.deployments_idle_unload(now=time.time() + 600) == []
    redis_client.delete(redis_keys.admission_key(deployment.pk))

    assert lifecycle.deployments_idle_unload(now=time.time() + 600) == [deployment.name]
    deployment.refresh_from_db()
    assert deployment.running and deployment.state == State.IDLE
    assert deployment.idle_unloaded_at is not None
    assert "Unloaded after 60 s without requests" in deployment.state_reason
    # Its worker is gone, so there was nothing to wait for: the replica is gone too.
    assert not deployment.replica_set.exists()
    event = _events(deployment, "deployment.idle_unload").get()
    assert event.actor == system_user()
    assert event.details["idle_unload_seconds"] == 60 and event.details["idle_seconds"] >= 60
    # Once is enough: an unloaded deployment is not unloaded again.
    assert lifecycle.deployments_idle_unload(now=time.time() + 6000) == []

    page = client_for(users[Role.APP_DEVELOPER]).get(f"/deployments/{deployment.name}/")
    html = page.content.decode()
    assert 'data-state="idle"' in html and "Unloaded while idle" in html
    api = APIClient()
    api.force_login(users[Role.APP_DEVELOPER])
    listed = {d["name"]: d for d in api.get("/api/v1/deployments/").json()}
    assert listed[deployment.name]["state"] == "idle" and listed[deployment.name]["running"]


def test_a_switch_while_idle_applies_to_the_next_load(users, deployment):
    _unload(deployment)
    revision = services.deployment_switch(
        actor=users[Role.ADMIN],
        deployment=deployment,
        model_version=deployment.model_version,
        preset="creative",
    )
    deployment.refresh_from_db()
    assert deployment.revision == revision and deployment.preset == "creative"
    assert deployment.state == State.IDLE and not deployment.replica_set.exists()


def test_turning_it_off_while_idle_loads_the_deployment(users, deployment, roomy_worker):
    _unload(deployment)
    services.deployment_load_on_demand_set(
        actor=users[Role.ADMIN],
        deployment=deployment,
        idle_unload_seconds=None,
        load_timeout_seconds=120,
    )
    deployment.refresh_from_db()
    assert deployment.idle_unloaded_at is None and deployment.state == State.PENDING
    assert deployment.replica_set.get().worker == roomy_worker


def test_one_request_of_many_starts_the_load(deployment, roomy_worker):
    _unload(deployment)
    assert lifecycle.deployment_load_on_demand(deployment_id=deployment.pk, requested_by="ann")
    assert not lifecycle.deployment_load_on_demand(deployment_id=deployment.pk, requested_by="bob")
    deployment.refresh_from_db()
    assert deployment.state == State.PENDING and deployment.idle_unloaded_at is None
    replica = deployment.replica_set.get()
    assert replica.worker == roomy_worker and replica.state == State.PENDING
    event = _events(deployment, "deployment.load_on_request").get()
    assert event.actor == system_user()
    assert event.details["requested_by"] == "ann"
    assert event.details["placed_on"] == [roomy_worker]


def _caller(users) -> gateway.Caller:
    return gateway.Caller(user=users[Role.APP_DEVELOPER])


def test_a_load_that_cannot_start_is_a_503_and_it_stays_idle(users, deployment):
    _unload(deployment)
    with pytest.raises(gateway.LoadFailed) as caught:
        gateway.route(_caller(users), deployment.name)
    error = caught.value
    assert error.status == 503 and error.code == "model_load_failed"
    assert error.headers["Retry-After"] == str(gateway.LOAD_RETRY_AFTER_SECONDS)
    assert "No worker is online" in error.message
    assert error.route.deployment_id == deployment.pk and error.route.load_ms is not None
    deployment.refresh_from_db()
    assert deployment.state == State.IDLE and deployment.idle_unloaded_at is not None
    assert not _events(deployment, "deployment.load_on_request").exists()


def test_a_load_that_does_not_finish_in_time_is_a_503_with_the_wait(
    users, deployment, roomy_worker
):
    _unload(deployment)
    # The worker's heartbeat is real; nothing behind it loads, so the 1 s timeout passes.
    with pytest.raises(gateway.LoadFailed) as caught:
        gateway.route(_caller(users), deployment.name)
    error = caught.value
    assert error.status == 503 and error.code == "model_load_timeout"
    assert "was not ready within its load timeout (1 s)" in error.message
    assert error.headers["Retry-After"]
    assert error.route.load_ms >= 1000
    # The load it started goes on: the next request waits for it rather than start another.
    deployment.refresh_from_db()
    assert deployment.state == State.PENDING
    assert _events(deployment, "deployment.load_on_request").count() == 1
