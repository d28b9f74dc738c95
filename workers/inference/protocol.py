"""What the control plane and the inference workers say to each other through Redis.

Both sides import this module (it has no Django in it), so message shapes live in one
place (the Redis keys they travel under are ``workers/redis_keys.py``):

- ``ReplicaSpec``: everything a worker needs to load one replica of a deployment.
- ``RequestSpec``: one inference request, sent as a Celery task to the worker that
  holds the replica; its events come back on a Redis stream named by the request id.
- Heartbeats: one Redis key per worker, rewritten every few seconds.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

HEARTBEAT_INTERVAL_SECONDS = 2.0
# Events of a finished request stay readable this long (a slow reader still gets them).
EVENT_STREAM_TTL_SECONDS = 600


# The Celery tasks between the two sides, by name: the control plane sends the first four
# to one worker's own queue (Celery's worker-direct queues), without importing the
# runtime; the worker answers with REPLICA_REPORT on the control queue.
REPLICA_LOAD = "deployments.replica_load"
REPLICA_UNLOAD = "deployments.replica_unload"
REPLICA_RETIRE = "deployments.replica_retire"
INFERENCE_SUBMIT = "inference.submit"
REPLICA_REPORT = "deployments.replica_report"

# A replica's serving modes (ReplicaSpec.serving_mode; the deployment's ServingMode).
IDENTICAL = "identical"
FASTEST = "fastest"

# How a replica spreads its offloaded layers over the worker's GPUs (ReplicaSpec.split_mode;
# the deployment's SplitMode): llama.cpp's LLAMA_SPLIT_MODE_NONE, _LAYER and _ROW.
SPLIT_NONE = "none"
SPLIT_LAYER = "layer"
SPLIT_ROW = "row"


@dataclass(frozen=True)
class ReplicaSpec:
    replica_id: int
    generation: int
    deployment_id: int
    deployment_name: str
    sha256: str
    # Where the worker fetches the file from (the artifact store, a shared mount).
    source_path: str
    architecture: str
    context_length: int
    threads: int | None = None
    gpu_layers: int = 0
    # The GPU (split mode "none"), or for a "layer" or "row" split over all of the
    # worker's GPUs, shared by ``tensor_split`` (a proportion per GPU index; empty: by
    # their free memory), the first that holds part of the model.
    gpu_index: int | None = None
    split_mode: str = SPLIT_NONE
    tensor_split: list[float] = field(default_factory=list)
    batch_size: int = 512
    parallel_slots: int = 1
    embeddings: bool = False
    # How the KV cache stores keys and values ("f16", "q8_0", "q4_0"); a quantised cache
    # needs flash attention.
    kv_cache_type: str = "f16"
    flash_attention: bool = True
    # "identical" (plain weights, pad rows: batch-invariant answers) or "fastest".
    serving_mode: str = "identical"
    chat_template: str = ""
    has_chat_template: bool = False
    queue_size: int = 8
    # Text generated within this many ms after a delta goes out as one delta (0: each token).
    stream_interval_ms: int = 0
    # A LoRA adapter applied on load (fetched and verified like the model).
    adapter_sha256: str = ""
    adapter_source_path: str = ""
    adapter_scale: float = 1.0
    # Reuse a slot's cached prompt cells for a request that begins the same way.
    prompt_cache: bool = True

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ReplicaSpec:
        return cls(**data)


@dataclass(frozen=True)
class RequestSpec:
    request_id: str
    replica_id: int
    generation: int
    kind: str  # "chat", "completion" or "embedding"
    # chat: a list of {"role", "content"}; completion: a string; embedding: list of strings
    messages: list[dict[str, str]] = field(default_factory=list)
    prompt: str = ""
    inputs: list[str] = field(default_factory=list)
    max_tokens: int | None = None
    temperature: float = 0.8
    top_p: float = 0.95
    top_k: int = 40
    repeat_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    # Structured output: the JSON schema the answer must follow (None: free text).
    json_schema: dict[str, Any] | None = None
    # Log-probabilities of the chosen tokens with this many alternatives (None: none).
    top_logprobs: int | None = None
    # Wall-clock time (epoch seconds) after which a request still queued is dropped.
    deadline: float = 0.0
    # Dispatch time, so the worker can report how long the request queued.
    sent_at: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RequestSpec:
        return cls(**data)


# Event types on a request's stream, in order: one "start" (or one "error"), then
# "delta"s (generation; each carries "text" and "tokens", the count generated so far, and
# "logprobs" when asked) or one "embedding" result, then one "end" (or "error"). "start"
# and "end" carry "cached_tokens": prompt tokens found in the replica's prompt cache.
START, DELTA, EMBEDDING, END, ERROR = "start", "delta", "embedding", "end", "error"

# Error codes a worker sends; the endpoint maps them to HTTP statuses.
CONTEXT_LENGTH_EXCEEDED = "context_length_exceeded"
QUEUE_TIMEOUT = "queue_timeout"
REPLICA_UNAVAILABLE = "replica_unavailable"
QUEUE_FULL = "queue_full"
CANCELLED = "cancelled"
INVALID_REQUEST = "invalid_request"
INTERNAL = "internal_error"
