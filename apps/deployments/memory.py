"""How much memory a replica takes, and where: its worker's RAM and each GPU it uses.

llama.cpp places a model layer by layer (``load_tensors`` in the llama.cpp that
llama-cpp-python 0.3.36 builds). The input layer (the token embedding) always stays in
RAM. ``gpu_layers`` counts from the top, the output layer first: n offloads the output
layer and the last n - 1 repeating layers, so the layer count + 1 (or -1) offloads
everything. A layer's KV cache lives where the layer does. With several GPUs on a
worker, a layer split (``LLAMA_SPLIT_MODE_LAYER``) gives each GPU a run of whole layers
in proportion to the tensor split, the first GPU the lowest of them; a row split
(``ROW``) assigns the layers (and their KV cache) the same way and cuts every offloaded
matrix by rows over all the GPUs in those proportions.

The bytes of each layer come from the GGUF's tensors, read once when the version was
registered (``workers.gguf_meta.tensor_layout``, kept in the version's metadata), so
placing a replica never opens its file. A version registered before that has no layout:
its file is taken as spread evenly over the layers and the output layer, which keeps
the estimate of a model offloaded whole what it always was.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from apps.deployments.models import KV_CACHE_BYTES, KvCacheType, SplitMode
from apps.registry.models import ModelVersion

MIB = 1024 * 1024
# llama.cpp's scratch buffers and runtime overhead beyond weights and KV cache, on each
# device that runs part of the model.
COMPUTE_OVERHEAD_BYTES = 48 * MIB
# Keep this much of a worker's memory free for the OS and the worker itself.
HEADROOM_BYTES = 256 * MIB


@dataclass(frozen=True)
class Offload:
    """What a replica puts on a worker's GPUs: ``gpu_layers`` (-1: all) on ``gpus``,
    pairs of (GPU index, proportion) in the order llama.cpp numbers its devices, split
    as ``split_mode`` says (one GPU for ``none``)."""

    gpu_layers: int
    gpus: tuple[tuple[int, float], ...]
    split_mode: str = SplitMode.NONE


@dataclass(frozen=True)
class MemoryEstimate:
    """A replica's memory: what it is (weights, KV cache, buffers) and where it goes
    (``ram``, and bytes on each GPU by index). The two add up to the same total."""

    weights: int
    kv_cache: int
    compute: int
    ram: int
    gpus: dict[int, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.compute

    def where(self) -> dict[str, Any]:
        """Where it goes, as JSON keeps it (a replica's ``memory_by_device``)."""
        return {"ram": self.ram, "gpus": {str(index): size for index, size in self.gpus.items()}}

    def as_dict(self) -> dict[str, Any]:
        return {
            "weights": self.weights,
            "kv_cache": self.kv_cache,
            "compute": self.compute,
            "total": self.total,
            **self.where(),
        }


def tensor_layout(version: ModelVersion) -> dict[str, Any]:
    """The version's tensor bytes by layer (``workers.gguf_meta.tensor_layout``), or for
    a version registered before they were recorded, its file spread evenly over the
    repeating layers and the output layer."""
    meta = version.metadata or {}
    layout = meta.get("tensor_bytes")
    if layout:
        return layout
    count = version.layers or meta.get("layers") or 0
    share = version.size // (count + 1)
    return {
        "layers": [share] * count,
        "input": 0,
        "output": version.size - share * count,
        "embedding": 0,
        "output_tied": False,
    }


def kv_cache_bytes(version: ModelVersion, tokens: int, kv_cache_type: str) -> int:
    """The KV cache of every layer for ``tokens`` tokens, sized from the GGUF attention
    shape (grouped-query heads make it smaller); a file that does not state it is sized
    as if every head had its own KV."""
    meta = version.metadata or {}
    layers = version.layers or meta.get("layers") or 0
    embedding = version.embedding_size or meta.get("embedding_size") or 0
    heads = meta.get("attention_heads") or 0
    kv_heads = meta.get("attention_heads_kv") or heads
    head_dim = embedding // heads if heads else 0
    key_len = meta.get("key_length") or head_dim
    value_len = meta.get("value_length") or head_dim
    elements = layers * kv_heads * (key_len + value_len) if kv_heads else layers * embedding * 2
    return int(elements * KV_CACHE_BYTES[kv_cache_type] * tokens)


def layer_devices(layer_count: int, offload: Offload) -> list[int | None]:
    """The GPU (None: the CPU) of each repeating layer and, last, of the output layer, as
    llama.cpp's ``load_tensors`` assigns them: the last ``gpu_layers`` of these (-1: all)
    go to the GPUs, in runs by the split's proportions, the first GPU the lowest."""
    slots = layer_count + 1
    wanted = slots if offload.gpu_layers < 0 else offload.gpu_layers
    first = max(slots - wanted, 0)
    active = min(wanted, slots)
    indices = [index for index, _ in offload.gpus]
    # Cumulative proportions, in single precision as llama.cpp computes them, so a layer
    # on a boundary goes to the GPU llama.cpp gives it.
    bounds = np.cumsum(np.array([share for _, share in offload.gpus], dtype=np.float32))
    bounds = bounds / bounds[-1]
    devices: list[int | None] = []
    for layer in range(slots):
        if layer < first:
            devices.append(None)
            continue
        at = np.float32(layer - first) / np.float32(active)
        position = int(np.searchsorted(bounds, at, side="right"))
        devices.append(indices[min(position, len(indices) - 1)])
    return devices


def _spread(size: int, offload: Offload) -> dict[int, int]:
    """``size`` bytes cut by the split's proportions (a row split's matrices), leaving
    out the GPUs whose proportion is 0."""
    total = sum(share for _, share in offload.gpus)
    parts = {index: int(size * share / total) for index, share in offload.gpus if share > 0}
    largest = max(parts, key=lambda index: dict(offload.gpus)[index])
    parts[largest] += size - sum(parts.values())
    return parts


def _add(into: dict[int, int], parts: dict[int, int]) -> None:
    for index, size in parts.items():
        into[index] = into.get(index, 0) + size


def memory_estimate(
    *,
    version: ModelVersion,
    context_length: int,
    parallel_slots: int,
    batch_size: int,
    kv_cache_type: str = KvCacheType.F16,
    adapter_bytes: int = 0,
    offload: Offload | None = None,
) -> MemoryEstimate:
    """Weights, plus a KV cache for every slot's full context, plus scratch buffers, and
    where each goes.

    Without an ``offload`` (or with 0 GPU layers) everything is in RAM, the weights
    counted as the whole file (it is mapped). With one, each offloaded layer's tensor
    bytes and KV cache move to its GPU; the logits of a batch go where the output layer
    runs, and each device that holds part of the model gets llama.cpp's scratch. A LoRA
    adapter is loaded beside the tensors it changes: it is shared out like the layers.
    """
    meta = version.metadata or {}
    embedding = version.embedding_size or meta.get("embedding_size") or 0
    vocab = version.vocab_size or meta.get("vocab_size") or 0
    kv_cache = kv_cache_bytes(version, context_length * parallel_slots, kv_cache_type)
    logits = batch_size * (vocab + 4 * embedding) * 4
    if offload is None or offload.gpu_layers == 0 or not offload.gpus:
        weights = version.size + adapter_bytes
        compute = COMPUTE_OVERHEAD_BYTES + logits
        return MemoryEstimate(weights, kv_cache, compute, ram=weights + kv_cache + compute)

    layout = tensor_layout(version)
    layers = layout["layers"]
    devices = layer_devices(len(layers), offload)
    row = offload.split_mode == SplitMode.ROW
    ram = version.size
    gpus: dict[int, int] = {}
    layer_parts: dict[int, int] = {}  # the repeating layers' bytes on each GPU
    for layer, device in enumerate(devices):
        if device is None:
            continue
        if layer < len(layers):
            moved = size = layers[layer]
        else:
            moved = layout["output"]
            # A tied output layer runs from its own copy of the embedding on the GPU.
            size = moved + (layout["embedding"] if layout["output_tied"] else 0)
        ram -= moved
        parts = _spread(size, offload) if row and size else {device: size}
        _add(gpus, parts)
        if layer < len(layers):
            _add(layer_parts, parts)
    layer_total = sum(layers)
    if adapter_bytes and layer_total:
        adapter = {i: adapter_bytes * size // layer_total for i, size in layer_parts.items()}
        _add(gpus, adapter)
        ram += adapter_bytes - sum(adapter.values())
    else:
        ram += adapter_bytes
    weights = ram + sum(gpus.values())

    # Each layer's share of the cache, where the layer is.
    count = len(layers)
    for layer, device in enumerate(devices[:count]):
        share = kv_cache * (layer + 1) // count - kv_cache * layer // count
        if device is None:
            ram += share
        else:
            _add(gpus, {device: share})

    # Every device that runs part of the model has scratch; where the output layer runs,
    # the logits of a batch too. RAM always holds the input layer.
    used = [index for index, size in gpus.items() if size]
    compute = COMPUTE_OVERHEAD_BYTES * (1 + len(used)) + logits
    ram += COMPUTE_OVERHEAD_BYTES
    _add(gpus, dict.fromkeys(used, COMPUTE_OVERHEAD_BYTES))
    if devices[-1] is None:
        ram += logits
    else:
        _add(gpus, {devices[-1]: logits})
    gpus = {index: size for index, size in sorted(gpus.items()) if size}
    return MemoryEstimate(weights, kv_cache, compute, ram=ram, gpus=gpus)
