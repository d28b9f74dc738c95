"""The shapes the REST API answers, as TypedDicts: results stay plain JSON dicts (print
them, dump them, put them in a DataFrame) while editors and type checkers know their
keys. The server may add keys; ``total=False`` says not every key is always there.
docs/api.md describes each field."""

from __future__ import annotations

from typing import Any, TypedDict


class Me(TypedDict, total=False):
    id: int
    username: str
    role: str
    api_key: dict[str, Any] | None


class ModelVersion(TypedDict, total=False):
    id: int
    repo: str
    number: int
    file_name: str
    sha256: str
    size: int
    format: str
    architecture: str
    parameter_count: int | None
    state: str
    source: dict[str, Any]
    created_by: str | None
    created_at: str


class Model(TypedDict, total=False):
    name: str
    description: str
    owner: str | None
    licence: str
    licence_url: str
    tags: list[str]
    created_at: str
    versions: list[ModelVersion]


class HubImport(TypedDict, total=False):
    id: int
    url: str
    repo_id: str
    filename: str
    revision: str
    state: str  # queued, running, succeeded, failed
    bytes_done: int
    bytes_total: int | None
    resolved: dict[str, Any]
    reason: str
    notes: list[str]
    version: int | None


class ValidationReport(TypedDict, total=False):
    errors: list[dict[str, Any]]  # first 200: line, code, message
    errors_by_code: dict[str, int]
    length_stats: dict[str, Any]
    histogram: list[Any]
    duplicate_rows: int
    pii: dict[str, Any]


class DatasetVersion(TypedDict, total=False):
    id: int
    dataset: str
    number: int
    file_name: str
    sha256: str
    size: int
    format: str
    state: str  # validating, valid, rejected
    state_reason: str
    trainable: bool
    shape: str
    rows: int | None
    valid_rows: int | None
    error_count: int | None
    pii_rows: int | None
    duplicate_rows: int | None
    parent: int | None
    transformation: dict[str, Any]
    report: ValidationReport
    created_at: str


class Dataset(TypedDict, total=False):
    name: str
    description: str
    owner: str | None
    licence: str
    source: str
    created_at: str
    versions: list[DatasetVersion]


class DatasetRow(TypedDict, total=False):
    number: int
    line: int
    row: dict[str, Any] | None
    shape: str | None
    error: str | None
    raw: str | None


class DatasetRows(TypedDict, total=False):
    start: int
    count: int
    total: int | None
    rows: list[DatasetRow]


class DatasetTransform(TypedDict, total=False):
    id: int
    source_version: int
    operation: str
    params: dict[str, Any]
    state: str
    reason: str
    details: dict[str, Any]
    outputs: list[int]


class FineTune(TypedDict, total=False):
    id: int
    name: str
    base_model: int
    dataset_version: int
    validation_version: int | None
    params: dict[str, Any]
    state: str  # queued, running, succeeded, failed, cancelled
    reason: str
    queue_position: int | None
    attempts: int
    worker: str
    step: int
    max_steps: int | None
    epoch: float | None
    train_loss: float | None
    validation_loss: float | None
    learning_rate: float | None
    tokens_per_s: float | None
    eta_s: float | None
    last_checkpoint_step: int | None
    history: list[dict[str, Any]]  # [{step, train_loss | validation_loss}]
    logs: list[Any]
    result: dict[str, Any]
    adapter: int | None
    peft_adapter: int | None
    created_by: str | None
    created_at: str


class OptimiseJob(TypedDict, total=False):
    id: int
    operation: str  # quantize, export
    source: int
    adapter: int | None
    params: dict[str, Any]
    output_version: int | None
    state: str  # queued, running, succeeded, failed
    reason: str
    progress: float
    progress_message: str
    result: dict[str, Any]


class Evaluation(TypedDict, total=False):
    id: int
    model_version: int
    adapter: int | None
    dataset_version: int
    perplexity: float | None
    kl_divergence: float | None
    top_token_agreement: float | None
    exact_match: float | None
    contains: float | None
    tokens_per_s: float | None
    state: str
    reason: str
    progress: float
    result: dict[str, Any]


class Revision(TypedDict, total=False):
    number: int
    state: str
    label: str
    reason: str
    model_version: int
    sha256: str
    adapter: int | None
    settings: dict[str, Any]
    created_at: str
    activated_at: str | None


class Deployment(TypedDict, total=False):
    id: int
    name: str
    model_version: int
    model: str
    sha256: str
    adapter: int | None
    context_length: int
    replicas: int
    running: bool
    state: str  # pending, loading, ready, idle, stopped, failed...
    state_reason: str
    replica_states: list[dict[str, Any]]
    revision: int | None
    revisions: list[Revision]


class Setup(TypedDict, total=False):
    name: str
    use_case: str
    experience: str
    model_version: int


class UsageRecord(TypedDict, total=False):
    request_id: str
    created_at: str
    username: str
    api_key_prefix: str
    deployment_name: str
    endpoint: str
    stream: bool
    prompt_tokens: int
    completion_tokens: int
    latency_ms: int
    outcome: str
    status_code: int
    error: str


class UsageDaily(TypedDict, total=False):
    start: str
    end: str
    totals: dict[str, int]
    days: list[dict[str, Any]]


class PublicKey(TypedDict):
    pem: str
    fingerprint: str
