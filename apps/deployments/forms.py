from __future__ import annotations

from django import forms
from django.core.exceptions import ValidationError

from apps.deployments.models import LABELS_MAX, Deployment, KvCacheType, ServingMode, SplitMode
from apps.registry.models import Format, ModelVersion, State
from workers.labels import labels_parse

LOAD_TIMEOUT_DEFAULT = Deployment._meta.get_field("load_timeout_seconds").default


class LabelsField(forms.CharField):
    """Worker labels typed as one line (``gpu=a100, zone=b``), cleaned to a list."""

    def to_python(self, value: object) -> list[str]:
        try:
            return labels_parse(super().to_python(value), limit=LABELS_MAX)
        except ValueError as exc:
            raise ValidationError(str(exc)) from exc

    def prepare_value(self, value: object) -> object:
        return ", ".join(value) if isinstance(value, list) else value


class DeploymentForm(forms.ModelForm):
    model_version = forms.ModelChoiceField(
        queryset=ModelVersion.objects.filter(format=Format.GGUF_MODEL, state=State.APPROVED)
        .select_related("repo")
        .order_by("repo__name", "-number"),
        label="Model version",
        help_text="Only approved GGUF models can be deployed.",
    )
    adapter = forms.ModelChoiceField(
        queryset=ModelVersion.objects.filter(format=Format.GGUF_LORA, state=State.APPROVED)
        .select_related("repo")
        .order_by("repo__name", "-number"),
        required=False,
        empty_label="None",
        label="LoRA adapter",
        help_text="An approved GGUF LoRA adapter trained on this model (from a fine-tune).",
    )
    placement_labels = LabelsField(
        required=False,
        label="Worker labels wanted",
        help_text="Comma-separated (gpu=a100, zone=b): only workers with all of them "
        "(AIBOX_WORKER_LABELS). A bare word matches any value.",
    )
    exclude_labels = LabelsField(
        required=False,
        label="Worker labels excluded",
        help_text="Comma-separated (spot): never a worker with any of them.",
    )

    class Meta:
        model = Deployment
        fields = [
            "name",
            "model_version",
            "adapter",
            "adapter_scale",
            "preset",
            "context_length",
            "replicas",
            "parallel_slots",
            "threads",
            "gpu_layers",
            "split_mode",
            "tensor_split",
            "batch_size",
            "embeddings",
            "kv_cache_type",
            "flash_attention",
            "serving_mode",
            "stream_interval_ms",
            "logging_level",
            "queue_size",
            "queue_timeout_seconds",
            "idle_unload_seconds",
            "load_timeout_seconds",
            "placement_worker",
            "placement_gpu",
            "placement_labels",
            "exclude_labels",
            "chat_template",
        ]
        labels = {"name": "Public name (the 'model' clients send)"}
        widgets = {"chat_template": forms.Textarea(attrs={"rows": 3})}

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.fields["context_length"].initial = 2048
        # Scripts that post the form from before load on demand keep the default.
        self.fields["load_timeout_seconds"].required = False
        # Scripts that post the form from before KV cache types keep getting f16.
        self.fields["kv_cache_type"].required = False
        self.fields["serving_mode"].required = False
        # Scripts that post the form from before GPU splits keep one GPU.
        self.fields["split_mode"].required = False

    def clean_kv_cache_type(self) -> str:
        return self.cleaned_data.get("kv_cache_type") or KvCacheType.F16

    def clean_serving_mode(self) -> str:
        return self.cleaned_data.get("serving_mode") or ServingMode.IDENTICAL

    def clean_split_mode(self) -> str:
        return self.cleaned_data.get("split_mode") or SplitMode.NONE

    def clean_load_timeout_seconds(self) -> int:
        value = self.cleaned_data.get("load_timeout_seconds")
        return LOAD_TIMEOUT_DEFAULT if value is None else value

    def validate_unique(self) -> None:
        # Uniqueness is the service's check, with its own message.
        pass


class ScaleForm(forms.Form):
    replicas = forms.IntegerField(min_value=1, max_value=16)


class LoadOnDemandForm(forms.ModelForm):
    """When a deployment unloads for want of requests, and how long a request waits for
    it to load again (the deployment page's admin form)."""

    class Meta:
        model = Deployment
        fields = ["idle_unload_seconds", "load_timeout_seconds"]
