from __future__ import annotations

from django.conf import settings
from django.contrib.postgres.fields import ArrayField
from django.core.validators import RegexValidator
from django.db import models
from django.urls import reverse
from django.utils import timezone

from apps.accounts.models import Role, User

REPO_NAME = RegexValidator(
    r"^[a-z0-9][a-z0-9._-]{0,99}$",
    "Use lower-case letters, digits, '.', '_' and '-' (up to 100), "
    "starting with a letter or digit.",
)


class ModelRepoQuerySet(models.QuerySet):
    def visible_to(self, user: User) -> ModelRepoQuerySet:
        # Every signed-in role may read the registry; writes are checked in services.
        return self if user.is_authenticated and user.is_active else self.none()


class ModelRepo(models.Model):
    """A named model, e.g. ``gemma-3-270m``; its files are immutable ModelVersions."""

    name = models.CharField(max_length=100, unique=True, validators=[REPO_NAME])
    description = models.TextField(blank=True)
    owner = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    licence = models.CharField(
        max_length=100, help_text="An SPDX id (apache-2.0, mit…) or a named licence (gemma)."
    )
    licence_url = models.URLField(blank=True)
    tags = ArrayField(models.CharField(max_length=50), default=list, blank=True)
    created_at = models.DateTimeField(default=timezone.now)

    objects = ModelRepoQuerySet.as_manager()

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name


class Artifact(models.Model):
    """One stored file, named by its sha256; shared by every version with that content."""

    sha256 = models.CharField(max_length=64, primary_key=True)
    size = models.BigIntegerField()
    created_at = models.DateTimeField(default=timezone.now)
    last_verified_at = models.DateTimeField(null=True, blank=True)
    # Set when a re-hash found the file changed or missing; cleared when it verifies again.
    # While set, nothing serves or trains on it.
    integrity_failed_at = models.DateTimeField(null=True, blank=True)
    integrity_failure = models.TextField(blank=True)

    def __str__(self) -> str:
        return self.sha256


class Format(models.TextChoices):
    GGUF_MODEL = "gguf_model", "GGUF model"
    GGUF_LORA = "gguf_lora", "GGUF LoRA adapter"
    PEFT_SAFETENSORS = "peft_safetensors", "PEFT adapter (safetensors)"


class State(models.TextChoices):
    DRAFT = "draft", "Draft"
    APPROVED = "approved", "Approved"
    DEPRECATED = "deprecated", "Deprecated"


class SourceKind(models.TextChoices):
    UPLOAD = "upload", "Uploaded"
    SERVER_PATH = "server_path", "Imported from a server path"
    HUGGING_FACE = "hugging_face", "Imported from Hugging Face"
    BUNDLED = "bundled", "Bundled with AIBox"
    FINE_TUNE = "fine_tune", "Produced by a fine-tune"
    QUANTIZED = "quantized", "Quantised by AIBox"
    EXPORTED = "exported", "Exported by AIBox (F16/BF16, an adapter merged in or not)"


APPROVER_ROLES = (Role.ADMIN, Role.COMPLIANCE_OFFICER)
WRITER_ROLES = (Role.ADMIN, Role.DATA_SCIENTIST)


class ModelVersion(models.Model):
    """An immutable file in a repo. PostgreSQL refuses changes to its content columns."""

    repo = models.ForeignKey(ModelRepo, on_delete=models.PROTECT, related_name="versions")
    number = models.PositiveIntegerField()
    artifact = models.ForeignKey(Artifact, on_delete=models.PROTECT, related_name="versions")
    file_name = models.CharField(max_length=255)
    format = models.CharField(max_length=32, choices=Format.choices)
    metadata = models.JSONField(default=dict, blank=True)
    # Parsed GGUF header fields, as columns for listing and filtering.
    architecture = models.CharField(max_length=64, blank=True)
    parameter_count = models.BigIntegerField(null=True, blank=True)
    quantization = models.CharField(max_length=32, blank=True)
    context_length = models.PositiveIntegerField(null=True, blank=True)
    layers = models.PositiveIntegerField(null=True, blank=True)
    embedding_size = models.PositiveIntegerField(null=True, blank=True)
    vocab_size = models.PositiveIntegerField(null=True, blank=True)
    has_chat_template = models.BooleanField(default=False)
    # Provenance: where it came from, who brought it in, and what it derives from.
    source_kind = models.CharField(max_length=32, choices=SourceKind.choices)
    source = models.JSONField(default=dict, blank=True)
    parents = models.ManyToManyField("self", symmetrical=False, related_name="children", blank=True)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(default=timezone.now)
    # Lifecycle: the only columns that change after creation.
    state = models.CharField(max_length=16, choices=State.choices, default=State.DRAFT)
    state_changed_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    state_changed_at = models.DateTimeField(null=True, blank=True)
    state_reason = models.TextField(blank=True)

    class Meta:
        ordering = ["repo__name", "-number"]
        constraints = [
            models.UniqueConstraint(fields=["repo", "number"], name="registry_version_number"),
            models.UniqueConstraint(fields=["repo", "artifact"], name="registry_version_once"),
        ]

    def __str__(self) -> str:
        return f"{self.repo.name} v{self.number}"

    def get_absolute_url(self) -> str:
        return reverse("registry:version", args=[self.pk])

    @property
    def sha256(self) -> str:
        return self.artifact_id

    @property
    def size(self) -> int:
        return self.artifact.size


class LicenceOverride(models.Model):
    """An admin's recorded decision that a version may be deployed although its licence
    names terms the deployment allow-list (AIBOX_DEPLOY_LICENCE_ALLOWLIST) does not.

    It covers the terms it lists, so a term later dropped from the allow-list needs an
    override of its own. Overrides are append-only: they are never edited or deleted.
    """

    version = models.ForeignKey(
        ModelVersion, on_delete=models.PROTECT, related_name="licence_overrides"
    )
    licence = models.CharField(max_length=500)  # the version's licence when it was granted
    terms = ArrayField(models.CharField(max_length=100))  # the terms it allows
    reason = models.TextField()
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["-created_at", "-id"]

    def __str__(self) -> str:
        return f"licence override of {self.version} ({', '.join(self.terms)})"


class ImportState(models.TextChoices):
    QUEUED = "queued", "Queued"
    RUNNING = "running", "Running"
    SUCCEEDED = "succeeded", "Succeeded"
    FAILED = "failed", "Failed"


class HubImport(models.Model):
    """A request to bring one file from a Hugging Face hub in, and its progress: what a
    model import and a dataset import have in common (each adds its target and version).

    The row is the job's truth: a worker claims it (queued → running), writes progress
    as bytes arrive and ends it succeeded (with the version) or failed (with a reason).
    """

    hf_repo_id = models.CharField("Hugging Face repo", max_length=200)
    filename = models.CharField(max_length=1000)
    revision = models.CharField(max_length=200, default="main")
    # Copied from settings at request time, so the job and its provenance name the hub.
    endpoint = models.CharField(max_length=300)
    state = models.CharField(max_length=16, choices=ImportState.choices, default=ImportState.QUEUED)
    bytes_done = models.BigIntegerField(default=0)
    bytes_total = models.BigIntegerField(null=True, blank=True)
    # What the hub said about the file: commit, etag, LFS sha256, size, the card's licence.
    resolved = models.JSONField(default=dict, blank=True)
    reason = models.TextField(blank=True)  # why it failed
    notes = models.TextField(blank=True)  # worth knowing though it succeeded (licences differ)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(default=timezone.now)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        abstract = True
        ordering = ["-created_at", "-id"]

    def __str__(self) -> str:
        return f"{self.hf_repo_id}/{self.filename}@{self.revision}"

    @property
    def finished(self) -> bool:
        return self.state in (ImportState.SUCCEEDED, ImportState.FAILED)

    @property
    def percent(self) -> int | None:
        if not self.bytes_total:
            return None
        return min(100, self.bytes_done * 100 // self.bytes_total)


class ModelImport(HubImport):
    """An import of one GGUF file from a Hugging Face model repo into a model repo."""

    repo = models.ForeignKey(ModelRepo, on_delete=models.PROTECT, related_name="imports")
    version = models.ForeignKey(
        ModelVersion, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )

    def get_absolute_url(self) -> str:
        return reverse("registry:import", args=[self.pk])
