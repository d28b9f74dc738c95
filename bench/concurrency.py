"""Concurrency benchmark: AIBox's batched workers against llama-cpp-python's own server.

Needs a running AIBox (``bin/aibox run``: the bundled deployment has eight parallel
slots and an inference key in var/api-key.txt). In the same run it

- measures in-process llama-cpp-python decoding one stream (the single-stream ceiling);
- starts ``python -m llama_cpp.server`` on the same GGUF, context and threads, with
  ``--interrupt_requests false`` (it serves one request at a time behind a lock);
- drives both with 1, 2, 4, 8 and 16 concurrent streaming clients, each asking for
  --tokens tokens per stream, --rounds streams per client;

and prints aggregate tokens/s, time to first token p50/p95 and time per output token
p50/p99 per level, the ratios the issue sets targets for, and a PNG plot.

    .venv/bin/python bench/concurrency.py
    .venv/bin/python bench/concurrency.py --clients 1,8 --rounds 1 --png /tmp/c.png

Time per output token (TPOT) is, per stream, the time from its first token to its last
over the tokens after the first. It compares servers that chunk differently:
llama_cpp.server sends one chunk per token, AIBox one per stream interval of its
deployment (several tokens a chunk at the default 100 ms), so gaps between chunks
would not.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.sse import chunk_text, sse_chunks, usage_tokens  # noqa: E402

PROMPTS = [
    "The history of the printing press begins",
    "Once upon a time, in a small village by the sea,",
    "The three most important inventions of the twentieth century are",
    "A good recipe for bread starts with",
    "The capital of France is known for",
    "Water boils at one hundred degrees because",
    "My favourite book is about a detective who",
    "In 1492, a sailor from Genoa",
    "The best way to learn a new language is",
    "Mount Everest is the highest mountain on Earth, and",
    "Photosynthesis is the process by which plants",
    "The stock market today opened with",
    "How to train a puppy: first,",
    "The old lighthouse keeper looked out at the storm and",
    "A short guide to the planets of the solar system:",
    "Dear hiring manager, I am writing to apply for",
]


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


@dataclass
class Level:
    clients: int
    tokens: int = 0
    wall: float = 0.0
    ttft: list[float] = field(default_factory=list)
    tpot: list[float] = field(default_factory=list)
    errors: int = 0

    @property
    def rate(self) -> float:
        return self.tokens / self.wall if self.wall else 0.0


def stream_once(client: httpx.Client, url: str, headers: dict, body: dict) -> tuple:
    """(time to first token, time per output token after it, tokens) of one stream."""
    start = time.perf_counter()
    first = last = None
    chunks, usage = 0, None
    for chunk in sse_chunks(client, url, headers, body):
        usage = usage_tokens(chunk) or usage
        if not chunk_text(chunk):
            continue
        last = time.perf_counter()
        first = first or last
        chunks += 1
    tokens = usage or chunks
    tpot = (last - first) / (tokens - 1) if tokens > 1 and last > first else float("nan")
    return (first - start if first else float("nan")), tpot, tokens


def run_level(target: dict, clients: int, rounds: int, tokens: int) -> Level:
    level = Level(clients)
    lock = threading.Lock()

    def client_loop(index: int) -> None:
        with httpx.Client(timeout=600) as client:
            for r in range(rounds):
                body = {
                    **target["extra"],
                    "prompt": PROMPTS[(index + r * clients) % len(PROMPTS)],
                    "max_tokens": tokens,
                    "temperature": 0,
                    "stream": True,
                }
                try:
                    ttft, tpot, n = stream_once(client, target["url"], target["headers"], body)
                except httpx.HTTPError as exc:
                    print(f"    client {index}: {exc}", flush=True)
                    with lock:
                        level.errors += 1
                    continue
                with lock:
                    level.ttft.append(ttft)
                    level.tpot.append(tpot)
                    level.tokens += n

    threads = [threading.Thread(target=client_loop, args=(i,)) for i in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    level.wall = time.perf_counter() - start
    return level


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def in_process_rate(path: Path, n_ctx: int, threads: int, tokens: int, runs: int = 3) -> float:
    from llama_cpp import Llama

    llm = Llama(
        model_path=str(path),
        n_ctx=n_ctx,
        n_threads=threads,
        n_threads_batch=threads,
        verbose=False,
    )
    prompt = llm.tokenize(PROMPTS[0].encode(), add_bos=True, special=False)
    rates = []
    for i in range(runs + 1):
        llm.reset()  # as the worker does: no prefix reuse between requests
        stamps = [
            time.perf_counter()
            for chunk in llm.create_completion(
                prompt=prompt, max_tokens=tokens, temperature=0, stream=True
            )
            if chunk["choices"][0]["text"]
        ]
        if i and len(stamps) > 1:  # the first run only warms up
            # Decode rate after the first token (which carries the prompt's reading).
            rates.append((len(stamps) - 1) / (stamps[-1] - stamps[0]))
    llm.close()
    return statistics.median(rates)


def start_llama_server(path: Path, n_ctx: int, threads: int, log: Path) -> tuple:
    port = free_port()
    process = subprocess.Popen(  # noqa: S603 - our own interpreter and arguments
        [
            sys.executable,
            "-m",
            "llama_cpp.server",
            "--model",
            str(path),
            "--n_ctx",
            str(n_ctx),
            "--n_threads",
            str(threads),
            "--n_threads_batch",
            str(threads),
            "--interrupt_requests",
            "false",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/v1/models", timeout=2).status_code == 200:
                return process, url
        except httpx.HTTPError:
            pass
        if process.poll() is not None:
            break
        time.sleep(0.5)
    process.kill()
    sys.exit(f"llama_cpp.server did not start; see {log}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--model", default="gemma-3-270m")
    parser.add_argument("--key-file", default=str(ROOT / "var" / "api-key.txt"))
    parser.add_argument("--clients", default="1,2,4,8,16")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2, help="streams per client per level")
    parser.add_argument("--png", default=str(ROOT / "var" / "bench" / "concurrency.png"))
    args = parser.parse_args()
    levels = [int(c) for c in args.clients.split(",")]

    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "aibox.settings")
    import django

    django.setup()
    import logging

    logging.getLogger("httpx").setLevel(logging.WARNING)  # no line per request
    from apps.deployments.models import Deployment
    from apps.registry.artifacts import artifact_store
    from workers.hardware import inventory
    from workers.inference.engine import default_threads

    deployment = Deployment.objects.select_related("model_version").get(name=args.model)
    threads = deployment.threads or default_threads(inventory().cpu_cores)
    path = artifact_store().path_for(deployment.model_version.sha256)
    print(
        f"model {args.model}: {path.name[:12]}…, context {deployment.context_length}, "
        f"{threads} threads, {deployment.parallel_slots} slots in AIBox, "
        f"{args.tokens}-token streams, {args.rounds} per client per level",
        flush=True,
    )

    single = in_process_rate(path, deployment.context_length, threads, args.tokens)
    print(f"in-process llama-cpp-python, one stream: {single:.1f} tokens/s", flush=True)

    log = Path(args.png).with_suffix(".server.log")
    log.parent.mkdir(parents=True, exist_ok=True)
    server, server_url = start_llama_server(path, deployment.context_length, threads, log)
    key = Path(args.key_file).read_text().strip()
    targets = {
        "AIBox": {
            "url": f"{args.url}/v1/completions",
            "headers": {"Authorization": f"Bearer {key}"},
            "extra": {"model": args.model, "stream_options": {"include_usage": True}},
        },
        "llama_cpp.server": {
            "url": f"{server_url}/v1/completions",
            "headers": {},
            "extra": {},
        },
    }
    results: dict[str, dict[int, Level]] = {name: {} for name in targets}
    try:
        for target in targets.values():
            run_level(target, 1, 1, 4)  # warm up
        for clients in levels:
            # Alternate the two at each level, so both see the same machine.
            for name, target in targets.items():
                level = run_level(target, clients, args.rounds, args.tokens)
                results[name][clients] = level
                print(
                    f"  {name:17} {clients:3} clients: {level.rate:7.1f} tok/s, "
                    f"TTFT p95 {percentile(level.ttft, 95) * 1000:7.0f} ms, "
                    f"errors {level.errors}",
                    flush=True,
                )
    finally:
        server.terminate()
        server.wait(timeout=30)

    print()
    header = (
        f"{'clients':>7} | {'':17} {'tok/s':>7} {'TTFT p50':>9} {'TTFT p95':>9} "
        f"{'TPOT p50':>8} {'TPOT p99':>8} {'errors':>6}"
    )
    print(header)
    print("-" * len(header))
    for clients in levels:
        for name in targets:
            level = results[name][clients]
            ttft = [percentile(level.ttft, q) * 1000 for q in (50, 95)]
            tpot = [percentile(level.tpot, q) * 1000 for q in (50, 99)]
            print(
                f"{clients:7} | {name:17} {level.rate:7.1f} {ttft[0]:7.0f}ms {ttft[1]:7.0f}ms "
                f"{tpot[0]:6.1f}ms {tpot[1]:6.1f}ms {level.errors:6}"
            )
    print()
    aibox, server_levels = results["AIBox"], results["llama_cpp.server"]
    print(f"in-process single stream: {single:.1f} tok/s")
    if 8 in aibox:
        a8, s8 = aibox[8], server_levels[8]
        print(
            f"8 clients: AIBox {a8.rate / single:.2f}x in-process single stream (target 3.5x), "
            f"{a8.rate / s8.rate:.2f}x llama_cpp.server (target 5x), "
            f"TTFT p95 {percentile(a8.ttft, 95):.2f} s (target under 1.5 s)"
        )
    if 1 in aibox:
        print(
            f"1 client: AIBox {aibox[1].rate / server_levels[1].rate:.2f}x llama_cpp.server "
            "(target at least 0.95x)"
        )
    plot(results, single, levels, Path(args.png))
    print(f"plot: {args.png}")


def plot(results: dict, single: float, levels: list[int], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, by_level in results.items():
        left.plot(levels, [by_level[c].rate for c in levels], marker="o", label=name)
        right.plot(
            levels, [percentile(by_level[c].ttft, 95) for c in levels], marker="o", label=name
        )
    left.axhline(single, color="grey", linestyle="--", label="in-process, one stream")
    left.set(xlabel="concurrent streaming clients", ylabel="aggregate tokens/s", xscale="log")
    right.set(
        xlabel="concurrent streaming clients", ylabel="time to first token p95 (s)", xscale="log"
    )
    for axis in (left, right):
        axis.set_xticks(levels, [str(c) for c in levels])
        axis.grid(alpha=0.3)
        axis.legend()
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=120)


if __name__ == "__main__":
    main()
