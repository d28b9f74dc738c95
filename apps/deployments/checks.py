"""What must hold before a model runs as a deployment: an approved GGUF model whose file
verifies and whose licence allows it, a LoRA adapter made for it, settings it takes, and
worker labels some worker could have. Deployments, setups and trials all ask here before
they load anything."""

from __future__ import annotations

from typing import Any

from django.core.exceptions import ValidationError

from apps.deployments.models import KvCacheType, SplitMode, labels_validator
from apps.registry.models import Format, ModelVersion
from apps.registry.models import State as VersionState
from apps.registry.services import model_version_deploy_check
from workers.labels import labels_match


def deployable_check(version: ModelVersion) -> None:
    """Raise ValidationError unless ``version`` is an approved GGUF model that may run."""
    if version.format != Format.GGUF_MODEL:
        raise ValidationError(f"Only GGUF models can be deployed; {version} is a {version.format}.")
    if version.state != VersionState.APPROVED:
        raise ValidationError(
            f"{version} is {version.get_state_display().lower()}: only approved versions "
            "can be deployed."
        )
    # Its stored file must still verify, and its licence be allowed (or overridden).
    model_version_deploy_check(version=version)


def _check_adapter(version: ModelVersion, adapter: ModelVersion | None) -> None:
    """An adapter must be an approved GGUF LoRA made for this model."""
    if adapter is None:
        return
    if adapter.format != Format.GGUF_LORA:
        raise ValidationError(f"{adapter} is not a GGUF LoRA adapter (it is a {adapter.format}).")
    if adapter.state != VersionState.APPROVED:
        raise ValidationError(
            f"The adapter {adapter} is {adapter.get_state_display().lower()}: only approved "
            "adapters can be deployed."
        )
    model_version_deploy_check(version=adapter)
    parents = list(adapter.parents.all())
    if parents and version not in parents:
        names = ", ".join(str(p) for p in parents)
        raise ValidationError(f"The adapter {adapter} was trained on {names}, not on {version}.")
    if adapter.architecture and adapter.architecture != version.architecture:
        raise ValidationError(
            f"The adapter is for {adapter.architecture} models; {version} is "
            f"{version.architecture}."
        )


def _check_labels(values: dict[str, Any]) -> None:
    """Wanted and unwanted worker labels: well formed, and not excluding every worker
    that has the wanted ones (``gpu`` wanted and ``gpu`` unwanted)."""
    for field in ("placement_labels", "exclude_labels"):
        try:
            labels_validator(values.get(field, []))
        except ValidationError as exc:
            raise ValidationError({field: exc.messages}) from exc
    wanted, unwanted = values.get("placement_labels", []), values.get("exclude_labels", [])
    # The barest worker with every wanted label: if even it is excluded, every one is.
    if wanted and not labels_match(wanted, wanted=wanted, unwanted=unwanted):
        raise ValidationError(
            {
                "exclude_labels": f"Excluding {', '.join(unwanted)} rules out every worker "
                f"with {', '.join(wanted)}: no worker could match."
            }
        )


def _check_split(values: dict[str, Any]) -> None:
    """Tensor split proportions only with a split over a worker's GPUs, and such a split
    not pinned to one GPU."""
    split_mode = values.get("split_mode", SplitMode.NONE)
    if values.get("tensor_split") and split_mode == SplitMode.NONE:
        raise ValidationError(
            {
                "tensor_split": "Proportions share a model out over a worker's GPUs: choose "
                "the layer or row split mode, or leave them empty to run on one GPU."
            }
        )
    if split_mode != SplitMode.NONE and values.get("placement_gpu") is not None:
        raise ValidationError(
            {
                "placement_gpu": f"A {split_mode} split runs on all of a worker's GPUs: leave "
                "the GPU empty, or choose split mode none to run on this GPU alone."
            }
        )


def _check_settings(version: ModelVersion, values: dict[str, Any]) -> None:
    _check_adapter(version, values.get("adapter"))
    _check_labels(values)
    _check_split(values)
    kv_type = values.get("kv_cache_type", KvCacheType.F16)
    if kv_type != KvCacheType.F16 and not values.get("flash_attention", True):
        raise ValidationError(
            {
                "kv_cache_type": f"A {kv_type} KV cache needs flash attention on (llama.cpp "
                "stores a quantised V cache only for its fused attention)."
            }
        )
    limit = version.context_length
    if limit and values.get("context_length", 0) > limit:
        raise ValidationError(
            {
                "context_length": f"The context length {values['context_length']} is above "
                f"the model's {limit} tokens."
            }
        )


def deployment_values_check(*, version: ModelVersion, values: dict[str, Any]) -> None:
    """Raise ValidationError unless these settings suit ``version`` (a fitting adapter, a
    context the model takes, a KV cache type its attention supports, a GPU split that
    says where it goes)."""
    _check_settings(version, values)


def deployment_settings_check(*, version: ModelVersion, values: dict[str, Any]) -> None:
    """Raise ValidationError unless ``version`` may run with these settings: an approved
    GGUF model whose file verifies and whose licence is allowed, a fitting adapter, a
    context the model takes. Setups and trials ask before they load anything."""
    deployable_check(version)
    _check_settings(version, values)
