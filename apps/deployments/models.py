from __future__ import annotations

import math

from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.validators import MaxValueValidator, MinValueValidator, RegexValidator
from django.db import models
from django.utils import timezone

from apps.accounts.models import Role, User
from workers.labels import labels_check

DEPLOYMENT_NAME = RegexValidator(
    r"^[a-zA-Z0-9][a-zA-Z0-9._:-]{0,99}$",
    "Use letters, digits, '.', '_', ':' and '-' (up to 100), starting with a letter or digit.",
)

# A deployment's wanted or unwanted worker labels: at most this many of each.
LABELS_MAX = 16


def labels_validator(value: object) -> None:
    """A list of at most LABELS_MAX worker labels (``gpu=a100``, ``spot``), each key once."""
    if not isinstance(value, list):
        raise ValidationError("Give a list of labels.")
    try:
        labels_check(value, limit=LABELS_MAX)
    except ValueError as exc:
        raise ValidationError(str(exc)) from exc


MANAGER_ROLES = (Role.ADMIN,)
# Roles that may call the inference endpoint (and so see what they can call).
INFERENCE_ROLES = (Role.ADMIN, Role.DATA_SCIENTIST, Role.APP_DEVELOPER)


class State(models.TextChoices):
    PENDING = "pending", "Pending"
    LOADING = "loading", "Loading"
    READY = "ready", "Ready"
    STOPPING = "stopping", "Stopping"
    STOPPED = "stopped", "Stopped"
    FAILED = "failed", "Failed"
    # Running, but unloaded after a while without requests: the next request loads it.
    IDLE = "idle", "Unloaded while idle"


class Preset(models.TextChoices):
    """Sampling presets, named by what the answers feel like."""

    PRECISE = "precise", "Precise (focused, repeatable)"
    BALANCED = "balanced", "Balanced"
    CREATIVE = "creative", "Creative (varied, surprising)"


PRESET_SAMPLING: dict[str, dict[str, float | int]] = {
    Preset.PRECISE: {"temperature": 0.2, "top_p": 0.9, "top_k": 20, "repeat_penalty": 1.05},
    Preset.BALANCED: {"temperature": 0.7, "top_p": 0.95, "top_k": 40, "repeat_penalty": 1.1},
    Preset.CREATIVE: {"temperature": 1.0, "top_p": 0.98, "top_k": 100, "repeat_penalty": 1.15},
}


class KvCacheType(models.TextChoices):
    """How the KV cache stores keys and values: smaller types hold more context in the
    same memory, at a small cost in quality."""

    F16 = "f16", "f16 (full precision)"
    Q8_0 = "q8_0", "q8_0 (half the memory, near-lossless)"
    Q4_0 = "q4_0", "q4_0 (a quarter of the memory, some loss)"


class ServingMode(models.TextChoices):
    """What a replica's llama.cpp runs for: the same answer whatever runs beside a
    request, or the most tokens per second (docs/serving.md has the measurements)."""

    IDENTICAL = "identical", "Identical answers (alone or batched)"
    FASTEST = "fastest", "Fastest (repacked weights; answers may vary with the batch)"


# What each serving mode costs or gains, as measured (docs/serving.md), for the
# deployment page.
SERVING_MODE_TRADEOFF = {
    ServingMode.IDENTICAL: "measured over HTTP on a 2-core CPU (bench/concurrency.py), as "
    "fast as fastest mode for one client, 7 % fewer tokens/s at 8 clients and 10 % fewer "
    "at 16, with twice fastest mode's median time to first token at 8",
    ServingMode.FASTEST: "measured over HTTP on a 2-core CPU (bench/concurrency.py), as "
    "fast as identical answers for one client, 1.07x its tokens/s at 8 clients and 1.11x "
    "at 16, half its median time to first token at 8 (a burst of requests is read in one "
    "llama.cpp call)",
}


class SplitMode(models.TextChoices):
    """How a replica spreads its offloaded layers over a worker's GPUs (llama.cpp's
    ``LLAMA_SPLIT_MODE_*``)."""

    NONE = "none", "One GPU"
    LAYER = "layer", "Layers across the worker's GPUs"
    ROW = "row", "Rows of each layer across the worker's GPUs"


# llama.cpp's LLAMA_MAX_DEVICES: the most GPUs a tensor split can name.
MAX_SPLIT_GPUS = 16


def tensor_split_parse(value: str) -> list[float]:
    """The proportions a tensor split gives each GPU, by index ("3,1": GPU 0 takes three
    quarters of the offloaded layers, GPU 1 one quarter); an empty split gives []."""
    if not value.strip():
        return []
    parts = [part.strip() for part in value.split(",")]
    proportions = []
    for part in parts:
        try:
            number = float(part)
        except ValueError:
            raise ValidationError(
                f"'{part}' is not a number: give one proportion per GPU, separated by commas (3,1)."
            ) from None
        if not math.isfinite(number) or number < 0:
            raise ValidationError(f"'{part}' is not a proportion: each must be 0 or more.")
        proportions.append(number)
    if len(proportions) > MAX_SPLIT_GPUS:
        raise ValidationError(
            f"The split names {len(proportions)} GPUs; llama.cpp takes at most {MAX_SPLIT_GPUS}."
        )
    if not any(proportions):
        raise ValidationError("At least one GPU needs a proportion above 0.")
    return proportions


def tensor_split_validator(value: str) -> None:
    tensor_split_parse(value)


# Bytes per stored element of each KV cache type (q8_0 and q4_0 store 32 values in 34
# and 18 bytes).
KV_CACHE_BYTES: dict[str, float] = {"f16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32}


class LoggingLevel(models.TextChoices):
    METADATA = "metadata", "Metadata only (no prompts or outputs)"
    HASHED = "hashed", "Hashed (sha256 of prompts and outputs)"
    FULL = "full", "Full text of prompts and outputs"


class DeploymentQuerySet(models.QuerySet):
    def visible_to(self, user: User) -> DeploymentQuerySet:
        # Every signed-in role may see what runs on the box; changes are checked in services.
        return self if user.is_authenticated and user.is_active else self.none()


class RuntimeSettings(models.Model):
    """How a model runs: the settings a setup chooses and a deployment's revision holds.
    (The adapter is a foreign key on each model that has one, with its own related name.)"""

    adapter_scale = models.FloatField(
        default=1.0, validators=[MinValueValidator(0.0), MaxValueValidator(4.0)]
    )
    context_length = models.PositiveIntegerField(
        default=4096, validators=[MinValueValidator(128), MaxValueValidator(1_048_576)]
    )
    threads = models.PositiveSmallIntegerField(
        null=True, blank=True, help_text="CPU threads per replica; empty: the worker decides."
    )
    gpu_layers = models.IntegerField(
        default=-1,
        validators=[MinValueValidator(-1)],
        help_text="Layers offloaded to the GPU when the replica runs on one (-1: all).",
    )
    batch_size = models.PositiveIntegerField(
        default=512, validators=[MinValueValidator(8), MaxValueValidator(8192)]
    )
    parallel_slots = models.PositiveSmallIntegerField(
        default=1, validators=[MinValueValidator(1), MaxValueValidator(64)]
    )
    embeddings = models.BooleanField(default=False)
    split_mode = models.CharField(
        max_length=8,
        choices=SplitMode.choices,
        default=SplitMode.NONE,
        help_text="With several GPUs on a worker: one GPU holds what is offloaded (none), "
        "whole layers go to each GPU (layer), or each layer's matrices are split by rows "
        "over them (row).",
    )
    tensor_split = models.CharField(
        max_length=200,
        blank=True,
        validators=[tensor_split_validator],
        help_text="With a layer or row split: each GPU's share, by GPU index (3,1: GPU 0 "
        "takes three quarters). Empty: in proportion to each GPU's free memory.",
    )
    kv_cache_type = models.CharField(
        "KV cache type", max_length=8, choices=KvCacheType.choices, default=KvCacheType.F16
    )
    flash_attention = models.BooleanField(
        default=True,
        help_text="Fused attention: faster with several slots; needed by a quantised KV cache.",
    )
    serving_mode = models.CharField(
        max_length=12,
        choices=ServingMode.choices,
        default=ServingMode.IDENTICAL,
        help_text="Identical answers: a greedy request gives the same text alone or among "
        "others. Fastest: llama.cpp's repacked weights and no pad rows, more tokens per "
        "second on a CPU, but an answer may change with what runs beside it.",
    )
    stream_interval_ms = models.PositiveSmallIntegerField(
        "Stream interval (ms)",
        default=100,
        validators=[MaxValueValidator(1000)],
        help_text="Tokens generated within this interval reach a streaming client as one "
        "chunk (the first token goes at once). 0 sends every token on its own: smoother, "
        "but each chunk costs CPU that a CPU-only box takes from the model.",
    )
    preset = models.CharField(max_length=16, choices=Preset.choices, default=Preset.BALANCED)
    chat_template = models.TextField(
        blank=True, help_text="Overrides the model's chat template (Jinja, as in Hugging Face)."
    )

    class Meta:
        abstract = True


# The settings above, in the order forms, recipes and the API list them.
RUNTIME_FIELDS = (
    "adapter_scale",
    "context_length",
    "parallel_slots",
    "batch_size",
    "threads",
    "gpu_layers",
    "split_mode",
    "tensor_split",
    "kv_cache_type",
    "flash_attention",
    "serving_mode",
    "embeddings",
    "stream_interval_ms",
    "preset",
    "chat_template",
)


class Deployment(RuntimeSettings):
    """A model version served under a public name: the ``model`` that API clients send."""

    name = models.CharField(max_length=100, unique=True, validators=[DEPLOYMENT_NAME])
    model_version = models.ForeignKey(
        "registry.ModelVersion", on_delete=models.PROTECT, related_name="deployments"
    )
    # A LoRA adapter (GGUF) applied on top of the model, and how strongly.
    adapter = models.ForeignKey(
        "registry.ModelVersion",
        null=True,
        blank=True,
        on_delete=models.PROTECT,
        related_name="adapter_deployments",
    )
    replicas = models.PositiveSmallIntegerField(
        default=1, validators=[MinValueValidator(1), MaxValueValidator(16)]
    )
    placement_worker = models.CharField(
        max_length=200, blank=True, help_text="Run only on this worker (its Celery hostname)."
    )
    placement_gpu = models.PositiveSmallIntegerField(
        null=True, blank=True, help_text="Run only on this GPU index (needs a GPU worker)."
    )
    # Worker labels (AIBOX_WORKER_LABELS): a replica goes only to a worker with every one
    # of placement_labels and none of exclude_labels (workers.labels says how they match).
    placement_labels = models.JSONField(
        default=list,
        blank=True,
        validators=[labels_validator],
        help_text="Run only on workers with all of these labels (gpu=a100, zone=b).",
    )
    exclude_labels = models.JSONField(
        default=list,
        blank=True,
        validators=[labels_validator],
        help_text="Never run on a worker with any of these labels (spot).",
    )
    logging_level = models.CharField(
        max_length=16, choices=LoggingLevel.choices, default=LoggingLevel.METADATA
    )
    queue_size = models.PositiveSmallIntegerField(
        default=8,
        validators=[MinValueValidator(1), MaxValueValidator(1024)],
        help_text="Requests waiting per replica; more get HTTP 429.",
    )
    queue_timeout_seconds = models.PositiveIntegerField(
        default=60,
        validators=[MinValueValidator(1), MaxValueValidator(3600)],
        help_text="A request still queued after this long fails with a timeout.",
    )
    # Load on demand: unloaded after this long without requests (freeing its memory for
    # other deployments) and loaded again by the next request, which waits for it.
    idle_unload_seconds = models.PositiveIntegerField(
        "Unload when idle for (s)",
        null=True,
        blank=True,
        validators=[MinValueValidator(60), MaxValueValidator(30 * 86400)],
        help_text="Unload the model after this many seconds without a request; the next "
        "request loads it again. Empty: it stays loaded.",
    )
    load_timeout_seconds = models.PositiveIntegerField(
        "Load timeout (s)",
        default=120,
        validators=[MinValueValidator(1), MaxValueValidator(3600)],
        help_text="How long a request for an unloaded deployment waits for it to load.",
    )
    running = models.BooleanField(default=True, help_text="Whether an admin wants it served.")
    # When the idle timer unloaded it (None while loaded, or wanted loaded). The request
    # that clears it (a conditional UPDATE) is the one that starts loading it again.
    idle_unloaded_at = models.DateTimeField(null=True, blank=True)
    # The revision whose settings the fields above hold and whose replicas take requests.
    revision = models.ForeignKey(
        "deployments.Revision", null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    state = models.CharField(max_length=16, choices=State.choices, default=State.PENDING)
    state_reason = models.TextField(blank=True)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(default=timezone.now)
    updated_at = models.DateTimeField(default=timezone.now)

    objects = DeploymentQuerySet.as_manager()

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name


class RevisionState(models.TextChoices):
    PENDING = "pending", "Loading beside the serving one"
    ACTIVE = "active", "Serving"
    FAILED = "failed", "Failed to load"
    RETIRED = "retired", "Replaced"


class Revision(models.Model):
    """One version of a deployment's setup: its model, adapter and every setting.

    A change of setup is a new revision. Its replicas load beside the serving ones, take
    the traffic once every one of them is ready, and the old ones drain and unload; a
    revision that fails to load leaves the serving one as it was.
    """

    deployment = models.ForeignKey(Deployment, on_delete=models.CASCADE, related_name="revisions")
    number = models.PositiveIntegerField()
    model_version = models.ForeignKey(
        "registry.ModelVersion", on_delete=models.PROTECT, related_name="+"
    )
    adapter = models.ForeignKey(
        "registry.ModelVersion", null=True, blank=True, on_delete=models.PROTECT, related_name="+"
    )
    # The setup's other settings (services.REVISION_FIELDS), as plain values. Where and how
    # many replicas run, logging and queueing stay the deployment's, whatever it runs.
    values = models.JSONField(default=dict)
    # What it came from, for people: "created", "setup helpdesk", "rollback to 2".
    label = models.CharField(max_length=200, blank=True)
    state = models.CharField(
        max_length=16, choices=RevisionState.choices, default=RevisionState.PENDING
    )
    reason = models.TextField(blank=True)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(default=timezone.now)
    activated_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["deployment", "-number"]
        constraints = [
            models.UniqueConstraint(fields=["deployment", "number"], name="deployment_revision")
        ]

    def __str__(self) -> str:
        return f"{self.deployment.name} r{self.number}"


class Replica(models.Model):
    """One copy of a deployment loaded on one worker. ``generation`` grows on every load,
    so a late report about an earlier load is recognised and ignored."""

    deployment = models.ForeignKey(Deployment, on_delete=models.CASCADE, related_name="replica_set")
    # The revision it runs (None only for replicas placed before revisions existed).
    revision = models.ForeignKey(
        Revision, null=True, blank=True, on_delete=models.CASCADE, related_name="replicas"
    )
    index = models.PositiveSmallIntegerField()
    worker = models.CharField(max_length=200)
    # The GPU it runs on (None: the CPU); with a layer or row split over the worker's
    # GPUs, the first that holds part of it.
    gpu_index = models.PositiveSmallIntegerField(null=True, blank=True)
    generation = models.PositiveIntegerField(default=1)
    state = models.CharField(max_length=16, choices=State.choices, default=State.PENDING)
    state_reason = models.TextField(blank=True)
    memory_estimate_bytes = models.BigIntegerField(default=0)
    # Where that memory goes on its worker, as memory.MemoryEstimate.where() gives it:
    # {"ram": bytes, "gpus": {"<index>": bytes}}; empty in rows placed before it was kept.
    memory_by_device = models.JSONField(default=dict, blank=True)
    updated_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["deployment", "index"]
        constraints = [
            models.UniqueConstraint(fields=["revision", "index"], name="revision_replica_index")
        ]

    def __str__(self) -> str:
        return f"{self.deployment.name}#{self.index}@{self.worker}"

    @property
    def memory_places(self) -> list[tuple[str, int]]:
        """Where its memory estimate goes, for the page: ("RAM", bytes), ("GPU 0", bytes)."""
        where = self.memory_by_device or {}
        places = [("RAM", where["ram"])] if "ram" in where else []
        return places + [(f"GPU {index}", size) for index, size in where.get("gpus", {}).items()]


class WorkerCredentialQuerySet(models.QuerySet):
    def active(self) -> WorkerCredentialQuerySet:
        return self.filter(revoked_at__isnull=True)


class WorkerCredential(models.Model):
    """What a worker on another host presents to fetch artifacts over HTTP.

    Only a SHA-256 of the secret is kept (the secret is 256 random bits, so a plain hash
    is enough and makes it a lookup). A name is held by one active credential at a time;
    revoking it frees the name for the worker's next credential.
    """

    name = models.CharField(max_length=200)
    secret_hash = models.CharField(max_length=64, unique=True)
    created_by = models.ForeignKey(
        User, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(default=timezone.now)
    revoked_at = models.DateTimeField(null=True, blank=True)
    last_used_at = models.DateTimeField(null=True, blank=True)

    objects = WorkerCredentialQuerySet.as_manager()

    class Meta:
        ordering = ["name", "-created_at"]
        constraints = [
            models.UniqueConstraint(
                fields=["name"],
                condition=models.Q(revoked_at__isnull=True),
                name="worker_credential_active_name",
            )
        ]

    def __str__(self) -> str:
        return self.name

    @property
    def status(self) -> str:
        return "revoked" if self.revoked_at else "active"
