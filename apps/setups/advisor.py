"""The advisor: from a use case, a response experience and the workers at hand to ranked
candidate setups built from the registry's approved models.

Each candidate carries its settings with the reason for each in plain words, whether it
fits on each worker (memory needed against free, from the heartbeats), and the speed to
expect: measured by a trial of the same setup on the same class of hardware where one
exists, scaled from another trial on that hardware, or otherwise estimated from the
worker's own probe of its memory bandwidth and matrix throughput, labelled as such.

Pure functions over plain inputs (versions, worker statuses, trials), so the page, the
API and bench/setups.py ask the same question the same way.

Over 400 lines on purpose: each setting's rule and its reason in words sit together,
so the ranking reads as one argument.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from apps.deployments.memory import MIB, memory_estimate
from apps.deployments.models import (
    RUNTIME_FIELDS,
    Deployment,
    KvCacheType,
    Preset,
    ServingMode,
    SplitMode,
)
from apps.deployments.placement import worker_options
from apps.deployments.selectors import WorkerStatus
from apps.registry.models import ModelVersion
from apps.setups.models import Experience, Trial, UseCase
from workers.hardware import hardware_class
from workers.inference.templates import ARCHITECTURE_DEFAULTS

# Architectures trained to produce sentence embeddings (llama.cpp names). A chat model's
# mean-pooled hidden states rank search results poorly, so search wants one of these.
EMBEDDING_ARCHITECTURES = frozenset(
    {
        "bert",
        "nomic-bert",
        "nomic-bert-moe",
        "jina-bert-v2",
        "jina-bert-v3",
        "t5encoder",
        "modern-bert",
        "neo-bert",
        "gemma-embedding",
    }
)
# Below this many tokens of context a model cannot take a long document.
LONG_DOCUMENT_MIN_CONTEXT = 16_384
# Prompt length the estimates assume for time to first token (a trial's short prompt).
SHORT_PROMPT_TOKENS = 32

# How much of the probed bandwidth and throughput llama.cpp reaches, fitted to trials of
# the bundled model on a 2-core x86 VM (docs/setups.md, "The advisor"); bench/setups.py
# prints how far the resulting estimates land from measurements on any box. Prompt
# reading gets a third of the float32 GEMM probe (dequantising as it multiplies).
DECODE_BANDWIDTH_EFFICIENCY = 0.85
PROMPT_FLOPS_EFFICIENCY = 0.33
# Fixed cost before the first token of any request (queueing, scheduling, sampling).
FIRST_TOKEN_OVERHEAD_MS = 5.0


@dataclass(frozen=True)
class Fit:
    """Whether a setup fits on a worker: the memory it needs against what is free on the
    device with the least to spare (a GPU it offloads to, or the worker's RAM)."""

    worker: str
    gpu_index: int | None  # where it runs: a GPU (the first of a split), None for the CPU
    needed_bytes: int
    free_bytes: int
    # The device counted when it runs on GPUs: "GPU <index>" (one of a split), or "RAM"
    # for the layers a partial offload leaves on the CPU. Empty: its own GPU, or RAM.
    device: str = ""

    @property
    def fits(self) -> bool:
        return self.needed_bytes <= self.free_bytes

    @property
    def where(self) -> str:
        if self.device == "RAM":
            return f"{self.worker} (its RAM)"
        if self.device:
            return f"{self.worker} {self.device}"
        return self.worker + (f" GPU {self.gpu_index}" if self.gpu_index is not None else "")

    def as_dict(self) -> dict[str, Any]:
        return {
            "worker": self.worker,
            "gpu_index": self.gpu_index,
            "needed_bytes": self.needed_bytes,
            "free_bytes": self.free_bytes,
            "fits": self.fits,
        }


@dataclass(frozen=True)
class Expected:
    """Speed to expect on one worker, and where the figures come from."""

    decode_tps: float
    ttft_ms: float
    basis: str  # "measured", "scaled" or "estimate"
    note: str
    trial_id: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "decode_tps": round(self.decode_tps, 1),
            "ttft_ms": round(self.ttft_ms, 1),
            "basis": self.basis,
            "note": self.note,
            "trial": self.trial_id,
        }


@dataclass(frozen=True)
class Quality:
    """What an evaluation measured of a version (apps/optimise): its perplexity on a
    text dataset, the same dataset for every candidate so they compare."""

    perplexity: float
    uncertainty: float
    dataset: str
    evaluation: int

    def as_dict(self) -> dict[str, Any]:
        return {
            "perplexity": self.perplexity,
            "uncertainty": self.uncertainty,
            "dataset": self.dataset,
            "evaluation": self.evaluation,
        }

    @property
    def reason(self) -> str:
        return (
            f"Measured quality: perplexity {self.perplexity:.3f} ± {self.uncertainty:.3f} "
            f"on {self.dataset} (evaluation #{self.evaluation}); lower is better."
        )


@dataclass
class Candidate:
    version: ModelVersion
    use_case: str
    experience: str
    settings: dict[str, Any]
    reasons: list[str]
    unsuitable: list[str] = field(default_factory=list)
    fits: list[Fit] = field(default_factory=list)
    expected: Expected | None = None
    quality: Quality | None = None
    rank: int = 0

    @property
    def suitable(self) -> bool:
        return not self.unsuitable

    @property
    def best_fit(self) -> Fit | None:
        fitting = [f for f in self.fits if f.fits]
        return max(fitting, key=lambda f: f.free_bytes - f.needed_bytes) if fitting else None

    @property
    def fits_somewhere(self) -> bool:
        return self.best_fit is not None

    @property
    def why_not(self) -> list[str]:
        """Why it is not proposed: unsuited to the use case, or no worker can hold it."""
        reasons = list(self.unsuitable)
        if not self.fits:
            reasons.append("No worker is online to run it.")
        elif not self.fits_somewhere:
            roomiest = max(self.fits, key=lambda f: f.free_bytes)
            reasons.append(
                f"It needs about {_mib(roomiest.needed_bytes)}; the roomiest worker, "
                f"{roomiest.where}, has {_mib(max(roomiest.free_bytes, 0))} free."
            )
        return reasons

    @property
    def name(self) -> str:
        """A setup name to propose: model, use case and experience."""
        return f"{self.version.repo.name}-v{self.version.number}-{self.use_case}-{self.experience}"[
            :100
        ].replace("_", "-")

    def as_dict(self) -> dict[str, Any]:
        return {
            "rank": self.rank,
            "name": self.name,
            "model_version": self.version.pk,
            "model": str(self.version),
            "sha256": self.version.sha256,
            "use_case": self.use_case,
            "experience": self.experience,
            "settings": self.settings,
            "reasons": self.reasons,
            "suitable": self.suitable,
            "fits": [f.as_dict() for f in self.fits],
            "fits_somewhere": self.fits_somewhere,
            "why_not": self.why_not,
            "expected": self.expected.as_dict() if self.expected else None,
            "quality": self.quality.as_dict() if self.quality else None,
        }


def _mib(n: int) -> str:
    return f"{n / MIB:,.0f} MiB"


def _has_chat_template(version: ModelVersion) -> bool:
    return version.has_chat_template or version.architecture in ARCHITECTURE_DEFAULTS


def _settings(version: ModelVersion, use_case: str, experience: str) -> tuple[dict, list[str]]:
    """Runtime settings for this model, use case and experience, each with its reason."""
    limit = version.context_length or 4096
    reasons: list[str] = []
    wanted_context = {
        UseCase.CHAT: 4096,
        UseCase.CODING: 8192,
        UseCase.EXTRACTION: 4096,
        UseCase.LONG_DOCUMENTS: 32_768,
        UseCase.SEARCH: 512,
    }[use_case]
    context = min(wanted_context, limit)
    slots = {Experience.FAST: 4, Experience.QUALITY: 1, Experience.CREATIVE: 2}[experience]
    if use_case == UseCase.LONG_DOCUMENTS:
        slots = min(slots, 2)
    kv = KvCacheType.Q8_0 if experience == Experience.FAST else KvCacheType.F16
    if use_case == UseCase.LONG_DOCUMENTS:
        kv = KvCacheType.Q8_0
    preset = {
        Experience.FAST: Preset.BALANCED,
        Experience.QUALITY: Preset.PRECISE,
        Experience.CREATIVE: Preset.CREATIVE,
    }[experience]
    if use_case in (UseCase.EXTRACTION, UseCase.CODING) and experience != Experience.CREATIVE:
        preset = Preset.PRECISE
    interval = 100 if experience == Experience.FAST else 50

    label = UseCase(use_case).label.lower()
    if use_case == UseCase.SEARCH:
        reasons.append(
            f"{label}: {context} tokens of context per input is enough to embed a passage"
        )
    elif context < wanted_context:
        reasons.append(f"{label}: {context:,} tokens of context, all the model takes")
    else:
        reasons.append(f"{label}: {context:,} tokens of context")
    reasons.append(
        {
            Experience.FAST: f"fast: {slots} slots, so {slots} requests are answered together",
            Experience.QUALITY: "highest quality: 1 slot, each request has the model to itself",
            Experience.CREATIVE: "creative: 2 slots",
        }[experience]
        if use_case != UseCase.LONG_DOCUMENTS
        else f"long documents: {slots} slot{'s' if slots > 1 else ''} so each has room"
    )
    reasons.append(
        "KV cache q8_0: half the memory of f16 for a near-identical answer"
        if kv == KvCacheType.Q8_0
        else "KV cache f16: full precision"
    )
    sampling = {
        Preset.PRECISE: "temperature 0.2, top-p 0.9: focused and repeatable",
        Preset.BALANCED: "temperature 0.7, top-p 0.95",
        Preset.CREATIVE: "temperature 1.0, top-p 0.98, top-k 100: varied and surprising",
    }[preset]
    reasons.append(f"{Preset(preset).name.lower()} preset: {sampling}")
    reasons.append(
        "stream interval 100 ms: fewer, larger chunks leave the CPU to the model"
        if interval == 100
        else "stream interval 50 ms: smoother streaming"
    )
    settings = {
        "context_length": context,
        "parallel_slots": slots,
        "batch_size": 512,
        "threads": None,
        "gpu_layers": -1,
        # One GPU; a split over a worker's GPUs is an admin's choice for a model too big
        # for one.
        "split_mode": SplitMode.NONE,
        "tensor_split": "",
        "kv_cache_type": kv,
        "flash_attention": True,
        # Identical answers whatever the traffic; "fastest" is an admin's explicit choice.
        "serving_mode": ServingMode.IDENTICAL,
        "embeddings": use_case == UseCase.SEARCH,
        "stream_interval_ms": interval,
        "preset": preset,
        "chat_template": "",
    }
    return settings, reasons


def _unsuitable(version: ModelVersion, use_case: str) -> list[str]:
    reasons = []
    if use_case == UseCase.SEARCH:
        if version.architecture not in EMBEDDING_ARCHITECTURES:
            reasons.append(
                f"{version} is a {version.architecture or 'text'} generation model, not an "
                "embedding model: its vectors rank search results poorly. Import an "
                "embedding model (a BERT-style GGUF) for search."
            )
    elif not _has_chat_template(version):
        reasons.append(
            f"{version} has no chat template and AIBox has no default for "
            f"'{version.architecture}': set one on the setup to use it for chat."
        )
    if use_case == UseCase.LONG_DOCUMENTS:
        limit = version.context_length or 0
        if limit < LONG_DOCUMENT_MIN_CONTEXT:
            reasons.append(
                f"Its context is {limit:,} tokens; long documents need at least "
                f"{LONG_DOCUMENT_MIN_CONTEXT:,}."
            )
    return reasons


def needed_bytes(version: ModelVersion, settings: dict[str, Any]) -> int:
    return memory_estimate(
        version=version,
        context_length=settings["context_length"],
        parallel_slots=settings["parallel_slots"],
        batch_size=settings["batch_size"],
        kv_cache_type=settings["kv_cache_type"],
    ).total


def fits_on(
    version: ModelVersion, settings: dict[str, Any], workers: Iterable[WorkerStatus]
) -> list[Fit]:
    """Memory needed against free on each serving worker, as placement counts it: its
    roomiest way to run the setup (RAM less the headroom the box keeps, and the GPUs
    the setup offloads to), measured on the device with the least to spare."""
    # An unsaved deployment with these settings: what placement weighs. The adapter comes
    # as a version or, from Setup.settings_dict(), as its id.
    adapter = settings.get("adapter")
    target = Deployment(
        model_version=version,
        adapter_id=getattr(adapter, "pk", adapter),
        **{name: settings[name] for name in RUNTIME_FIELDS if name in settings},
    )
    fits = []
    for worker in workers:
        if not worker.serving:
            continue
        options, _ = worker_options(target, worker, {})
        if not options:
            continue
        best = max(options, key=lambda option: option.room)
        # What does not fit, if anything; else where the least is left (its GPUs, or RAM).
        short = [need for need in best.needs if need[1] > need[2]]
        gpus = [need for need in best.needs if need[0] is not None] or [best.needs[0]]
        index, needed, free = short[0] if short else min(gpus, key=lambda n: n[2] - n[1])
        device = "" if best.gpu_index is None else "RAM" if index is None else f"GPU {index}"
        fits.append(Fit(worker.hostname, best.gpu_index, needed, free, device))
    return fits


def worker_class(worker: WorkerStatus) -> str:
    return hardware_class(
        {
            "cpu_model": worker.cpu_model,
            "cpu_cores": worker.cpu_cores,
            "ram_total_mib": worker.ram_total_mib,
            "gpus": worker.gpus,
        }
    )


def _same_shape(trial: Trial, version: ModelVersion, settings: dict[str, Any]) -> bool:
    setup = trial.setup
    return (
        setup.model_version_id == version.pk
        and setup.adapter_id is None
        and setup.context_length == settings["context_length"]
        and setup.parallel_slots == settings["parallel_slots"]
        and setup.kv_cache_type == settings["kv_cache_type"]
        and setup.flash_attention == settings["flash_attention"]
        and setup.serving_mode == settings["serving_mode"]
        and setup.split_mode == settings["split_mode"]
        and setup.tensor_split == settings["tensor_split"]
        and setup.threads == settings["threads"]
    )


def expected_speed(
    version: ModelVersion,
    settings: dict[str, Any],
    worker: WorkerStatus,
    trials: Sequence[Trial],
) -> Expected | None:
    """Decode tokens/s of one stream and time to first token on ``worker``.

    ``trials`` are succeeded trials, newest first. One of the same setup shape on the
    same hardware class is taken as measured; one of another model on that class is
    scaled by the bytes each token reads; otherwise the worker's probe gives an estimate.
    """
    klass = worker_class(worker)
    here = [t for t in trials if t.hardware_class == klass and t.decode_tps_single]
    for trial in here:
        if _same_shape(trial, version, settings):
            return Expected(
                trial.decode_tps_single,
                trial.ttft_p50_ms,
                "measured",
                f"measured by trial {trial.pk} on this hardware",
                trial.pk,
            )
    weights = version.size
    if here:
        trial = here[0]
        ratio = trial.setup.model_version.size / weights
        return Expected(
            trial.decode_tps_single * ratio,
            trial.ttft_p50_ms / ratio,
            "scaled",
            f"scaled from trial {trial.pk} of {trial.setup.model_version} on this hardware "
            "by model size",
            trial.pk,
        )
    probe = worker.probe or {}
    if not probe.get("memory_gbs") or worker.gpus and settings["gpu_layers"] != 0:
        return None  # GPUs are not probed: only a trial says how fast they run
    decode = DECODE_BANDWIDTH_EFFICIENCY * probe["memory_gbs"] * 1e9 / weights
    params = version.parameter_count or weights * 2  # about 4 bits a weight
    # The token embedding table is looked up, not multiplied, while a prompt is read (and
    # the output projection runs for its last token only): most of a small model's
    # parameters, as in Gemma 3 270M (168M of 268M).
    table = (version.vocab_size or 0) * (version.embedding_size or 0)
    active = max(params - table, params // 10)
    prompt_tps = PROMPT_FLOPS_EFFICIENCY * probe["matmul_gflops"] * 1e9 / (2 * active)
    ttft = FIRST_TOKEN_OVERHEAD_MS + 1000 * SHORT_PROMPT_TOKENS / prompt_tps
    return Expected(
        decode,
        ttft,
        "estimate",
        "estimated from the worker's memory bandwidth and matrix throughput (no trial yet)",
    )


def advise(
    *,
    use_case: str,
    experience: str,
    versions: Iterable[ModelVersion],
    workers: Sequence[WorkerStatus],
    trials: Sequence[Trial],
    quality: Mapping[int, Quality] | None = None,
) -> list[Candidate]:
    """Candidates for every version, ranked: suitable ones that fit first (fastest first
    for a fast experience, largest model first otherwise, and among versions of one size
    the lowest measured perplexity), then the rest with why."""
    quality = quality or {}
    candidates = []
    serving = [w for w in workers if w.serving]
    for version in versions:
        settings, reasons = _settings(version, use_case, experience)
        candidate = Candidate(
            version=version,
            use_case=use_case,
            experience=experience,
            settings=settings,
            reasons=reasons,
            unsuitable=_unsuitable(version, use_case),
            fits=fits_on(version, settings, serving),
            quality=quality.get(version.pk),
        )
        if candidate.quality is not None:
            candidate.reasons.append(candidate.quality.reason)
        best = candidate.best_fit
        if best is not None:
            worker = next(w for w in serving if w.hostname == best.worker)
            candidate.expected = expected_speed(version, settings, worker, trials)
        candidates.append(candidate)

    def order(c: Candidate) -> tuple:
        proposed = c.suitable and c.fits_somewhere
        speed = c.expected.decode_tps if c.expected else 0.0
        size = c.version.parameter_count or c.version.size
        preference = speed if experience == Experience.FAST else size
        # Quantisations of one model share a size: what they measured decides.
        perplexity = c.quality.perplexity if c.quality else math.inf
        return (not proposed, -preference, perplexity, str(c.version))

    candidates.sort(key=order)
    for rank, candidate in enumerate(candidates, start=1):
        candidate.rank = rank
    return candidates
