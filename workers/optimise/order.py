"""What the control plane hands a worker for one optimise job (``ModelJobOrder``,
``EvaluationOrder``), and the job itself on the worker's disk (``make_model_file``,
``evaluate``): written once for a worker with the database and one without.

An order names every input by sha256 (source model, adapter, reference model, the
evaluation's or the importance matrix's dataset) and carries everything else as plain
values, so a worker needs no database: it fetches each input by sha256 (from the shared
artifact store, or over HTTP from the control plane into its cache), checks its hash,
and converts the data to canonical JSON Lines itself, as the control plane would.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from workers import datasets as data
from workers.finetune.order import DataRef

Fetch = Callable[[str], Path]
Progress = Callable[[int, int, str], None]

# The two kinds of job, as the internal endpoints name them.
JOBS = "jobs"  # quantise and export: a ModelJobOrder
EVALUATIONS = "evaluations"  # an EvaluationOrder
# The file a quantise or export job sends back, by the name the control plane takes.
OUTPUT_FILE = "model.gguf"
# An evaluation's figures: the columns of its row, each a number or None.
FIGURES = (
    "perplexity",
    "perplexity_uncertainty",
    "kl_divergence",
    "kl_uncertainty",
    "top_token_agreement",
    "exact_match",
    "contains",
    "tokens_per_s",
)


def _data_ref(raw: dict[str, Any] | None) -> DataRef | None:
    return DataRef(**raw) if raw is not None else None


@dataclass(frozen=True)
class ModelJobOrder:
    """A quantisation of a model file, or its export at F16/BF16 with an adapter merged
    in or not."""

    job_id: int
    operation: str  # apps.optimise.models.Operation: "quantize" or "export"
    source_sha256: str
    source_label: str
    source_quantization: str
    source_parameter_count: int
    params: dict[str, Any]
    adapter_sha256: str | None = None
    imatrix: DataRef | None = None  # text whose activations weigh the rounding

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ModelJobOrder:
        return cls(**{**raw, "imatrix": _data_ref(raw.get("imatrix"))})

    @property
    def inputs(self) -> set[str]:
        """The sha256 of every file the job reads."""
        wanted = {self.source_sha256, self.adapter_sha256}
        if self.imatrix is not None:
            wanted.add(self.imatrix.sha256)
        return {sha256 for sha256 in wanted if sha256}


@dataclass(frozen=True)
class EvaluationOrder:
    """A model file (with an adapter or not) measured on a dataset: a perplexity (and the
    KL divergence from a reference model), or a task score."""

    job_id: int
    model_sha256: str
    model_label: str
    architecture: str
    dataset: DataRef
    shape: str  # the dataset's detected shape
    params: dict[str, Any]  # metric, n_ctx, max_chunks, max_items
    adapter_sha256: str | None = None
    reference_sha256: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> EvaluationOrder:
        return cls(**{**raw, "dataset": DataRef(**raw["dataset"])})

    @property
    def inputs(self) -> set[str]:
        """The sha256 of every file the job reads."""
        wanted = {self.model_sha256, self.adapter_sha256, self.reference_sha256}
        return {sha256 for sha256 in wanted | {self.dataset.sha256} if sha256}


def _rows(ref: DataRef, fetch: Fetch, work: Path, name: str) -> list[dict[str, Any]]:
    """The dataset's valid rows, converted in ``work`` from the verified file."""
    from workers.finetune.data import read_rows

    target = work / f"{name}.jsonl"
    if not target.exists():
        data.canonical(fetch(ref.sha256), data.FileFormat(ref.format), ref.options(), target)
    return [row for _, row in read_rows(target)]


def make_model_file(
    order: ModelJobOrder, *, fetch: Fetch, work: Path, progress: Progress
) -> tuple[Path, dict[str, Any]]:
    """Quantise or export the order's source into ``work``; returns the new GGUF file and
    the job's result (timings, sizes, the llama.cpp build, the importance matrix's
    summary)."""
    from workers.optimise.quantize import llama_cpp_build, quantize

    source_path = fetch(order.source_sha256)
    out = work / OUTPUT_FILE
    imatrix = None
    if order.operation == "quantize":
        if order.imatrix is not None:
            imatrix = _importance(order.imatrix, order.params, source_path, fetch, work, progress)
            reading = progress

            def progress(done: int, total: int, message: str) -> None:
                reading(total + done, 2 * total, message)  # the bar's second half

        done = quantize(
            source_path,
            out,
            quant_type=order.params["quant_type"],
            source_file_type=order.source_quantization,
            parameter_count=order.source_parameter_count,
            allow_requantize=order.params.get("allow_requantize", False),
            imatrix=imatrix.matrix if imatrix else None,
            progress=progress,
        )
    else:
        from workers.optimise.merge import export_model

        done = export_model(
            source_path,
            out,
            adapter_path=fetch(order.adapter_sha256) if order.adapter_sha256 else None,
            adapter_scale=order.params.get("adapter_scale") or 1.0,
            out_type=order.params["out_type"],
            progress=progress,
        )
    result = {**done.as_dict(), "llama_cpp": llama_cpp_build()}
    result.pop("out_path", None)
    if imatrix is not None:
        result["imatrix"] = imatrix.summary()
    return out, result


def _importance(
    text: DataRef,
    params: dict[str, Any],
    source_path: Path,
    fetch: Fetch,
    work: Path,
    progress: Progress,
):
    """The importance matrix of the source on ``text`` (the first half of the bar)."""
    from workers.optimise.evaluate import text_of
    from workers.optimise.imatrix import compute_imatrix

    return compute_imatrix(
        source_path,
        text_of(_rows(text, fetch, work, "imatrix")),
        n_ctx=params["imatrix_n_ctx"],
        max_chunks=params["imatrix_chunks"],
        progress=lambda done, total, message: progress(done, 2 * total, message),
    )


def evaluate(
    order: EvaluationOrder, *, fetch: Fetch, work: Path, progress: Progress
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Measure the order's model on its dataset; returns the figures (``FIGURES``) and
    the rest of the result (counts, examples, timings, hardware)."""
    from workers.optimise import evaluate as ev
    from workers.setups.trial import fingerprint

    model_path = fetch(order.model_sha256)
    adapter_path = fetch(order.adapter_sha256) if order.adapter_sha256 else None
    rows = _rows(order.dataset, fetch, work, "rows")
    params = order.params
    if params["metric"] == "perplexity":
        done = ev.perplexity(
            model_path,
            ev.text_of(rows),
            n_ctx=params["n_ctx"],
            adapter_path=adapter_path,
            reference_path=fetch(order.reference_sha256) if order.reference_sha256 else None,
            max_chunks=params["max_chunks"],
            progress=progress,
        )
        result = done.as_dict()
        figures = {
            "perplexity": result.get("perplexity"),
            "perplexity_uncertainty": result.get("uncertainty"),
            "kl_divergence": result.get("kl_divergence"),
            "kl_uncertainty": result.get("kl_divergence_uncertainty"),
            "top_token_agreement": result.get("same_top"),
            "tokens_per_s": result.get("tokens_per_s"),
        }
    else:
        items = ev.task_items(rows[: params["max_items"]], order.shape)
        done = ev.task_score(
            model_path,
            items,
            template=None,
            architecture=order.architecture,
            adapter_path=adapter_path,
            progress=progress,
        )
        result = done.as_dict()
        seconds = result.get("seconds") or 0
        figures = {
            "exact_match": result.get("exact"),
            "contains": result.get("contains"),
            "tokens_per_s": result["generated_tokens"] / seconds if seconds else None,
        }
    return figures, {**result, "hardware": fingerprint(), "rows": len(rows)}
