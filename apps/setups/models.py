"""Setups: a model version with every runtime setting and a sampling preset, chosen for
a use case and a response experience; trials that measure one on a worker.

A setup never changes once created (a trial's figures describe exactly what ran, and a
recipe exported from it stays true): a different choice is a new setup.
"""

from __future__ import annotations

from django.conf import settings
from django.core.validators import RegexValidator
from django.db import models
from django.utils import timezone

from apps.accounts.models import User
from apps.deployments.models import RUNTIME_FIELDS, RuntimeSettings

# Segments beside /setups/<name>/ on the pages and the API: a setup of such a name could
# never be opened, so none may take one.
RESERVED_NAMES = ("advisor", "fit", "recipes", "switch", "trials")
SETUP_NAME_PATTERN = rf"^(?!(?:{'|'.join(RESERVED_NAMES)})$)[a-zA-Z0-9][a-zA-Z0-9._:-]{{0,99}}$"
SETUP_NAME = RegexValidator(
    SETUP_NAME_PATTERN,
    "Use letters, digits, '.', '_', ':' and '-' (up to 100), starting with a letter or digit; "
    f"{', '.join(RESERVED_NAMES)} are taken by pages.",
)


class UseCase(models.TextChoices):
    CHAT = "chat", "Chat assistant"
    CODING = "coding", "Coding"
    LONG_DOCUMENTS = "long_documents", "Long documents"
    EXTRACTION = "extraction", "Extraction into structured data"
    SEARCH = "search", "Embeddings for search"


class Experience(models.TextChoices):
    FAST = "fast", "Fast, high throughput"
    QUALITY = "quality", "Highest quality"
    CREATIVE = "creative", "Creative"


class Origin(models.TextChoices):
    MANUAL = "manual", "Made by hand"
    ADVISOR = "advisor", "Proposed by the advisor"
    RECIPE = "recipe", "Imported from a recipe"


# The runtime settings a setup carries, named as on a deployment; a deployment adds
# where and how many (replicas, placement, queue, logging) to them.
SETUP_SETTINGS = ("adapter", *RUNTIME_FIELDS)


class SetupQuerySet(models.QuerySet):
    def visible_to(self, user: User) -> SetupQuerySet:
        # Every signed-in role may see setups (what the box can run); admins change them.
        return self if user.is_authenticated and user.is_active else self.none()


class Setup(RuntimeSettings):
    name = models.CharField(max_length=100, unique=True, validators=[SETUP_NAME])
    notes = models.TextField(blank=True, help_text="Why these settings: for the next admin.")
    use_case = models.CharField(max_length=16, choices=UseCase.choices)
    experience = models.CharField(max_length=16, choices=Experience.choices)
    model_version = models.ForeignKey(
        "registry.ModelVersion", on_delete=models.PROTECT, related_name="setups"
    )
    adapter = models.ForeignKey(
        "registry.ModelVersion",
        null=True,
        blank=True,
        on_delete=models.PROTECT,
        related_name="adapter_setups",
    )
    origin = models.CharField(max_length=16, choices=Origin.choices, default=Origin.MANUAL)
    # For a setup imported from a recipe: the signer's key fingerprint, and whether the
    # box trusted that key when it was imported.
    recipe_signer = models.CharField(max_length=64, blank=True)
    recipe_signer_trusted = models.BooleanField(default=False)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(default=timezone.now)

    objects = SetupQuerySet.as_manager()

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name

    def settings_dict(self) -> dict:
        """The runtime settings as plain values (the adapter as its version's id)."""
        return {
            field: self.adapter_id if field == "adapter" else getattr(self, field)
            for field in SETUP_SETTINGS
        }


class TrialState(models.TextChoices):
    QUEUED = "queued", "Queued"
    RUNNING = "running", "Running"
    SUCCEEDED = "succeeded", "Succeeded"
    FAILED = "failed", "Failed"


class Trial(models.Model):
    """One measurement of a setup on one worker, with the hardware it ran on."""

    setup = models.ForeignKey(Setup, on_delete=models.PROTECT, related_name="trials")
    worker = models.CharField(max_length=200)
    state = models.CharField(max_length=16, choices=TrialState.choices, default=TrialState.QUEUED)
    reason = models.TextField(blank=True)
    progress = models.PositiveSmallIntegerField(default=0)  # percent
    progress_message = models.CharField(max_length=200, blank=True)
    # Figures: None until measured.
    load_seconds = models.FloatField(null=True, blank=True)
    prompt_tps_short = models.FloatField("prompt tokens/s (short)", null=True, blank=True)
    prompt_tps_long = models.FloatField("prompt tokens/s (long)", null=True, blank=True)
    decode_tps_single = models.FloatField("decode tokens/s (1 stream)", null=True, blank=True)
    decode_tps_parallel = models.FloatField("decode tokens/s (all slots)", null=True, blank=True)
    ttft_p50_ms = models.FloatField(null=True, blank=True)
    ttft_p95_ms = models.FloatField(null=True, blank=True)
    peak_ram_bytes = models.BigIntegerField(null=True, blank=True)
    peak_vram_bytes = models.BigIntegerField(null=True, blank=True)
    # Everything measured, with the prompt sizes and counts behind each figure.
    details = models.JSONField(default=dict, blank=True)
    # CPU model and cores, RAM, GPUs and VRAM, llama.cpp build: what the figures hold for.
    hardware = models.JSONField(default=dict, blank=True)
    hardware_class = models.CharField(max_length=200, blank=True)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(default=timezone.now)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at", "-id"]

    def __str__(self) -> str:
        return f"trial {self.pk} of {self.setup}"


class RevisionSetup(models.Model):
    """The setup a deployment's revision was made from (deployed or switched to)."""

    revision = models.OneToOneField(
        "deployments.Revision", on_delete=models.CASCADE, related_name="setup_link"
    )
    setup = models.ForeignKey(Setup, on_delete=models.PROTECT, related_name="revisions")

    def __str__(self) -> str:
        return f"{self.revision} from {self.setup}"
