from __future__ import annotations

from django.conf import settings
from django.db import models
from django.utils import timezone

from apps.accounts.models import Role, User
from apps.datasets.models import DatasetVersion
from apps.registry.models import ModelVersion

LAUNCHER_ROLES = (Role.ADMIN, Role.DATA_SCIENTIST)
SEE_ALL_ROLES = (Role.ADMIN, Role.COMPLIANCE_OFFICER)


class JobQuerySet(models.QuerySet):
    def visible_to(self, user: User) -> JobQuerySet:
        # Like datasets: data scientists see the jobs they launched.
        if not user.is_authenticated:
            return self.none()
        if getattr(user, "is_system", False) or user.has_role(*SEE_ALL_ROLES):
            return self
        if user.has_role(Role.DATA_SCIENTIST):
            return self.filter(created_by=user)
        return self.none()


class JobState(models.TextChoices):
    QUEUED = "queued", "Queued"
    RUNNING = "running", "Running"
    SUCCEEDED = "succeeded", "Succeeded"
    FAILED = "failed", "Failed"
    CANCELLED = "cancelled", "Cancelled"


ACTIVE_STATES = (JobState.QUEUED, JobState.RUNNING)


class FineTuneJob(models.Model):
    """A LoRA fine-tune of a base model on a dataset version, and everything it reported.

    PostgreSQL holds the job's truth: its state, the progress the worker relays through
    Redis (applied in order by sequence number), the loss history, the logs and the
    adapters it produced, so a reload or a restarted web process shows the same job.
    """

    name = models.CharField(max_length=100)
    base_model = models.ForeignKey(ModelVersion, on_delete=models.PROTECT, related_name="+")
    dataset_version = models.ForeignKey(
        DatasetVersion, on_delete=models.PROTECT, related_name="finetune_jobs"
    )
    validation_version = models.ForeignKey(
        DatasetVersion, null=True, blank=True, on_delete=models.PROTECT, related_name="+"
    )
    params = models.JSONField(default=dict)  # the hyperparameters, as trained
    chat_template = models.TextField(blank=True)  # blank: the model's own / default
    output_repo = models.CharField(max_length=100)  # registry repo the adapters go to
    state = models.CharField(max_length=16, choices=JobState.choices, default=JobState.QUEUED)
    reason = models.TextField(blank=True)
    cancel_requested = models.BooleanField(default=False)
    attempts = models.PositiveIntegerField(default=0)
    worker = models.CharField(max_length=200, blank=True)
    # Progress, as last reported; stream_pos is the last Redis stream entry applied.
    stream_pos = models.CharField(max_length=40, default="0")
    step = models.PositiveIntegerField(default=0)
    max_steps = models.PositiveIntegerField(null=True, blank=True)
    epoch = models.FloatField(null=True, blank=True)
    train_loss = models.FloatField(null=True, blank=True)
    validation_loss = models.FloatField(null=True, blank=True)
    learning_rate = models.FloatField(null=True, blank=True)
    tokens_per_s = models.FloatField(null=True, blank=True)
    eta_s = models.FloatField(null=True, blank=True)
    history = models.JSONField(default=list, blank=True)  # [{step, train_loss|validation_loss}]
    logs = models.JSONField(default=list, blank=True)  # the last lines, with times
    last_checkpoint_step = models.PositiveIntegerField(null=True, blank=True)
    result = models.JSONField(default=dict, blank=True)  # versions, hardware, duration…
    adapter = models.ForeignKey(
        ModelVersion, null=True, blank=True, on_delete=models.PROTECT, related_name="+"
    )
    peft_adapter = models.ForeignKey(
        ModelVersion, null=True, blank=True, on_delete=models.PROTECT, related_name="+"
    )
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(default=timezone.now)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    objects = JobQuerySet.as_manager()

    class Meta:
        ordering = ["-created_at", "-id"]

    def __str__(self) -> str:
        return f"fine-tune #{self.pk} {self.name}"

    @property
    def active(self) -> bool:
        return self.state in ACTIVE_STATES

    @property
    def progress_percent(self) -> int:
        if self.state == JobState.SUCCEEDED:
            return 100
        if not self.max_steps:
            return 0
        return min(100, round(100 * self.step / self.max_steps))
