"""What the control plane hands a training worker for one fine-tune (``TrainingOrder``),
and how the worker turns it into a ``TrainSpec`` on its own disk (``prepare``).

The order names every input by sha256 and carries everything else as plain values (the
dataset's format, shape and column mapping, the job's parameters), so a worker needs no
database: it fetches the base model and the dataset files by sha256 (from a shared
artifact store, or over HTTP from the control plane into its cache), checks each hash,
and converts the data to canonical JSON Lines itself, as the control plane would.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from workers import datasets as data
from workers.finetune.spec import TrainSpec

# Reports (see workers.finetune.runner.Report) and artifact fetches, as the caller has them.
Report = Callable[[dict[str, Any]], None]
Fetch = Callable[[str], Path]


@dataclass(frozen=True)
class DataRef:
    """One dataset version, as a worker reads it."""

    sha256: str
    format: str  # workers.datasets.FileFormat
    label: str  # "name vN", for the job's log
    declared_shape: str | None = None
    column_mapping: dict[str, str] = field(default_factory=dict)

    def options(self) -> data.ValidationOptions:
        """How to read it: the same options the control plane validated it with (token
        limits aside, which validation enforced already)."""
        return data.ValidationOptions(
            shape=data.Shape(self.declared_shape) if self.declared_shape else None,
            column_mapping=dict(self.column_mapping),
        )


@dataclass(frozen=True)
class TrainingOrder:
    job_id: int
    attempt: int  # the claim's attempt number; the job's end is reported under it
    base_sha256: str
    base_label: str
    train: DataRef
    shape: str
    params: dict[str, Any]
    validation: DataRef | None = None
    chat_template: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> TrainingOrder:
        raw = dict(raw)
        raw["train"] = DataRef(**raw["train"])
        if raw.get("validation") is not None:
            raw["validation"] = DataRef(**raw["validation"])
        return cls(**raw)


def prepare(
    order: TrainingOrder,
    *,
    fetch: Fetch,
    work_dir: Path,
    cache_dir: Path,
    device: str,
    report: Report,
) -> TrainSpec:
    """The runner's spec: verified inputs on local disk, canonical JSON Lines data.

    Converted files are kept in ``work_dir``, so a retried job on the same worker
    neither fetches nor converts its data again.
    """
    work_dir.mkdir(parents=True, exist_ok=True)
    report({"event": "log", "message": f"Fetching the base model {order.base_label}."})
    base_path = fetch(order.base_sha256)
    paths = {}
    for name, ref in (("train", order.train), ("validation", order.validation)):
        if ref is None:
            continue
        target = work_dir / f"{name}.jsonl"
        if not target.exists():
            report({"event": "log", "message": f"Preparing {ref.label} for training."})
            data.canonical(fetch(ref.sha256), data.FileFormat(ref.format), ref.options(), target)
        paths[name] = target
    return TrainSpec(
        job_id=str(order.job_id),
        base_model_path=base_path,
        base_sha256=order.base_sha256,
        train_path=paths["train"],
        validation_path=paths.get("validation"),
        shape=order.shape,
        work_dir=work_dir,
        cache_dir=cache_dir,
        chat_template=order.chat_template,
        device=device,
        **order.params,
    )
