"""Optimisation jobs (quantise, export/merge) and evaluations of model versions.

Each is a job row a training worker claims (queued → running), reports progress on and
ends (succeeded with its result, or failed with a reason). A quantise or export job
ends with a new model version in the registry; an evaluation ends with its figures,
stored against the model version (and adapter) and the dataset version's sha256.
"""

from __future__ import annotations

from django.conf import settings
from django.db import models
from django.urls import reverse
from django.utils import timezone

from apps.accounts.models import Role, User
from apps.datasets.models import DatasetVersion
from apps.finetune.models import FineTuneJob
from apps.registry.models import ModelVersion

LAUNCHER_ROLES = (Role.ADMIN, Role.DATA_SCIENTIST)


class JobState(models.TextChoices):
    QUEUED = "queued", "Queued"
    RUNNING = "running", "Running"
    SUCCEEDED = "succeeded", "Succeeded"
    FAILED = "failed", "Failed"


ACTIVE_STATES = (JobState.QUEUED, JobState.RUNNING)


class JobQuerySet(models.QuerySet):
    def visible_to(self, user: User) -> JobQuerySet:
        # Results describe registry versions, which every signed-in role may read.
        return self if user.is_authenticated and user.is_active else self.none()


class Job(models.Model):
    """What every optimisation job has: who asked, its state, progress and outcome."""

    state = models.CharField(max_length=16, choices=JobState.choices, default=JobState.QUEUED)
    reason = models.TextField(blank=True)  # why it failed
    progress = models.PositiveSmallIntegerField(default=0)  # percent
    progress_message = models.CharField(max_length=300, blank=True)
    worker = models.CharField(max_length=200, blank=True)
    # Touched while a worker runs the job; a job silent for long is failed by beat.
    heartbeat_at = models.DateTimeField(null=True, blank=True)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(default=timezone.now)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    objects = JobQuerySet.as_manager()

    class Meta:
        abstract = True
        ordering = ["-created_at", "-id"]

    @property
    def active(self) -> bool:
        return self.state in ACTIVE_STATES


class Operation(models.TextChoices):
    QUANTIZE = "quantize", "Quantise"
    EXPORT = "export", "Export F16/BF16 (merging an adapter or not)"


class ModelJob(Job):
    """A quantisation of a model version, or its export at F16/BF16 with an adapter
    merged in; either ends as a new draft version with provenance."""

    operation = models.CharField(max_length=16, choices=Operation.choices)
    source = models.ForeignKey(ModelVersion, on_delete=models.PROTECT, related_name="+")
    adapter = models.ForeignKey(
        ModelVersion, null=True, blank=True, on_delete=models.PROTECT, related_name="+"
    )
    # The fine-tune that produced the adapter, when AIBox trained it.
    finetune_job = models.ForeignKey(
        FineTuneJob, null=True, blank=True, on_delete=models.PROTECT, related_name="+"
    )
    # Text whose activations weigh the rounding (an importance matrix), for quantising.
    imatrix_dataset = models.ForeignKey(
        DatasetVersion, null=True, blank=True, on_delete=models.PROTECT, related_name="+"
    )
    # quantize: quant_type, allow_requantize, imatrix_chunks; export: out_type, adapter_scale.
    params = models.JSONField(default=dict)
    output_repo = models.CharField(max_length=100)
    output_version = models.ForeignKey(
        ModelVersion, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    result = models.JSONField(default=dict, blank=True)  # seconds, size, llama.cpp build…

    class Meta(Job.Meta):
        pass

    def __str__(self) -> str:
        if self.operation == Operation.QUANTIZE:
            return f"quantise #{self.pk} {self.source} to {self.params.get('quant_type')}"
        merged = f" + {self.adapter}" if self.adapter_id else ""
        return f"export #{self.pk} {self.source}{merged} at {self.params.get('out_type')}"

    def get_absolute_url(self) -> str:
        return reverse("optimise:job", args=[self.pk])


class Evaluation(Job):
    """A model version (with an adapter or not) measured on a dataset version.

    Text data gives a perplexity (llama.cpp's protocol) and, against a reference model,
    the KL divergence and top-token agreement; prompt → completion data gives a task
    score. The figures are columns so versions can be compared; ``result`` keeps the
    rest (counts, examples, timings, hardware).
    """

    model_version = models.ForeignKey(
        ModelVersion, on_delete=models.PROTECT, related_name="evaluations"
    )
    adapter = models.ForeignKey(
        ModelVersion, null=True, blank=True, on_delete=models.PROTECT, related_name="+"
    )
    dataset_version = models.ForeignKey(
        DatasetVersion, on_delete=models.PROTECT, related_name="evaluations"
    )
    # Copied at request time: the figures hold for exactly this content.
    dataset_sha256 = models.CharField(max_length=64)
    reference = models.ForeignKey(
        ModelVersion, null=True, blank=True, on_delete=models.PROTECT, related_name="+"
    )
    params = models.JSONField(default=dict)  # n_ctx, max_chunks, max_items, max_tokens
    perplexity = models.FloatField(null=True, blank=True)
    perplexity_uncertainty = models.FloatField(null=True, blank=True)
    kl_divergence = models.FloatField(null=True, blank=True)
    kl_uncertainty = models.FloatField(null=True, blank=True)
    top_token_agreement = models.FloatField(null=True, blank=True)  # 0..1
    exact_match = models.FloatField(null=True, blank=True)  # 0..1
    contains = models.FloatField(null=True, blank=True)  # 0..1
    tokens_per_s = models.FloatField(null=True, blank=True)  # of the evaluation itself
    result = models.JSONField(default=dict, blank=True)

    class Meta(Job.Meta):
        indexes = [models.Index(fields=["model_version", "dataset_sha256"])]

    def __str__(self) -> str:
        with_adapter = f" + {self.adapter}" if self.adapter_id else ""
        return f"evaluation #{self.pk} of {self.model_version}{with_adapter}"

    def get_absolute_url(self) -> str:
        return reverse("optimise:evaluation", args=[self.pk])
