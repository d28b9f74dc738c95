"""A trial: one deployment setup measured on this worker, through the serving code.

A trial loads the setup's model into an ``engine.Replica``, the class that serves a
deployment (continuous batching, sampling, the same context parameters), sends it
completion requests as the HTTP endpoint would, and times the events it writes back.
Its figures are what a client of that deployment would see on this machine: how long it
takes to load, to read a prompt, to answer the first token and to stream tokens, alone
and with every slot busy, and the memory it holds while doing so.

Figures from machines of one ``hardware_class`` are comparable; ``fingerprint`` records
the class with the llama.cpp build that produced them.
"""

from __future__ import annotations

import itertools
import math
import os
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import llama_cpp
from llama_cpp import _internals

from workers.hardware import hardware_class, inventory, nvidia_gpus
from workers.inference import protocol
from workers.inference.cache import ModelCache
from workers.inference.engine import Replica
from workers.inference.protocol import ReplicaSpec, RequestSpec

# A request that has not ended by then is reported as a failed trial, never waited on
# for ever (a large model on a small CPU still reads 512 tokens well within it).
REQUEST_TIMEOUT_SECONDS = 1200.0
# How often the resident memory is read: often enough to see the peak of a load.
RSS_INTERVAL_SECONDS = 0.02
# nvidia-smi takes tens of milliseconds a call, and GPU memory moves only on load.
VRAM_INTERVAL_SECONDS = 0.5
# Seeds of the decode runs, so a rerun of a trial generates the same text.
SEED = 1234
# A sampled answer may end at once (an end-of-generation token); the single-stream
# decode is retried with the next seed this many times before the trial gives up.
DECODE_ATTEMPTS = 3
# Single-stream decoding runs whose median is the figure.
DECODE_RUNS = 3
MIB = 1024 * 1024

# Plain prose for prompts: what a prompt says does not change how fast it is read, but
# ordinary text gives the model something to continue in the decode runs.
PROSE = (
    "The old harbour town wakes slowly in winter. Fishing boats leave before dawn, and "
    "the bakery on the square opens its shutters while the streets are still dark. By "
    "nine the market fills with farmers selling apples, cheese and bread, and children "
    "walk to school along the sea wall, counting the gulls. In the afternoon the light "
    "turns grey and the wind comes in from the west, so most people stay indoors, "
    "reading, mending nets or writing letters to relatives who moved to the city years "
    "ago. At night the lighthouse sweeps the water, and the town sleeps early."
)


class TrialError(Exception):
    """The setup loaded but a measurement failed; the message says why."""


@dataclass(frozen=True)
class TrialSpec:
    trial_id: int
    # A ReplicaSpec.as_dict() of the setup, built by the control plane.
    replica: dict[str, Any]
    # Prompt sizes in tokens (the BOS token included). The long prompt is capped so that
    # it and ``decode_tokens`` fit in the setup's context.
    short_prompt_tokens: int = 32
    long_prompt_tokens: int = 512
    decode_tokens: int = 48
    ttft_samples: int = 5

    def __post_init__(self) -> None:
        for name in ("short_prompt_tokens", "long_prompt_tokens", "decode_tokens", "ttft_samples"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrialSpec:
        return cls(**data)


@dataclass(frozen=True)
class TrialResult:
    load_seconds: float
    prompt_tps_short: float
    prompt_tps_long: float
    decode_tps_single: float
    decode_tps_parallel: float
    ttft_p50_ms: float
    ttft_p95_ms: float
    peak_ram_bytes: int
    # GPU memory the replica added on its GPU; None when it ran on the CPU.
    peak_vram_bytes: int | None
    details: dict[str, Any] = field(default_factory=dict)
    hardware: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def fingerprint(cpu_cores_hint: int | None = None) -> dict[str, Any]:
    """What produced a trial's figures: this machine, its class and the llama.cpp build.

    ``cpu_cores_hint`` is the number of cores the worker gives llama.cpp when it is fewer
    than the machine has; the class then names those, as they set the speed.
    """
    info = inventory().as_dict()
    if cpu_cores_hint:
        info["machine_cpu_cores"] = info["cpu_cores"]
        info["cpu_cores"] = cpu_cores_hint
    info["llama_cpp_version"] = llama_cpp.__version__
    info["llama_cpp_system_info"] = (
        llama_cpp.llama_print_system_info().decode("utf-8", errors="replace").strip()
    )
    info["hardware_class"] = hardware_class(info)
    return info


def run_trial(
    spec: TrialSpec,
    *,
    cache: ModelCache,
    cpu_cores: int,
    progress: Callable[[int, str], None] = lambda percent, message: None,
) -> TrialResult:
    """Load the setup of ``spec`` in a replica and measure it; see the module docstring.

    The model (and adapter) are fetched through ``cache``, which verifies their sha256
    (``IntegrityError``). A model llama.cpp cannot load raises ``engine.LoadError``; a
    request that fails once loaded raises ``TrialError``. ``progress`` is called with a
    percentage and the phase at each step, 100 at the end.
    """
    setup = ReplicaSpec.from_dict(spec.replica)
    # Each token its own delta, so every token has a time; and room in the queue for a
    # request per slot, as the parallel run sends them all at once.
    setup = replace(
        setup, stream_interval_ms=0, queue_size=max(setup.queue_size, setup.parallel_slots)
    )
    hardware = fingerprint(cpu_cores_hint=cpu_cores)
    load_before = _load_average()
    on_gpu = setup.gpu_index is not None and setup.gpu_layers != 0
    # Both baselines are read now, before anything of the model is in memory.
    ram = _Peak(_rss_bytes, RSS_INTERVAL_SECONDS)
    # A split over the worker's GPUs is measured on all of them together.
    gpu = setup.gpu_index if setup.split_mode == protocol.SPLIT_NONE else None
    vram = _Peak(lambda: _vram_used(gpu), VRAM_INTERVAL_SECONDS) if on_gpu else None
    replica: Replica | None = None
    try:
        progress(0, "fetching the model")
        started = time.perf_counter()
        model_path = cache.fetch(setup.sha256, Path(setup.source_path))
        adapter_path = None
        if setup.adapter_sha256:
            adapter_path = cache.fetch(setup.adapter_sha256, Path(setup.adapter_source_path))
        progress(10, "loading")
        sink = EventLog()
        replica = Replica(setup, model_path, sink, cpu_cores, adapter_path=adapter_path)
        replica.load()
        load_seconds = time.perf_counter() - started
        bench = _Bench(replica, sink, f"trial-{spec.trial_id}")

        # Sizes that fit the context: the engine refuses a prompt as long as the context
        # and stops a generation at its end.
        n_ctx = setup.context_length
        decode_tokens = max(2, min(spec.decode_tokens, n_ctx // 2))
        long_tokens = max(2, min(spec.long_prompt_tokens, n_ctx - decode_tokens - 1))
        short_tokens = max(2, min(spec.short_prompt_tokens, long_tokens))
        short_prompt = _prompt_of(replica.model, short_tokens)
        long_prompt = _prompt_of(replica.model, long_tokens)

        # The first request after a load pays for faulting the weights in from the page
        # cache; a deployment pays it once, so no figure should.
        progress(20, "warming up")
        warmup = bench.run(short_prompt, max_tokens=1)

        progress(30, "short prompt")
        short_runs = [bench.run(short_prompt, max_tokens=1) for _ in range(spec.ttft_samples)]
        ttfts = sorted(run.ttft for run in short_runs)
        ttft_p50 = _percentile(ttfts, 50)

        progress(45, "long prompt")
        long_run = bench.run(long_prompt, max_tokens=1)

        progress(60, "decode, 1 stream")
        # The median of a few runs: on a small shared machine one run can be a third off.
        rates, singles, attempt = [], [], 0
        while len(rates) < DECODE_RUNS and attempt < DECODE_RUNS + DECODE_ATTEMPTS:
            single = bench.run(short_prompt, max_tokens=decode_tokens, seed=SEED + attempt)
            attempt += 1
            rate = _decode_rate([single])
            if rate > 0:
                rates.append(rate)
                singles.append(single)
        if not rates:
            raise TrialError(
                f"The model ended its answer after one token {attempt} times; "
                "its decoding speed could not be measured."
            )
        decode_single = statistics.median(rates)
        single = singles[0]

        slots = setup.parallel_slots
        progress(75, f"decode, {slots} streams")
        submitted = [
            bench.submit(short_prompt, max_tokens=decode_tokens, seed=SEED + 100 + i)
            for i in range(slots)
        ]
        parallel = [bench.wait(request_id, at) for request_id, at in submitted]
        decode_parallel = _decode_rate(parallel)
        if decode_parallel <= 0:
            raise TrialError(
                "Every stream ended after one token; the parallel decoding speed could not "
                "be measured."
            )
        threads = replica.snapshot()["threads"]
    finally:
        if replica is not None:
            replica.stop("The trial ended.")
        ram.stop()
        if vram is not None:
            vram.stop()

    progress(100, "done")
    return TrialResult(
        load_seconds=round(load_seconds, 3),
        prompt_tps_short=round(short_runs[0].prompt_tokens / ttft_p50, 2),
        prompt_tps_long=round(long_run.prompt_tokens / long_run.ttft, 2),
        decode_tps_single=round(decode_single, 2),
        decode_tps_parallel=round(decode_parallel, 2),
        ttft_p50_ms=round(ttft_p50 * 1000, 1),
        ttft_p95_ms=round(_percentile(ttfts, 95) * 1000, 1),
        peak_ram_bytes=ram.rise() or 0,
        peak_vram_bytes=vram.rise() if vram is not None else None,
        details={
            # Sizes after capping to the context, and what the engine counted.
            "asked": {
                "short_prompt_tokens": short_tokens,
                "long_prompt_tokens": long_tokens,
                "decode_tokens": decode_tokens,
            },
            "short_prompt_tokens": short_runs[0].prompt_tokens,
            "long_prompt_tokens": long_run.prompt_tokens,
            "decode_tokens_single": single.completion_tokens,
            "decode_tokens_parallel": [run.completion_tokens for run in parallel],
            "decode_attempts_single": attempt,
            "decode_tps_single_runs": [round(r, 2) for r in rates],
            "ttft_samples": len(ttfts),
            "ttft_ms": [round(t * 1000, 1) for t in ttfts],
            # Nearest rank: with 5 samples p50 is the median and p95 the slowest.
            "percentiles": "nearest-rank",
            "warmup_ms": round(warmup.ttft * 1000, 1),
            "threads": threads,
            "slots": slots,
            "context_length": n_ctx,
            "kv_cache_type": setup.kv_cache_type,
            "flash_attention": setup.flash_attention,
            "serving_mode": setup.serving_mode,
            "gpu_layers": setup.gpu_layers,
            "gpu_index": setup.gpu_index,
            "split_mode": setup.split_mode,
            "tensor_split": setup.tensor_split,
            # Other work on the machine slows llama.cpp's threads many times over (they
            # spin while waiting for each other): a load near the core count before or
            # after marks figures that are not this setup's own.
            "load_average_before": load_before,
            "load_average_after": _load_average(),
        },
        hardware=hardware,
    )


# -- requests and their events -------------------------------------------------


class EventLog:
    """An in-memory ``EventSink``: each request's events with the time they were sent."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._events: dict[str, list[tuple[float, dict[str, Any]]]] = {}

    def send(self, request_id: str, event: dict[str, Any]) -> bool:
        # Timed before the lock, so a reader waiting on it never delays a timestamp.
        now = time.perf_counter()
        with self._changed:
            self._events.setdefault(request_id, []).append((now, event))
            if event["type"] in (protocol.END, protocol.ERROR):
                self._changed.notify_all()
        return False

    def cancelled(self, request_id: str) -> bool:
        return False

    def wait(self, request_id: str, timeout: float) -> list[tuple[float, dict[str, Any]]]:
        """The request's events once it has ended; TrialError if it failed or never ended."""
        with self._changed:
            if not self._changed.wait_for(lambda: self._ended(request_id), timeout):
                raise TrialError(f"A trial request did not finish within {timeout:.0f} s.")
            events = list(self._events[request_id])
        last = events[-1][1]
        if last["type"] == protocol.ERROR:
            raise TrialError(last.get("message") or "The worker reported an error.")
        return events

    def _ended(self, request_id: str) -> bool:
        events = self._events.get(request_id)
        return bool(events) and events[-1][1]["type"] in (protocol.END, protocol.ERROR)


@dataclass(frozen=True)
class _Run:
    """One finished request: when it was submitted and its timed events."""

    submitted: float
    events: list[tuple[float, dict[str, Any]]]

    @property
    def ttft(self) -> float:
        """Seconds from submit to the first token's delta (the end, if none was sent:
        an answer that ended at once)."""
        first = next(
            t for t, event in self.events if event["type"] in (protocol.DELTA, protocol.END)
        )
        return first - self.submitted

    @property
    def prompt_tokens(self) -> int:
        return next(e["prompt_tokens"] for _, e in self.events if e["type"] == protocol.START)

    @property
    def completion_tokens(self) -> int:
        return next(e["completion_tokens"] for _, e in self.events if e["type"] == protocol.END)

    @property
    def deltas(self) -> list[tuple[float, int]]:
        """(time, tokens generated so far) of each delta."""
        return [(t, e["tokens"]) for t, e in self.events if e["type"] == protocol.DELTA]


class _Bench:
    """Sends completion requests to a loaded replica, as the HTTP endpoint would."""

    def __init__(self, replica: Replica, sink: EventLog, prefix: str) -> None:
        self.replica = replica
        self.sink = sink
        self._prefix = prefix
        self._ids = itertools.count(1)

    def submit(self, prompt: str, *, max_tokens: int, seed: int = SEED) -> tuple[str, float]:
        spec = self.replica.spec
        request_id = f"{self._prefix}-{next(self._ids)}"
        now = time.time()
        request = RequestSpec(
            request_id=request_id,
            replica_id=spec.replica_id,
            generation=spec.generation,
            kind="completion",
            prompt=prompt,
            max_tokens=max_tokens,
            seed=seed,
            # The engine drops a request whose deadline has passed before it starts.
            deadline=now + REQUEST_TIMEOUT_SECONDS,
            sent_at=now,
        )
        submitted = time.perf_counter()
        self.replica.submit(request)
        return request_id, submitted

    def wait(self, request_id: str, submitted: float) -> _Run:
        return _Run(submitted, self.sink.wait(request_id, REQUEST_TIMEOUT_SECONDS))

    def run(self, prompt: str, *, max_tokens: int, seed: int = SEED) -> _Run:
        return self.wait(*self.submit(prompt, max_tokens=max_tokens, seed=seed))


def _prompt_of(model: _internals.LlamaModel, tokens: int) -> str:
    """Prose that the engine reads as at most ``tokens`` tokens (BOS included), and as
    close to it as whole words allow."""

    prose = PROSE.split()

    def text(words: int) -> str:
        return " ".join(prose[i % len(prose)] for i in range(words))

    def count(words: int) -> int:
        # As engine.Replica tokenises a completion prompt.
        return len(model.tokenize(text(words).encode("utf-8"), add_bos=True, special=False))

    # A word is at least one token, so the answer lies in [1, tokens]; the count grows
    # with the words, so a binary search finds the longest text that fits.
    low, high = 1, max(1, tokens)
    while low < high:
        middle = (low + high + 1) // 2
        if count(middle) <= tokens:
            low = middle
        else:
            high = middle - 1
    return text(low)


def _decode_rate(runs: list[_Run]) -> float:
    """Tokens per second the runs generated together after their first tokens.

    The first token of a run comes from reading its prompt, so the clock starts at the
    earliest first token and stops at the last delta; with one run this is
    (tokens − 1) / (last delta − first delta). 0.0 when nothing came after a first token.
    """
    timed = [run.deltas for run in runs if run.deltas]
    tokens = sum(deltas[-1][1] - deltas[0][1] for deltas in timed)
    if tokens <= 0:
        return 0.0
    span = max(deltas[-1][0] for deltas in timed) - min(deltas[0][0] for deltas in timed)
    return tokens / span if span > 0 else 0.0


def _percentile(ordered: list[float], percent: float) -> float:
    """Nearest-rank percentile of sorted values: with 5 samples p95 is the largest."""
    rank = max(1, math.ceil(percent / 100 * len(ordered)))
    return ordered[rank - 1]


# -- memory ----------------------------------------------------------------------

_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _rss_bytes() -> int | None:
    """This process's resident memory (Linux); None where /proc is not there."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * _PAGE_SIZE
    except (OSError, ValueError, IndexError):
        return None


def _load_average() -> float | None:
    """The machine's one-minute load average; None where the system has none."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def _vram_used(index: int | None) -> int | None:
    """Memory in use on one GPU (None: on all of them together), by every process on it
    (nvidia-smi's total − free)."""
    used = [
        (gpu.memory_total_mib - gpu.memory_free_mib) * MIB
        for gpu in nvidia_gpus()
        if index is None or gpu.index == index
    ]
    return sum(used) if used else None


class _Peak:
    """The highest value of a reading, sampled by a background thread until ``stop``.

    The baseline is read on creation; ``rise`` is how far the peak went above it.
    """

    def __init__(self, read: Callable[[], int | None], interval: float) -> None:
        self._read = read
        self._interval = interval
        self._stopping = threading.Event()
        self.baseline = read()
        self.peak = self.baseline
        self._thread = threading.Thread(target=self._run, name="trial-memory", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stopping.wait(self._interval):
            self._sample()

    def _sample(self) -> None:
        value = self._read()
        if value is not None and (self.peak is None or value > self.peak):
            self.peak = value

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join()
        self._sample()

    def rise(self) -> int | None:
        if self.baseline is None or self.peak is None:
            return None
        return max(0, self.peak - self.baseline)
