"""Placing the bundled Gemma on workers with GPUs, from fake heartbeats (no worker process:
nothing is sent to one): a layer or row split shares the offloaded part over a worker's
GPUs and each must hold its share, a partial offload needs its RAM share in RAM, what
does not fit is named, and the CPU path is what it was. Then the form, the API and the
page that set and show a split, and the spec a worker is sent."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator

import pytest
import redis
from django.conf import settings
from django.core.exceptions import ValidationError

from apps.accounts.models import Role
from apps.accounts.services import system_user
from apps.deployments import placement, services
from apps.deployments.memory import HEADROOM_BYTES, MIB, Offload
from apps.deployments.models import Deployment, Replica, SplitMode
from apps.registry.bundled import model_register_bundled
from apps.registry.models import ModelVersion
from tests.conftest import client_for
from tests.deployments.conftest import admin_api, deployment_form
from workers import redis_keys

Worker = Callable[..., str]
# Small buffers, so that the layers, not the logits, decide what fits.
VALUES = {"context_length": 1024, "batch_size": 64}


@pytest.fixture
def gemma(users, settings, tmp_path) -> ModelVersion:
    settings.ARTIFACT_ROOT = tmp_path / "artifacts"
    return model_register_bundled(actor=system_user()).version


@pytest.fixture
def worker() -> Iterator[Worker]:
    """Writes a serving worker's heartbeat: ``worker(name, gpus=[free MiB, ...], ram=MiB)``."""
    client = redis.Redis.from_url(settings.REDIS_URL)
    names: set[str] = set()

    def write(name: str, *, gpus: list[int] = (), ram: int = 16384) -> str:
        name = f"{name}@gpu-test"
        payload = {
            "hostname": name,
            "sent_at": time.time(),
            "serving": True,
            "pool": "threads",
            "cpu_cores": 8,
            "ram_total_mib": ram,
            "ram_available_mib": ram,
            "gpus": [
                {"index": i, "name": "NVIDIA L4", "memory_total_mib": 23034, "memory_free_mib": f}
                for i, f in enumerate(gpus)
            ],
            "replicas": [],
            "labels": [],
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


def _create(users, version, name: str = "gemma-gpu", **values) -> Deployment:
    return services.deployment_create(
        actor=users[Role.ADMIN], name=name, model_version=version, **{**VALUES, **values}
    )


def _estimate(version, offload: Offload | None = None, **values):
    """What placement will count for a deployment with these settings."""
    target = Deployment(model_version=version, **{**VALUES, **values})
    return placement.estimate_for(target, offload)


def _mib(size: int) -> int:
    return math.ceil(size / MIB)


def test_a_layer_split_puts_each_gpus_share_on_it_by_the_proportions(users, gemma, worker):
    two = worker("two", gpus=[8000, 8000])
    deployment = _create(users, gemma, split_mode="layer", tensor_split="3,1")
    replica = deployment.replica_set.get()
    expected = _estimate(gemma, Offload(-1, ((0, 3.0), (1, 1.0)), SplitMode.LAYER))
    assert (replica.worker, replica.gpu_index) == (two, 0)
    assert replica.memory_by_device == expected.where()
    assert replica.memory_estimate_bytes == expected.total
    # Three quarters of the slots on GPU 0; the output layer (and its copy of the
    # embedding) on GPU 1, which so holds more.
    assert set(expected.gpus) == {0, 1} and expected.gpus[1] > expected.gpus[0]
    spec = placement.replica_spec(replica)
    assert (spec.split_mode, spec.tensor_split, spec.gpu_index, spec.gpu_layers) == (
        "layer",
        [3.0, 1.0],
        0,
        -1,
    )


def test_a_split_without_proportions_shares_by_free_memory(users, gemma, worker):
    worker("uneven", gpus=[6000, 2000])
    deployment = _create(users, gemma, split_mode="row")
    replica = deployment.replica_set.get()
    expected = _estimate(gemma, Offload(-1, ((0, 6000.0 * MIB), (1, 2000.0 * MIB)), "row"))
    assert replica.memory_by_device == expected.where()
    assert placement.replica_spec(replica).tensor_split == []  # llama.cpp shares them alike


def test_a_split_one_gpu_cannot_hold_is_refused_naming_that_gpu(users, gemma, worker):
    share = _estimate(gemma, Offload(-1, ((0, 1.0), (1, 1.0)), "layer")).gpus[1]
    short = worker("short", gpus=[8000, _mib(share) - 20])
    with pytest.raises(ValidationError) as caught:
        _create(users, gemma, split_mode="layer", tensor_split="1,1")
    message = " ".join(caught.value.messages)
    assert f"on the roomiest worker, {short}, GPU 1 has {_mib(share) - 20:,} MiB available " in (
        message
    )
    assert f"for its {share / MIB:,.0f} MiB" in message and "GPU 0 has" not in message
    assert not Deployment.objects.exists()


def test_a_split_goes_to_the_worker_whose_gpus_each_hold_their_share(users, gemma, worker):
    share = _estimate(gemma, Offload(-1, ((0, 1.0), (1, 1.0)), "layer")).gpus[1]
    worker("lopsided", gpus=[20000, _mib(share) - 20])  # more in all, too little on GPU 1
    even = worker("even", gpus=[_mib(share) + 50, _mib(share) + 50])
    deployment = _create(users, gemma, split_mode="layer", tensor_split="1,1")
    assert deployment.replica_set.get().worker == even


def test_replicas_still_loading_hold_their_share_of_each_gpu(users, gemma, worker):
    shares = _estimate(gemma, Offload(-1, ((0, 1.0), (1, 1.0)), "layer")).gpus
    roomy = worker("roomy", gpus=[_mib(shares[0] * 3 // 2), _mib(shares[1] * 3 // 2)])
    _create(users, gemma, split_mode="layer", tensor_split="1,1")
    with pytest.raises(ValidationError) as caught:
        _create(users, gemma, name="gemma-second", split_mode="layer", tensor_split="1,1")
    message = " ".join(caught.value.messages)
    assert f"{roomy}, GPU 0 has" in message and " and GPU 1 has" in message
    assert Replica.objects.count() == 1


def test_a_partial_offload_needs_its_ram_share_in_ram(users, gemma, worker):
    whole = _estimate(gemma, Offload(-1, ((0, 1.0),)))
    part = _estimate(gemma, Offload(4, ((0, 1.0),)), gpu_layers=4)
    assert part.ram > whole.ram  # fifteen of the eighteen layers stay in RAM
    ram = _mib(whole.ram + HEADROOM_BYTES) + 5
    small = worker("small-ram", gpus=[8000], ram=ram)
    with pytest.raises(ValidationError) as caught:
        _create(users, gemma, gpu_layers=4)
    message = " ".join(caught.value.messages)
    assert f"{small}, RAM has {ram - HEADROOM_BYTES // MIB:,} MiB available for its " in message
    deployment = _create(users, gemma, gpu_layers=-1)
    replica = deployment.replica_set.get()
    assert (replica.worker, replica.gpu_index) == (small, 0)
    assert replica.memory_by_device == whole.where()


def test_on_the_cpu_placement_is_what_it_was(users, gemma, worker):
    cpu = worker("cpu-only", ram=4096)
    deployment = _create(users, gemma)
    replica = deployment.replica_set.get()
    total = _estimate(gemma).total
    assert (replica.worker, replica.gpu_index, replica.memory_estimate_bytes) == (cpu, None, total)
    assert replica.memory_by_device == {"ram": total, "gpus": {}}
    spec = placement.replica_spec(replica)
    assert (spec.gpu_layers, spec.split_mode, spec.tensor_split) == (0, "none", [])
    # A GPU worker with no layers to offload is a CPU too.
    gpus = worker("gpu-idle", gpus=[8000, 8000], ram=8192)
    kept = _create(users, gemma, name="gemma-cpu", gpu_layers=0).replica_set.get()
    assert (kept.worker, kept.gpu_index, kept.memory_by_device["gpus"]) == (gpus, None, {})


def test_too_little_ram_on_the_cpu_is_refused_as_before(users, gemma, worker):
    worker("tiny", ram=300)
    with pytest.raises(ValidationError) as caught:
        _create(users, gemma)
    message = " ".join(caught.value.messages)
    needed = _estimate(gemma).total
    assert message == (
        f"Deployment 'gemma-gpu' needs about {needed / MIB:,.0f} MiB per replica; the "
        f"roomiest worker, tiny@gpu-test, has {300 - HEADROOM_BYTES // MIB:,} MiB available."
    )


def test_a_tensor_split_naming_more_gpus_than_a_worker_has_is_refused(users, gemma, worker):
    worker("pair", gpus=[8000, 8000])
    with pytest.raises(ValidationError) as caught:
        _create(users, gemma, split_mode="layer", tensor_split="2,1,1")
    assert caught.value.messages == [
        "No online worker can run deployment 'gemma-gpu': the tensor split 2,1,1 names 3 "
        "GPUs and pair@gpu-test has 2."
    ]


def test_one_gpu_alone_goes_to_the_roomiest_gpu_as_before(users, gemma, worker):
    pair = worker("pair", gpus=[3000, 7000])
    replica = _create(users, gemma).replica_set.get()
    assert (replica.worker, replica.gpu_index) == (pair, 1)
    assert list(replica.memory_by_device["gpus"]) == ["1"]
    spec = placement.replica_spec(replica)
    assert (spec.split_mode, spec.gpu_index, spec.tensor_split) == ("none", 1, [])


# The form, the API and the page -------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"split_mode": "layer", "tensor_split": "3,x"}, "&#x27;x&#x27; is not a number"),
        ({"split_mode": "layer", "tensor_split": "3,-1"}, "each must be 0 or more"),
        ({"split_mode": "row", "tensor_split": "0,0"}, "At least one GPU needs a proportion"),
        ({"split_mode": "layer", "tensor_split": ",".join("1" * 17)}, "at most 16"),
        ({"tensor_split": "3,1"}, "choose the layer or row split mode"),
        ({"split_mode": "layer", "placement_gpu": 1}, "leave the GPU empty"),
        ({"split_mode": "diagonal"}, "Select a valid choice"),
    ],
)
def test_the_form_refuses_a_bad_split_with_a_message(users, version, values, message):
    response = client_for(users[Role.ADMIN]).post(
        "/deployments/", deployment_form(version, **values)
    )
    assert response.status_code == 200
    assert message in response.content.decode()
    assert not Deployment.objects.exists()


def test_the_form_takes_a_split_and_the_page_shows_it(users, version):
    client = client_for(users[Role.ADMIN])
    form = deployment_form(version, split_mode="row", tensor_split="3,1")
    assert client.post("/deployments/", form).status_code == 302
    deployment = Deployment.objects.get(name="tiny-chat")
    assert (deployment.split_mode, deployment.tensor_split) == ("row", "3,1")
    page = client.get("/deployments/tiny-chat/").content.decode()
    assert 'data-split-mode="row" data-tensor-split="3,1"' in page
    assert "Rows of each layer across the worker&#x27;s GPUs in the proportions 3,1" in page
    # A form posted by a script from before splits runs on one GPU.
    old = deployment_form(version, name="tiny-old")
    assert client.post("/deployments/", old).status_code == 302
    assert Deployment.objects.get(name="tiny-old").split_mode == SplitMode.NONE


def test_the_page_shows_where_each_replicas_memory_goes(users, gemma, worker):
    worker("two", gpus=[8000, 8000])
    deployment = _create(users, gemma, split_mode="layer", tensor_split="1,1")
    where = deployment.replica_set.get().memory_by_device
    page = client_for(users[Role.DATA_SCIENTIST]).get(f"/deployments/{deployment.name}/")
    expected = f'data-memory="RAM={where["ram"]},GPU 0={where["gpus"]["0"]},GPU 1='
    assert expected in page.content.decode()


def test_the_api_takes_a_split_and_returns_it(users, version):
    body = {
        "name": "tiny-api",
        "model_version": version.pk,
        "context_length": 256,
        "split_mode": "layer",
        "tensor_split": "1,1",
    }
    response = admin_api(users).post("/api/v1/deployments/", body, format="json")
    assert response.status_code == 201, response.json()
    listed = admin_api(users).get("/api/v1/deployments/tiny-api/").json()
    assert (listed["split_mode"], listed["tensor_split"]) == ("layer", "1,1")
    assert listed["revisions"][0]["settings"]["split_mode"] == "layer"


@pytest.mark.parametrize(
    ("values", "field", "message"),
    [
        ({"split_mode": "layer", "tensor_split": "1;1"}, "tensor_split", "'1;1' is not a number"),
        ({"split_mode": "row", "tensor_split": "0"}, "tensor_split", "At least one GPU"),
        ({"tensor_split": "1,1"}, "tensor_split", "choose the layer or row split mode"),
        ({"split_mode": "row", "placement_gpu": 0}, "placement_gpu", "A row split runs on all"),
        ({"split_mode": "rows"}, "split_mode", "is not a valid choice"),
    ],
)
def test_the_api_refuses_a_bad_split_naming_the_field(users, version, values, field, message):
    body = {"name": "tiny-api", "model_version": version.pk, "context_length": 256, **values}
    response = admin_api(users).post("/api/v1/deployments/", body, format="json")
    assert response.status_code == 400
    assert message in " ".join(response.json()[field])
    assert not Deployment.objects.exists()
