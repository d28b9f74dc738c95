from __future__ import annotations

from django.conf import settings
from django.db import models
from django.urls import reverse
from django.utils import timezone

from apps.accounts.models import Role, User
from apps.registry.models import REPO_NAME, Artifact, HubImport, ModelVersion

# Data scientists own their datasets; admins and compliance officers see all of them.
WRITER_ROLES = (Role.ADMIN, Role.DATA_SCIENTIST)
SEE_ALL_ROLES = (Role.ADMIN, Role.COMPLIANCE_OFFICER)


class DatasetQuerySet(models.QuerySet):
    def visible_to(self, user: User) -> DatasetQuerySet:
        if not user.is_authenticated:
            return self.none()
        if getattr(user, "is_system", False) or user.has_role(*SEE_ALL_ROLES):
            return self
        if user.has_role(Role.DATA_SCIENTIST):
            return self.filter(owner=user)
        return self.none()


class Dataset(models.Model):
    """A named body of training data; its files are immutable DatasetVersions."""

    name = models.CharField(max_length=100, unique=True, validators=[REPO_NAME])
    description = models.TextField(blank=True)
    owner = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    licence = models.CharField(max_length=100, help_text="An SPDX id or a named licence.")
    source = models.TextField(blank=True, help_text="Where the data came from.")
    created_at = models.DateTimeField(default=timezone.now)

    objects = DatasetQuerySet.as_manager()

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name


class FileFormat(models.TextChoices):
    JSONL = "jsonl", "JSON Lines"
    CSV = "csv", "CSV"
    PARQUET = "parquet", "Parquet"


class Shape(models.TextChoices):
    CHAT = "chat", "Chat (messages)"
    INSTRUCTION = "instruction", "Instruction / input / output"
    PROMPT_COMPLETION = "prompt_completion", "Prompt / completion"
    TEXT = "text", "Plain text"


class State(models.TextChoices):
    VALIDATING = "validating", "Validating"
    VALID = "valid", "Valid"
    REJECTED = "rejected", "Rejected"


class SourceKind(models.TextChoices):
    UPLOAD = "upload", "Uploaded"
    HUGGING_FACE = "hugging_face", "Imported from Hugging Face"
    DERIVED = "derived", "Derived from another version"


class DatasetVersion(models.Model):
    """An immutable file of a dataset and what validation found in it.

    The file and its provenance never change; the validation outcome (state, report
    and the counts copied out of it) is written once, by the validation job.
    """

    dataset = models.ForeignKey(Dataset, on_delete=models.PROTECT, related_name="versions")
    number = models.PositiveIntegerField()
    artifact = models.ForeignKey(Artifact, on_delete=models.PROTECT, related_name="+")
    file_name = models.CharField(max_length=255)
    format = models.CharField(max_length=16, choices=FileFormat.choices)
    # What the uploader said about the file: its shape (blank: detect) and, for CSV and
    # Parquet, which column holds each field.
    declared_shape = models.CharField(max_length=32, choices=Shape.choices, blank=True)
    column_mapping = models.JSONField(default=dict, blank=True)
    # Token counts use this model's tokenizer; rows longer than max_tokens are errors.
    tokenizer = models.ForeignKey(
        ModelVersion, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    max_tokens = models.PositiveIntegerField(null=True, blank=True)
    # Provenance.
    source_kind = models.CharField(max_length=32, choices=SourceKind.choices)
    source = models.JSONField(default=dict, blank=True)
    parent = models.ForeignKey(
        "self", null=True, blank=True, on_delete=models.PROTECT, related_name="children"
    )
    transformation = models.JSONField(default=dict, blank=True)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(default=timezone.now)
    # Validation.
    state = models.CharField(max_length=16, choices=State.choices, default=State.VALIDATING)
    state_reason = models.TextField(blank=True)
    progress_bytes = models.BigIntegerField(default=0)
    validated_at = models.DateTimeField(null=True, blank=True)
    shape = models.CharField(max_length=32, choices=Shape.choices, blank=True)
    rows = models.BigIntegerField(null=True, blank=True)
    valid_rows = models.BigIntegerField(null=True, blank=True)
    error_count = models.BigIntegerField(null=True, blank=True)
    pii_rows = models.BigIntegerField(null=True, blank=True)
    duplicate_rows = models.BigIntegerField(null=True, blank=True)
    report = models.JSONField(default=dict, blank=True)

    class Meta:
        ordering = ["dataset__name", "-number"]
        constraints = [
            models.UniqueConstraint(fields=["dataset", "number"], name="dataset_version_number"),
        ]

    def __str__(self) -> str:
        return f"{self.dataset.name} v{self.number}"

    def get_absolute_url(self) -> str:
        return reverse("datasets:version", args=[self.pk])

    @property
    def sha256(self) -> str:
        return self.artifact_id

    @property
    def size(self) -> int:
        return self.artifact.size

    @property
    def trainable(self) -> bool:
        """Only a version that validated without errors may be used for training."""
        return self.state == State.VALID

    @property
    def progress_percent(self) -> int:
        size = self.artifact.size or 1
        return min(100, round(100 * self.progress_bytes / size))


class JobState(models.TextChoices):
    QUEUED = "queued", "Queued"
    RUNNING = "running", "Running"
    SUCCEEDED = "succeeded", "Succeeded"
    FAILED = "failed", "Failed"


class Operation(models.TextChoices):
    SPLIT = "split", "Train/validation split"
    DEDUPE = "dedupe", "Remove duplicate rows"
    FILTER = "filter", "Drop failed rows (and rows with personal data)"


class DatasetTransform(models.Model):
    """A request to derive new versions from one version (a Celery job)."""

    source_version = models.ForeignKey(
        DatasetVersion, on_delete=models.PROTECT, related_name="transforms"
    )
    operation = models.CharField(max_length=16, choices=Operation.choices)
    params = models.JSONField(default=dict, blank=True)
    state = models.CharField(max_length=16, choices=JobState.choices, default=JobState.QUEUED)
    reason = models.TextField(blank=True)
    details = models.JSONField(default=dict, blank=True)
    outputs = models.ManyToManyField(DatasetVersion, related_name="+", blank=True)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(default=timezone.now)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"{self.get_operation_display()} of {self.source_version}"


class DatasetImport(HubImport):
    """An import of one data file from a Hugging Face dataset repo into a dataset.

    It carries the settings the resulting version is validated with, as an upload does.
    """

    dataset = models.ForeignKey(Dataset, on_delete=models.PROTECT, related_name="imports")
    declared_shape = models.CharField(max_length=32, choices=Shape.choices, blank=True)
    column_mapping = models.JSONField(default=dict, blank=True)
    tokenizer = models.ForeignKey(
        ModelVersion, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    max_tokens = models.PositiveIntegerField(null=True, blank=True)
    version = models.ForeignKey(
        DatasetVersion, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )

    def get_absolute_url(self) -> str:
        return reverse("datasets:import", args=[self.pk])
