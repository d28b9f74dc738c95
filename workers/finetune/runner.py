"""The LoRA training loop: a plain torch loop over a transformers model with peft.

A plain loop rather than transformers' Trainer, because what a worker needs is small and
exact: the data order and learning rate are pure functions of the step, so a run that
resumes from a checkpoint continues with the very batches, learning rates and dropout
masks (RNG state) the uninterrupted run would have used; cancellation is checked before
every micro-batch; and progress goes to the caller's ``report`` after every optimizer
step.

Layout of ``work_dir``:

    checkpoints/step-000050/   adapter weights, optimizer state, RNG state, state.json
    adapter/                   the PEFT adapter (adapter_model.safetensors + config)
    adapter.gguf               the same adapter for llama.cpp
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import re
import resource
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from workers.artifacts import file_sha256
from workers.finetune.convert import converted_checkpoint
from workers.finetune.data import IGNORE, DataError, Encoder, Example, collate
from workers.finetune.export import export_gguf_lora
from workers.finetune.spec import FinetuneError, TrainResult, TrainSpec, total_steps
from workers.inference import templates

Report = Callable[[dict[str, Any]], None]
ShouldStop = Callable[[], bool]

KEEP_CHECKPOINTS = 2
MAX_GRAD_NORM = 1.0
_STEP_DIR = re.compile(r"^step-(\d+)$")


@dataclass
class _State:
    """What a checkpoint restores besides tensors."""

    step: int = 0
    losses: list[float] = field(default_factory=list)
    validation_loss: float | None = None
    validation_step: int | None = None


def train(spec: TrainSpec, *, report: Report, should_stop: ShouldStop) -> TrainResult:
    """Fine-tune a LoRA adapter on ``spec``'s data; resume from work_dir's last checkpoint.

    Returns state "succeeded" with the PEFT and GGUF adapters, or "cancelled" (after
    saving a checkpoint) once ``should_stop()`` says so. Raises FinetuneError (DataError
    for bad rows) for problems the job's owner must fix.
    """
    import torch
    import transformers
    from transformers import AutoTokenizer

    started = time.monotonic()

    def log(message: str) -> None:
        report({"event": "log", "message": message})

    device = _device(spec.device)
    transformers.utils.logging.disable_progress_bar()
    base_dir, info = converted_checkpoint(
        spec.base_model_path, spec.base_sha256, spec.cache_dir, log=log
    )
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    examples, dropped, validation = _examples(spec, tokenizer, info)
    rows_per_step = spec.batch_size * spec.gradient_accumulation
    max_steps = total_steps(
        rows=len(examples),
        epochs=spec.epochs,
        max_steps=spec.max_steps,
        rows_per_step=rows_per_step,
    )
    note = f" ({dropped} with nothing to learn within the length dropped)" if dropped else ""
    log(
        f"{len(examples)} training examples{note}, {len(validation)} validation examples; "
        f"{max_steps} steps on {device.type}."
    )
    checkpoints = _Checkpoints(spec.work_dir / "checkpoints", _fingerprint(spec))
    latest = checkpoints.latest()  # refuses another run's checkpoints before loading anything

    log(f"Loading the base model on {device.type}.")
    transformers.set_seed(spec.seed)
    model = _lora_model(spec, base_dir, device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=spec.learning_rate, weight_decay=0.0)

    state, resumed_from, saved_step = _State(), None, None
    if latest is not None:
        state = checkpoints.load(latest, model, optimizer, device)
        resumed_from = saved_step = state.step
        log(f"Resuming from the checkpoint at step {state.step} of {max_steps}.")
    first_loss = state.losses[0] if state.losses else None

    order = _Order(len(examples), spec.seed)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    tokens_run, seconds_run, steps_run = 0, 0.0, 0
    cancelled = False
    model.train()
    while state.step < max_steps:
        if should_stop():
            cancelled = True
            break
        step_started = time.monotonic()
        lr = lr_at(
            state.step,
            base=spec.learning_rate,
            warmup=spec.warmup_steps,
            total=max_steps,
            kind=spec.lr_scheduler,
        )
        for group in optimizer.param_groups:
            group["lr"] = lr
        rows = [examples[i] for i in order.rows(state.step * rows_per_step, rows_per_step)]
        learned = sum(e.learned_tokens for e in rows)
        loss_sum = 0.0
        for k in range(0, len(rows), spec.batch_size):
            if k and should_stop():
                cancelled = True
                break
            micro = rows[k : k + spec.batch_size]
            batch = {key: t.to(device) for key, t in collate(micro, pad_id=pad_id).items()}
            summed, _ = batch_loss(model, batch)
            # A step's loss is the mean over all its learned tokens, whatever the split.
            (summed / learned).backward()
            loss_sum += summed.item()
            tokens_run += int(batch["attention_mask"].sum())
        if cancelled:
            optimizer.zero_grad(set_to_none=True)
            break
        torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        state.step += 1
        state.losses.append(loss_sum / learned)
        if first_loss is None:
            first_loss = state.losses[0]
        steps_run += 1
        seconds_run += time.monotonic() - step_started
        report(
            {
                "event": "progress",
                "step": state.step,
                "max_steps": max_steps,
                "epoch": round(state.step * rows_per_step / len(examples), 4),
                "train_loss": state.losses[-1],
                "learning_rate": lr,
                "tokens_per_s": round(tokens_run / seconds_run, 1),
                "eta_s": round((max_steps - state.step) * seconds_run / steps_run, 1),
            }
        )
        last = state.step == max_steps
        if validation and spec.eval_every and state.step % spec.eval_every == 0 and not last:
            _evaluate_into(state, model, validation, spec, pad_id, device, report, should_stop)
        if state.step % spec.checkpoint_every == 0 and not last:
            checkpoints.save(state, model, optimizer, report)
            saved_step = state.step

    if not cancelled and validation and state.validation_step != state.step:
        cancelled = not _evaluate_into(
            state, model, validation, spec, pad_id, device, report, should_stop
        )
    # The last step is checkpointed too: a worker that dies while exporting resumes here.
    if state.step and saved_step != state.step:
        checkpoints.save(state, model, optimizer, report)

    peft_dir, gguf_path = None, None
    if state.step:
        peft_dir = _save_adapter(model, spec.work_dir / "adapter")
    if not cancelled:
        log("Writing the GGUF adapter for llama.cpp.")
        gguf_path = export_gguf_lora(
            peft_dir, base_gguf_path=spec.base_model_path, out_path=spec.work_dir / "adapter.gguf"
        )
    tail = state.losses[-10:]
    return TrainResult(
        state="cancelled" if cancelled else "succeeded",
        peft_dir=peft_dir,
        gguf_path=gguf_path,
        steps=state.step,
        max_steps=max_steps,
        epochs_done=round(state.step * rows_per_step / len(examples), 4),
        final_train_loss=sum(tail) / len(tail) if tail else None,
        final_validation_loss=state.validation_loss,
        duration_s=round(time.monotonic() - started, 1),
        tokens_per_s=round(tokens_run / seconds_run, 1) if seconds_run else 0.0,
        library_versions=library_versions(),
        hardware=_hardware(device),
        resumed_from_step=resumed_from,
        first_step_loss=first_loss,
        train_examples=len(examples),
        dropped_examples=dropped,
    )


def _examples(spec: TrainSpec, tokenizer, info: dict) -> tuple[list, int, list]:
    """(training examples, rows dropped, validation examples)."""
    template = templates.choose(
        override=spec.chat_template or "",
        gguf_template=info.get("chat_template"),
        architecture=info["architecture"],
    )
    encoder = Encoder(
        tokenizer,
        template=template.template if template else None,
        max_seq_length=spec.max_seq_length,
    )
    examples, dropped = encoder.encode_file(spec.train_path, spec.shape)
    if not examples:
        raise DataError(
            "No training row has anything left to learn within the maximum sequence length."
        )
    validation: list[Example] = []
    if spec.validation_path is not None:
        validation, _ = encoder.encode_file(spec.validation_path, spec.shape)
    return examples, dropped, validation


def _lora_model(spec: TrainSpec, base_dir: Path, device):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    lora = LoraConfig(
        r=spec.lora_rank,
        lora_alpha=spec.lora_alpha,
        lora_dropout=spec.lora_dropout,
        target_modules=list(spec.target_modules),
        task_type="CAUSAL_LM",
    )
    with warnings.catch_warnings():
        # peft 0.21 calls a transformers 5 method that is deprecated; not ours to fix.
        warnings.filterwarnings("ignore", "`is_gradient_checkpointing`", FutureWarning)
        model = get_peft_model(model, lora)
    # The adapter's base is an artifact, named by content rather than a local path.
    model.peft_config["default"].base_model_name_or_path = f"sha256:{spec.base_sha256}"
    return model.to(device)


def batch_loss(model, batch: dict[str, Any]) -> tuple[Any, int]:
    """(summed cross-entropy over the batch's learned tokens, their count).

    The same loss as transformers' own, computed for less: the vocabulary projection
    (for Gemma 3 270M a 262k x 640 matrix, most of the model's arithmetic) runs only at
    positions whose next token is learned, so a chat row's masked prompt costs the
    layers but not the head.
    """
    import torch.nn.functional as F

    targets = batch["labels"][:, 1:]  # position t predicts token t + 1
    keep = (targets != IGNORE).any(dim=0).nonzero().squeeze(1)
    logits = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        logits_to_keep=keep,
        use_cache=False,
    ).logits
    wanted = targets[:, keep]
    summed = F.cross_entropy(
        logits.float().flatten(0, 1), wanted.flatten(), ignore_index=IGNORE, reduction="sum"
    )
    return summed, int((wanted != IGNORE).sum())


def lr_at(step: int, *, base: float, warmup: int, total: int, kind: str) -> float:
    """The learning rate for the optimizer step with 0-based index ``step``.

    Warm-up rises linearly to ``base`` over ``warmup`` steps (the first step already
    learns: no step runs at zero); then linear and cosine decay towards 0 at ``total``.
    """
    if step < warmup:
        return base * (step + 1) / warmup
    if kind == "constant":
        return base
    progress = (step - warmup) / max(1, total - warmup)
    if kind == "cosine":
        return base * 0.5 * (1 + math.cos(math.pi * progress))
    return base * (1 - progress)


class _Order:
    """Which example each row slot of the run takes: a fresh seeded shuffle per epoch,
    so the rows of any step follow from the step alone (resume needs no sampler state)."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed = n, seed
        self._perms: dict[int, list[int]] = {}

    def rows(self, start: int, count: int) -> list[int]:
        import torch

        out = []
        for k in range(start, start + count):
            epoch, pos = divmod(k, self.n)
            if epoch not in self._perms:
                self._perms = {e: p for e, p in self._perms.items() if e >= epoch - 1}
                generator = torch.Generator().manual_seed(self.seed + epoch)
                self._perms[epoch] = torch.randperm(self.n, generator=generator).tolist()
            out.append(self._perms[epoch][pos])
        return out


def _evaluate_into(state, model, examples, spec, pad_id, device, report, should_stop) -> bool:
    """Mean loss over the validation set's learned tokens; False if stopped meanwhile."""
    import torch

    model.eval()
    total, count = 0.0, 0
    try:
        with torch.no_grad():
            for i in range(0, len(examples), spec.batch_size):
                if should_stop():
                    return False
                micro = examples[i : i + spec.batch_size]
                batch = {key: t.to(device) for key, t in collate(micro, pad_id=pad_id).items()}
                summed, n = batch_loss(model, batch)
                total += summed.item()
                count += n
    finally:
        model.train()
    state.validation_loss, state.validation_step = total / count, state.step
    report({"event": "eval", "step": state.step, "validation_loss": state.validation_loss})
    return True


class _Checkpoints:
    def __init__(self, root: Path, fingerprint: str) -> None:
        self.root = root
        self.fingerprint = fingerprint

    def _existing(self) -> list[tuple[int, Path]]:
        if not self.root.is_dir():
            return []
        found = []
        for path in self.root.iterdir():
            match = _STEP_DIR.match(path.name)
            if match and (path / "state.json").is_file():
                found.append((int(match[1]), path))
        return sorted(found)

    def save(self, state: _State, model, optimizer, report: Report) -> Path:
        import torch
        from peft import get_peft_model_state_dict
        from safetensors.torch import save_file

        self.root.mkdir(parents=True, exist_ok=True)
        final = self.root / f"step-{state.step:06d}"
        tmp = Path(tempfile.mkdtemp(prefix=".step-", dir=self.root))
        try:
            # The embeddings are never adapted: skip peft's check of the base's vocabulary.
            weights = get_peft_model_state_dict(model, save_embedding_layers=False)
            save_file(
                {k: v.detach().to("cpu").contiguous() for k, v in weights.items()},
                tmp / "adapter_model.safetensors",
            )
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
            rng = {"cpu": torch.get_rng_state()}
            if torch.cuda.is_available():
                rng["cuda"] = torch.cuda.get_rng_state_all()
            torch.save(rng, tmp / "rng.pt")
            (tmp / "state.json").write_text(
                json.dumps({"fingerprint": self.fingerprint, **state.__dict__})
            )
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        for _, old in self._existing()[:-KEEP_CHECKPOINTS]:
            shutil.rmtree(old, ignore_errors=True)
        report({"event": "checkpoint", "step": state.step, "path": str(final)})
        return final

    def latest(self) -> Path | None:
        """The newest complete checkpoint of this run, if any."""
        existing = self._existing()
        if not existing:
            return None
        path = existing[-1][1]
        saved = json.loads((path / "state.json").read_text())
        if saved.get("fingerprint") != self.fingerprint:
            raise FinetuneError(
                f"{self.root} holds checkpoints of a run with other parameters or data; "
                "use a new work directory."
            )
        return path

    def load(self, path: Path, model, optimizer, device) -> _State:
        import torch
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        saved = json.loads((path / "state.json").read_text())
        del saved["fingerprint"]
        set_peft_model_state_dict(model, load_file(path / "adapter_model.safetensors"))
        optimizer.load_state_dict(
            torch.load(path / "optimizer.pt", map_location=device, weights_only=True)
        )
        rng = torch.load(path / "rng.pt", weights_only=True)
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        return _State(**saved)


def _fingerprint(spec: TrainSpec) -> str:
    """What must match for a checkpoint to continue this run."""
    described = spec.as_dict()
    # Where files live and how often to save or evaluate do not change the result.
    for key in (
        "job_id",
        "base_model_path",
        "train_path",
        "validation_path",
        "work_dir",
        "cache_dir",
        "checkpoint_every",
        "eval_every",
        "device",
    ):
        del described[key]
    described["train"] = file_sha256(spec.train_path)
    if spec.validation_path is not None:
        described["validation"] = file_sha256(spec.validation_path)
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()


def _save_adapter(model, out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".adapter-", dir=out.parent))
    try:
        model.save_pretrained(tmp, save_embedding_layers=False)
        # peft writes a model card template; the job's record says more, and exactly.
        (tmp / "README.md").unlink(missing_ok=True)
        tmp.chmod(0o755)
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _device(choice: str):
    import torch

    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise FinetuneError("The job asks for a GPU (cuda), and this worker has none.")
        return torch.device("cuda")
    return torch.device("cpu")


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in ("torch", "transformers", "peft", "safetensors", "gguf"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = ""
    return versions


def _hardware(device) -> dict[str, Any]:
    import torch

    from workers.hardware import inventory

    inv = inventory().as_dict()
    described: dict[str, Any] = {
        "device": device.type,
        "cpu_model": inv["cpu_model"],
        "cpu_cores": inv["cpu_cores"],
        "ram_total_mib": inv["ram_total_mib"],
        "torch_threads": torch.get_num_threads(),
        "gpus": inv["gpus"],
        # Linux reports the peak resident set in KiB.
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024,
    }
    if device.type == "cuda":
        described["gpu_name"] = torch.cuda.get_device_name(device)
        described["peak_gpu_memory_mib"] = torch.cuda.max_memory_allocated(device) // (1 << 20)
    return described
