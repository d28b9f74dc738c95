"""What a fine-tune job is given (TrainSpec), what it returns (TrainResult), and the cheap
parameter checks a control plane runs before it queues one (check_params).

Nothing here loads a model or imports torch: check_params runs in a web request.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SHAPES = ("chat", "instruction", "prompt_completion", "text")
LR_SCHEDULERS = ("linear", "cosine", "constant")
DEVICES = ("auto", "cpu", "cuda")

# Architectures whose Hugging Face layout (llama-style q/k/v/o and gate/up/down
# projections) transformers can load from a GGUF, and whose llama.cpp conversion
# leaves those projection weights as they are (no q/k permutation as for "llama"),
# so a PEFT adapter exports to GGUF tensor by tensor. Gemma 3 is the one tested.
SUPPORTED_ARCHITECTURES = ("gemma", "gemma2", "gemma3", "qwen2", "qwen3")

# Where each LoRA-able projection lives in the Hugging Face model; leaf names are what
# a spec's target_modules lists.
HF_MODULE_PATHS = {
    "q_proj": "model.layers.{bid}.self_attn.q_proj",
    "k_proj": "model.layers.{bid}.self_attn.k_proj",
    "v_proj": "model.layers.{bid}.self_attn.v_proj",
    "o_proj": "model.layers.{bid}.self_attn.o_proj",
    "gate_proj": "model.layers.{bid}.mlp.gate_proj",
    "up_proj": "model.layers.{bid}.mlp.up_proj",
    "down_proj": "model.layers.{bid}.mlp.down_proj",
}

# Bounds a request must stay within. Wide enough for real use; they catch typos
# (a learning rate of 2 instead of 2e-4) before a GPU hour is spent on them.
MAX_RANK = 256
MAX_ALPHA = 1024.0
MAX_LEARNING_RATE = 1e-1
MAX_BATCH_SIZE = 256
MAX_GRADIENT_ACCUMULATION = 1024
MIN_SEQ_LENGTH = 16
MAX_EPOCHS = 100
MAX_STEPS = 1_000_000


class ParamError(ValueError):
    """The parameters cannot be trained as given; ``messages`` says why, one line each."""

    def __init__(self, messages: list[str]) -> None:
        super().__init__(" ".join(messages))
        self.messages = messages


class FinetuneError(Exception):
    """A job that cannot go on (bad data, wrong device, mismatched checkpoints): the
    message is meant for the person who started it."""


@dataclass
class TrainSpec:
    job_id: str
    base_model_path: Path
    base_sha256: str
    train_path: Path
    shape: str
    work_dir: Path
    cache_dir: Path
    validation_path: Path | None = None
    # Jinja chat template; None takes the GGUF's own, else the architecture's default
    # (workers.inference.templates), the same precedence serving uses.
    chat_template: str | None = None
    lora_rank: int = 8
    lora_alpha: float = 16
    lora_dropout: float = 0.05
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    learning_rate: float = 2e-4
    lr_scheduler: str = "linear"
    warmup_steps: int = 0
    epochs: float | None = 1
    max_steps: int | None = None  # when set, it wins over epochs
    batch_size: int = 1
    gradient_accumulation: int = 1
    max_seq_length: int = 512
    seed: int = 42
    checkpoint_every: int = 50
    eval_every: int | None = None
    device: str = "auto"

    def __post_init__(self) -> None:
        # Specs arrive as JSON through Celery: accept strings and lists.
        for name in ("base_model_path", "train_path", "work_dir", "cache_dir"):
            setattr(self, name, Path(getattr(self, name)))
        if self.validation_path is not None:
            self.validation_path = Path(self.validation_path)
        self.target_modules = tuple(self.target_modules)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready (paths as strings), the inverse of ``TrainSpec(**d)``."""
        return {
            key: str(value)
            if isinstance(value, Path)
            else list(value)
            if isinstance(value, tuple)
            else value
            for key, value in dataclasses.asdict(self).items()
        }


@dataclass
class TrainResult:
    state: str  # "succeeded" or "cancelled"
    peft_dir: Path | None  # adapter_model.safetensors + adapter_config.json
    gguf_path: Path | None  # the llama.cpp LoRA adapter; None when cancelled
    steps: int
    max_steps: int
    epochs_done: float
    final_train_loss: float | None  # mean of the last (up to) 10 steps' losses
    final_validation_loss: float | None
    duration_s: float
    tokens_per_s: float
    library_versions: dict[str, str] = field(default_factory=dict)
    hardware: dict[str, Any] = field(default_factory=dict)
    resumed_from_step: int | None = None
    first_step_loss: float | None = None
    train_examples: int = 0
    # Rows with nothing left to learn once truncated to max_seq_length.
    dropped_examples: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            key: str(value) if isinstance(value, Path) else value
            for key, value in dataclasses.asdict(self).items()
        }


def valid_target_modules(architecture: str) -> list[str]:
    """The projections of ``architecture`` that llama.cpp can apply a LoRA to, named as
    in the Hugging Face model (learned from the gguf package's tensor map)."""
    import gguf

    arch = _gguf_arch(architecture)
    if arch is None or architecture not in SUPPORTED_ARCHITECTURES:
        return []
    names = gguf.TensorNameMap(arch, 1)
    return [
        leaf
        for leaf, path in HF_MODULE_PATHS.items()
        if names.get_name(path.format(bid=0) + ".weight", try_suffixes=(".weight",))
    ]


def _gguf_arch(architecture: str):
    import gguf

    return {name: arch for arch, name in gguf.MODEL_ARCH_NAMES.items()}.get(architecture)


def total_steps(
    *, rows: int, epochs: float | None, max_steps: int | None, rows_per_step: int
) -> int:
    if max_steps:
        return max_steps
    return max(1, math.ceil((epochs or 0) * rows / rows_per_step))


def check_params(spec: TrainSpec, *, model_info: dict[str, Any]) -> None:
    """Raise ParamError listing every problem with the spec for this base model.

    ``model_info`` is the base GGUF's metadata (workers.gguf_meta ``as_dict()``). Cheap:
    reads no files and loads no model.
    """
    errors: list[str] = []
    arch = str(model_info.get("architecture") or "")
    if model_info.get("gguf_type", "model") != "model":
        errors.append("The base must be a model, not an adapter.")
    if arch not in SUPPORTED_ARCHITECTURES:
        errors.append(
            f"Fine-tuning does not support the architecture '{arch}' yet; supported: "
            f"{', '.join(SUPPORTED_ARCHITECTURES)}."
        )
    else:
        valid = valid_target_modules(arch)
        unknown = [m for m in spec.target_modules if m not in valid]
        if not spec.target_modules:
            errors.append(f"Choose at least one target module: {', '.join(valid)}.")
        elif unknown:
            errors.append(
                f"Unknown target module{'s' if len(unknown) > 1 else ''} for {arch}: "
                f"{', '.join(unknown)}. Valid: {', '.join(valid)}."
            )
    if spec.shape not in SHAPES:
        errors.append(f"Unknown dataset shape '{spec.shape}'; one of {', '.join(SHAPES)}.")
    if not _int_in(spec.lora_rank, 1, MAX_RANK):
        errors.append(
            f"LoRA rank must be a whole number from 1 to {MAX_RANK} (got {spec.lora_rank})."
        )
    if not _number_in(spec.lora_alpha, 0, MAX_ALPHA) or spec.lora_alpha <= 0:
        errors.append(
            f"LoRA alpha must be above 0 and at most {MAX_ALPHA:g} (got {spec.lora_alpha})."
        )
    if not _number_in(spec.lora_dropout, 0, 1) or spec.lora_dropout >= 1:
        errors.append(
            f"LoRA dropout must be from 0 up to (not including) 1 (got {spec.lora_dropout})."
        )
    if not _number_in(spec.learning_rate, 0, MAX_LEARNING_RATE) or spec.learning_rate <= 0:
        errors.append(
            f"Learning rate must be above 0 and at most {MAX_LEARNING_RATE:g} "
            f"(got {spec.learning_rate}); 1e-4 to 3e-4 is usual for LoRA."
        )
    if spec.lr_scheduler not in LR_SCHEDULERS:
        errors.append(
            f"Unknown learning-rate schedule '{spec.lr_scheduler}'; "
            f"one of {', '.join(LR_SCHEDULERS)}."
        )
    if not _int_in(spec.batch_size, 1, MAX_BATCH_SIZE):
        errors.append(f"Batch size must be from 1 to {MAX_BATCH_SIZE} (got {spec.batch_size}).")
    if not _int_in(spec.gradient_accumulation, 1, MAX_GRADIENT_ACCUMULATION):
        errors.append(
            f"Gradient accumulation must be from 1 to {MAX_GRADIENT_ACCUMULATION} "
            f"(got {spec.gradient_accumulation})."
        )
    context = model_info.get("context_length")
    upper = int(context) if context else None
    if not _int_in(spec.max_seq_length, MIN_SEQ_LENGTH, upper or 1 << 20):
        limit = f"the model's context length of {upper}" if upper else "the model's context"
        errors.append(
            f"Max sequence length must be from {MIN_SEQ_LENGTH} to {limit} tokens "
            f"(got {spec.max_seq_length})."
        )
    if spec.max_steps is None and not spec.epochs:
        errors.append("Set the number of epochs or a maximum number of steps.")
    if spec.max_steps is not None and not _int_in(spec.max_steps, 1, MAX_STEPS):
        errors.append(f"Max steps must be from 1 to {MAX_STEPS:,} (got {spec.max_steps}).")
    if (
        spec.epochs is not None
        and spec.max_steps is None
        and (not _number_in(spec.epochs, 0, MAX_EPOCHS) or spec.epochs <= 0)
    ):
        errors.append(f"Epochs must be above 0 and at most {MAX_EPOCHS} (got {spec.epochs}).")
    if not _int_in(spec.warmup_steps, 0, MAX_STEPS):
        errors.append(f"Warm-up steps must be 0 or more (got {spec.warmup_steps}).")
    elif spec.max_steps and spec.warmup_steps >= spec.max_steps:
        errors.append(
            f"Warm-up ({spec.warmup_steps} steps) must be shorter than the run "
            f"({spec.max_steps} steps)."
        )
    if not _int_in(spec.checkpoint_every, 1, MAX_STEPS):
        errors.append(f"Checkpoint interval must be 1 step or more (got {spec.checkpoint_every}).")
    if spec.eval_every is not None:
        if not _int_in(spec.eval_every, 1, MAX_STEPS):
            errors.append(f"Evaluation interval must be 1 step or more (got {spec.eval_every}).")
        elif spec.validation_path is None:
            errors.append("An evaluation interval needs a validation set.")
    if spec.device not in DEVICES:
        errors.append(f"Unknown device '{spec.device}'; one of {', '.join(DEVICES)}.")
    if errors:
        raise ParamError(errors)


def _int_in(value: Any, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def _number_in(value: Any, low: float, high: float) -> bool:
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and low <= value <= high
    )
