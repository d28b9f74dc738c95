"""LoRA fine-tuning of a GGUF base model: plain Python (torch, transformers, peft), no Django.

A Celery task (apps/finetune) builds a TrainSpec from a job row, runs ``check_params``
before queueing and ``train`` on a worker, and stores the TrainResult's adapters as
artifacts. ``train`` reports progress through a callback and polls ``should_stop`` so
the task can relay both through Redis.
"""

from workers.finetune.data import DataError
from workers.finetune.export import export_gguf_lora
from workers.finetune.runner import library_versions, lr_at, train
from workers.finetune.spec import (
    FinetuneError,
    ParamError,
    TrainResult,
    TrainSpec,
    check_params,
    valid_target_modules,
)

__all__ = [
    "DataError",
    "FinetuneError",
    "ParamError",
    "TrainResult",
    "TrainSpec",
    "check_params",
    "export_gguf_lora",
    "library_versions",
    "lr_at",
    "train",
    "valid_target_modules",
]
