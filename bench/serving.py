"""Serving benchmark: the full HTTP → Celery → worker path against llama.cpp in-process.

Needs a running AIBox (``bin/aibox run``: it deploys the bundled model and writes an
inference key to var/api-key.txt). In the same run it loads the same GGUF in this
process with llama-cpp-python, on the same number of threads the worker uses, and
alternates the two so that both see the same machine:

- single-stream decode tokens/s and time to first token for --tokens-token streams,
  and the share of in-process tokens/s the full path keeps: the median over pairs of
  an in-process stream and the HTTP stream right after it (the host's drift cancels
  within a pair), with its quartiles;
- how many tokens a streamed chunk carries (the deployment's stream interval);
- added latency per request: one-token requests through the full path minus the same
  request in-process, p50 and p95.

    .venv/bin/python bench/serving.py
    .venv/bin/python bench/serving.py --url http://127.0.0.1:8000 --model gemma-3-270m --runs 10
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PROMPT = "The history of the printing press begins"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def timed_stream(open_stream, text_of, tokens_of=None) -> tuple[float, float, int, int]:
    """(time to first token, decode tokens/s after it, tokens, chunks with text).

    In-process llama-cpp-python yields one chunk per token; over HTTP the token count
    comes from the stream's usage chunk (a chunk may carry more than one token).
    """
    start = time.perf_counter()
    # Opening counts: an HTTP client returns from create() only once headers arrive.
    chunks = open_stream()
    first = last = None
    count = pieces = 0
    for chunk in chunks:
        if tokens_of is not None and tokens_of(chunk) is not None:
            count = tokens_of(chunk)
            continue
        if not text_of(chunk):
            continue
        now = time.perf_counter()
        pieces += 1
        if first is None:
            first = now
        last = now
        if tokens_of is None:
            count += 1
    ttft = (first - start) if first else float("nan")
    rate = (count - 1) / (last - first) if count > 1 and last > first else float("nan")
    return ttft, rate, count, pieces


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--model", default="gemma-3-270m")
    parser.add_argument("--key-file", default=str(ROOT / "var" / "api-key.txt"))
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--runs", type=int, default=12, help="streams of each kind")
    parser.add_argument("--short-runs", type=int, default=40, help="one-token requests")
    args = parser.parse_args()

    import os

    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "aibox.settings")
    import django

    django.setup()
    logging.getLogger("httpx").setLevel(logging.WARNING)  # no line per request
    import httpx
    from llama_cpp import Llama

    from apps.deployments.models import Deployment
    from apps.registry.artifacts import artifact_store
    from bench.sse import chunk_text, sse_chunks, usage_tokens
    from workers.hardware import inventory
    from workers.inference.engine import default_threads

    deployment = Deployment.objects.select_related("model_version").get(name=args.model)
    threads = deployment.threads or default_threads(inventory().cpu_cores)
    path = artifact_store().path_for(deployment.model_version.sha256)
    print(
        f"model {args.model}: {path.name[:12]}…, context {deployment.context_length}, "
        f"{threads} threads, {args.tokens}-token streams, {args.runs} runs each"
    )

    llm = Llama(
        model_path=str(path),
        n_ctx=deployment.context_length,
        n_threads=threads,
        n_threads_batch=threads,
        n_batch=deployment.batch_size,
        verbose=False,
    )
    tokens = llm.tokenize(PROMPT.encode(), add_bos=True, special=False)
    client = httpx.Client(timeout=600)
    url = f"{args.url}/v1/completions"
    headers = {"Authorization": f"Bearer {Path(args.key_file).read_text().strip()}"}

    def in_process(max_tokens: int):
        llm.reset()  # as the worker does: no prefix reuse between requests
        return llm.create_completion(
            prompt=tokens, max_tokens=max_tokens, temperature=0, stream=True
        )

    def over_http(max_tokens: int):
        body = {
            "model": args.model,
            "prompt": PROMPT,
            "max_tokens": max_tokens,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        return sse_chunks(client, url, headers, body)

    def local_text(chunk):
        return chunk["choices"][0]["text"]

    # Warm both paths (page cache, first-request setup).
    timed_stream(lambda: in_process(4), local_text)
    timed_stream(lambda: over_http(4), chunk_text, usage_tokens)

    local, remote = [], []
    for i in range(args.runs):
        local.append(timed_stream(lambda: in_process(args.tokens), local_text))
        remote.append(timed_stream(lambda: over_http(args.tokens), chunk_text, usage_tokens))
        print(
            f"  stream {i + 1}/{args.runs}: in-process {local[-1][1]:.1f} tok/s, "
            f"HTTP {remote[-1][1]:.1f} tok/s",
            flush=True,
        )

    short_local, short_remote = [], []
    for i in range(args.short_runs):
        for bucket, make in ((short_local, in_process), (short_remote, over_http)):
            start = time.perf_counter()
            for _ in make(1):
                pass
            bucket.append((time.perf_counter() - start) * 1000)
        if (i + 1) % 10 == 0:
            print(f"  one-token requests: {i + 1}/{args.short_runs}", flush=True)

    local_rate = statistics.median(r[1] for r in local)
    remote_rate = statistics.median(r[1] for r in remote)
    local_ttft = statistics.median(r[0] for r in local) * 1000
    remote_ttft = statistics.median(r[0] for r in remote) * 1000
    # Each HTTP stream against the in-process stream just before it: the machine's
    # drift (other tenants of the host) cancels within a pair.
    pair_ratios = sorted(h[1] / i[1] for i, h in zip(local, remote, strict=True))
    tokens_per_chunk = sum(r[2] for r in remote) / sum(r[3] for r in remote)
    added = [r - statistics.median(short_local) for r in short_remote]
    print()
    print(f"{'':34}{'in-process':>12}{'full path':>12}{'ratio':>8}")
    print(
        f"{'decode tokens/s (median)':34}{local_rate:12.1f}{remote_rate:12.1f}"
        f"{remote_rate / local_rate:8.3f}"
    )
    print(
        f"{'time to first token, ms (median)':34}{local_ttft:12.1f}{remote_ttft:12.1f}"
        f"{remote_ttft / local_ttft:8.2f}"
    )
    print(
        f"{'one-token request, ms (p50)':34}{percentile(short_local, 50):12.1f}"
        f"{percentile(short_remote, 50):12.1f}"
    )
    print(
        f"added latency per request: p50 {percentile(added, 50):.1f} ms, "
        f"p95 {percentile(added, 95):.1f} ms (target: p50 under 15 ms)"
    )
    print(
        f"full path keeps {statistics.median(pair_ratios):.1%} of in-process tokens/s, "
        f"median of {len(pair_ratios)} paired streams (quartiles "
        f"{percentile(pair_ratios, 25):.1%}–{percentile(pair_ratios, 75):.1%}; "
        "target: at least 95%)"
    )
    print(
        f"{tokens_per_chunk:.1f} tokens per streamed chunk (the deployment's stream interval "
        f"is {deployment.stream_interval_ms} ms; 0 sends each token alone)"
    )


if __name__ == "__main__":
    main()
