"""Deployments placed by worker labels: wanted (placement_labels) and unwanted
(exclude_labels) labels on fake heartbeats (no worker process: nothing is sent to one),
waiting with a message that names them, re-homing that keeps to them, and the form, page
and API that set and show them."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator

import pytest
import redis
from django.conf import settings

from apps.accounts.models import Role
from apps.deployments import lifecycle, selectors, services
from apps.deployments.models import Deployment, State
from tests.conftest import client_for
from tests.deployments.conftest import admin_api, deployment_form
from workers import redis_keys
from workers.inference.runtime import Heartbeat

Beat = Callable[..., str]


@pytest.fixture
def beat() -> Iterator[Beat]:
    """Writes a serving worker's heartbeat: ``beat(name, labels, ram_mib, age=seconds)``."""
    client = redis.Redis.from_url(settings.REDIS_URL)
    names: set[str] = set()

    def write(name: str, labels: list[str], ram_mib: int = 4096, *, age: float = 0) -> str:
        name = f"{name}@labels-test"
        payload = {
            "hostname": name,
            "sent_at": time.time() - age,
            "serving": True,
            "pool": "threads",
            "cpu_cores": 2,
            "ram_total_mib": ram_mib,
            "ram_available_mib": ram_mib,
            "gpus": [],
            "replicas": [],
            "labels": labels,
        }
        client.set(redis_keys.heartbeat_key(name), json.dumps(payload), ex=60)
        client.sadd(redis_keys.WORKERS_SET, name)
        names.add(name)
        return name

    yield write
    for name in names:
        client.delete(redis_keys.heartbeat_key(name))
        client.srem(redis_keys.WORKERS_SET, name)
    client.close()


def _create(users, version, **values) -> Deployment:
    return services.deployment_create(
        actor=users[Role.ADMIN], name="tiny-labels", model_version=version, **values
    )


def _workers(deployment: Deployment) -> list[str]:
    return [r.worker for r in deployment.replica_set.order_by("index")]


def test_wanted_labels_pin_it_to_workers_that_have_them_all(users, version, beat):
    beat("roomy", ["zone=b"], 8192)
    a100 = beat("a100", ["gpu=a100", "zone=b"], 2048)
    beat("h100", ["gpu=h100", "zone=b"], 4096)
    deployment = _create(
        users, version, context_length=256, placement_labels=["gpu=a100", "zone=b"]
    )
    assert _workers(deployment) == [a100]
    assert deployment.placement_labels == ["gpu=a100", "zone=b"]


def test_a_bare_wanted_word_matches_any_value(users, version, beat):
    beat("roomy", ["zone=b"], 8192)
    h100 = beat("h100", ["gpu=h100"], 4096)
    deployment = _create(users, version, context_length=256, placement_labels=["gpu"])
    assert _workers(deployment) == [h100]


def test_excluded_labels_keep_it_off_workers_with_any_of_them(users, version, beat):
    beat("spot", ["spot", "zone=a"], 8192)
    beat("zone-c", ["zone=c"], 6144)
    steady = beat("steady", ["zone=a"], 2048)
    deployment = _create(users, version, context_length=256, exclude_labels=["spot", "zone=c"])
    assert _workers(deployment) == [steady]


def test_wanted_and_excluded_together_spread_over_the_workers_that_match(users, version, beat):
    beat("plain", [], 16384)
    beat("gpu-spot", ["gpu=nvidia", "spot"], 8192)
    one = beat("gpu-1", ["gpu=nvidia"], 4096)
    two = beat("gpu-2", ["gpu=nvidia", "zone=b"], 4096)
    deployment = _create(
        users,
        version,
        context_length=256,
        replicas=2,
        placement_labels=["gpu=nvidia"],
        exclude_labels=["spot"],
    )
    assert sorted(_workers(deployment)) == sorted([one, two])


def test_with_no_matching_worker_it_waits_naming_the_labels_and_is_placed_when_one_comes(
    users, version, beat
):
    beat("plain", ["zone=a"], 8192)
    beat("gpu-spot", ["gpu=a100", "spot"], 8192)
    deployment = _create(
        users, version, context_length=256, placement_labels=["gpu=a100"], exclude_labels=["spot"]
    )
    deployment.refresh_from_db()
    assert deployment.state == State.PENDING and not deployment.replica_set.exists()
    assert deployment.state_reason == (
        "Waiting for a worker with the labels gpu=a100 and none of spot: no online worker "
        "that serves models has them."
    )
    page = client_for(users[Role.ADMIN]).get(f"/deployments/{deployment.name}/")
    assert "Waiting for a worker with the labels gpu=a100 and none of spot" in page.content.decode()
    # A worker with them starts: it asks for the waiting deployments to be placed.
    fitting = beat("gpu-steady", ["gpu=a100"], 4096)
    assert lifecycle.worker_online(hostname=fitting) == 1
    assert _workers(deployment) == [fitting]


def test_with_no_worker_online_at_all_the_wait_names_the_labels(users, version):
    deployment = _create(users, version, context_length=256, placement_labels=["gpu=a100"])
    deployment.refresh_from_db()
    assert deployment.state == State.PENDING
    assert (
        deployment.state_reason == "No worker with the labels gpu=a100 is online to serve models."
    )


def test_rehoming_after_a_worker_dies_keeps_off_excluded_workers(users, version, beat):
    first = beat("first", [], 8192)
    beat("spot", ["spot"], 6144)
    second = beat("second", [], 2048)
    deployment = _create(users, version, context_length=256, exclude_labels=["spot"])
    assert _workers(deployment) == [first]
    beat("first", [], 8192, age=settings.WORKER_OFFLINE_AFTER + 5)  # silent: offline
    moves = [m for m in lifecycle.replicas_rehome() if m.startswith("tiny-labels#")]
    assert moves == [f"tiny-labels#0: {first} -> {second}"]
    # The only other worker left online is excluded: the replica stays and says why.
    beat("second", [], 2048, age=settings.WORKER_OFFLINE_AFTER + 5)
    assert not [m for m in lifecycle.replicas_rehome() if m.startswith("tiny-labels#")]
    replica = deployment.replica_set.get()
    assert replica.worker == second
    assert replica.state_reason == (
        f"Its worker {second} is offline. Waiting for a worker with none of spot: no online "
        "worker that serves models has them."
    )


def test_the_form_takes_comma_separated_labels_and_the_page_shows_them(users, version):
    client = client_for(users[Role.ADMIN])
    form = deployment_form(version, placement_labels="gpu=a100, zone=b", exclude_labels="spot")
    assert client.post("/deployments/", form).status_code == 302
    deployment = Deployment.objects.get(name="tiny-chat")
    assert (deployment.placement_labels, deployment.exclude_labels) == (
        ["gpu=a100", "zone=b"],
        ["spot"],
    )
    page = client.get("/deployments/tiny-chat/").content.decode()
    assert 'data-placement-labels="gpu=a100,zone=b"' in page
    assert 'data-exclude-labels="spot"' in page


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("placement_labels", "gpu=", "&#x27;gpu=&#x27; is not a label: a label is a word or"),
        ("exclude_labels", "zone=a, zone=b", "give &#x27;zone&#x27; twice"),
        ("placement_labels", ",".join(f"l{i}" for i in range(17)), "At most 16 labels, not 17"),
        ("exclude_labels", "gpu", "Excluding gpu rules out every worker with gpu=a100"),
    ],
)
def test_the_form_refuses_bad_labels_with_a_message(users, version, field, value, message):
    client = client_for(users[Role.ADMIN])
    form = deployment_form(version, **{"placement_labels": "gpu=a100", field: value})
    response = client.post("/deployments/", form)
    assert response.status_code == 200
    assert message in response.content.decode()
    assert not Deployment.objects.exists()


def test_the_api_takes_label_lists_and_returns_them(users, version):
    body = {
        "name": "tiny-api",
        "model_version": version.pk,
        "context_length": 256,
        "placement_labels": ["gpu=a100", "zone=b"],
        "exclude_labels": ["spot"],
    }
    response = admin_api(users).post("/api/v1/deployments/", body, format="json")
    assert response.status_code == 201, response.json()
    assert response.json()["placement_labels"] == ["gpu=a100", "zone=b"]
    assert response.json()["exclude_labels"] == ["spot"]
    listed = admin_api(users).get("/api/v1/deployments/tiny-api/").json()
    assert (listed["placement_labels"], listed["exclude_labels"]) == (
        ["gpu=a100", "zone=b"],
        ["spot"],
    )
    plain = dict(body, name="tiny-plain")
    del plain["placement_labels"], plain["exclude_labels"]
    response = admin_api(users).post("/api/v1/deployments/", plain, format="json")
    assert response.status_code == 201
    assert (response.json()["placement_labels"], response.json()["exclude_labels"]) == ([], [])


@pytest.mark.parametrize(
    ("labels", "field", "message"),
    [
        ({"placement_labels": ["gpu a100"]}, "placement_labels", "'gpu a100' is not a label"),
        ({"exclude_labels": "spot"}, "exclude_labels", "Expected a list of items"),
        ({"exclude_labels": [f"l{i}" for i in range(17)]}, "exclude_labels", "At most 16"),
        (
            {"placement_labels": ["spot"], "exclude_labels": ["spot"]},
            "exclude_labels",
            "Excluding spot rules out every worker with spot",
        ),
    ],
)
def test_the_api_refuses_bad_labels_naming_the_field(users, version, labels, field, message):
    body = {"name": "tiny-api", "model_version": version.pk, "context_length": 256, **labels}
    response = admin_api(users).post("/api/v1/deployments/", body, format="json")
    assert response.status_code == 400
    assert message in " ".join(response.json()[field])
    assert message in response.json()["detail"]
    assert not Deployment.objects.exists()


def test_the_workers_page_and_api_show_each_workers_labels(users, beat):
    name = beat("shown", ["gpu=nvidia", "spot"])
    page = client_for(users[Role.DATA_SCIENTIST]).get("/deployments/workers/").content.decode()
    assert 'data-labels="gpu=nvidia,spot"' in page
    workers = admin_api(users).get("/api/v1/workers/").json()
    assert next(w for w in workers if w["hostname"] == name)["labels"] == ["gpu=nvidia", "spot"]


def test_a_workers_heartbeat_carries_its_labels_and_an_old_one_has_none():
    client = redis.Redis.from_url(settings.REDIS_URL)
    name = "beating@labels-test"
    heartbeat = Heartbeat(
        settings.REDIS_URL, name, pool="threads", serving=True, labels=["gpu=a100", "spot"]
    )
    try:
        heartbeat.beat()
        assert selectors.worker_get(name).labels == ["gpu=a100", "spot"]
        heartbeat.stop()  # the last beat keeps them, shown while it is offline
        assert selectors.worker_get(name).labels == ["gpu=a100", "spot"]
        old = json.loads(client.get(redis_keys.heartbeat_key(name)))
        del old["labels"]
        assert selectors.parse_heartbeat(json.dumps(old)).labels == []
    finally:
        client.delete(redis_keys.heartbeat_key(name))
        client.srem(redis_keys.WORKERS_SET, name)
        client.close()
