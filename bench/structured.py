"""Structured output in process: decode rate with a JSON schema's grammar against without.

On one in-process ``engine.Replica`` of the bundled Gemma (one slot), for each of a few
schemas (an object of typed properties, an array of enums, an object of integer ranges,
an array of objects) it sends a chat prompt asking for that data twice: with the schema
(``json_schema``: grammar-constrained sampling) and without (free text, at most as many
tokens as the constrained answer had, so both decode the same positions). Both greedy
and at temperature 0.8 with a seed, each pair --runs times, in alternating order.

A constrained answer ends when its JSON closes, so the figure is the decode rate: tokens
after the first over the time from the first token's delta to the last one's, not the
request's total time. Every run of a pair generates the same tokens (greedy, or the
same seed), so each token's step does the same work in every run; the decode time is
the sum over tokens of each token's fastest step among the runs. Other work on the
machine only ever slows a step down, on a shared 2-core box many times over (llama.cpp's
threads spin at their barriers while one of them is preempted): a whole run is rarely
undisturbed, but most tokens' steps are in at least one of the runs. For the
constrained answers it counts the tokens whose first pick the grammar refused (then
filtered on a shortlist of likely tokens) and those that needed the whole vocabulary
filtered (``batching`` module docstring): the slow paths. Each constrained answer must
parse and validate against its schema (``jsonschema``); the bench exits with status 1
if one does not.

    .venv/bin/python bench/structured.py
    .venv/bin/python bench/structured.py --runs 1 --schemas person,books
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.prompt_cache import Client, EventLog, answer, event, model_path, replica_spec  # noqa: E402
from workers.inference import batching, json_schema, protocol  # noqa: E402
from workers.inference.engine import Replica, default_threads  # noqa: E402

SEED = 7
# name: (schema, the user's message asking for data of that shape)
SCHEMAS: dict[str, tuple[dict[str, Any], str]] = {
    "person": (
        {
            "type": "object",
            "properties": {
                "name": {"type": "string", "maxLength": 40},
                "age": {"type": "integer"},
                "email": {"type": "string"},
                "city": {"type": "string"},
                "member": {"type": "boolean"},
            },
            "required": ["name", "age", "email", "city", "member"],
            "additionalProperties": False,
        },
        "Make up a customer record for a library: the person's name, age, email address, "
        "home city and whether they are a paying member. Answer in JSON.",
    ),
    "sentiments": (
        {
            "type": "array",
            "items": {"enum": ["positive", "negative", "neutral"]},
            "minItems": 6,
            "maxItems": 6,
        },
        "Classify the sentiment of each of these six reviews as positive, negative or "
        "neutral, in order, as a JSON array: 1. 'Loved it, would buy again.' 2. 'Broke "
        "after two days.' 3. 'It is a chair.' 4. 'Fast delivery and great quality.' "
        "5. 'Terrible customer service.' 6. 'Does what it says.'",
    ),
    "event": (
        {
            "type": "object",
            "properties": {
                "year": {"type": "integer", "minimum": 1900, "maximum": 2100},
                "month": {"type": "integer", "minimum": 1, "maximum": 12},
                "day": {"type": "integer", "minimum": 1, "maximum": 31},
                "attendees": {"type": "integer", "minimum": 0, "maximum": 5000},
                "rating": {"type": "integer", "minimum": 1, "maximum": 10},
            },
            "required": ["year", "month", "day", "attendees", "rating"],
            "additionalProperties": False,
        },
        "Our town held its summer music festival on the 14th of July 2023. About 1200 "
        "people came and most of them loved it. Give the date, the number of attendees "
        "and a rating from 1 to 10 as JSON.",
    ),
    "books": (
        {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "title": {"type": "string"},
                    "author": {"type": "string"},
                    "year": {"type": "integer", "minimum": 1000, "maximum": 2030},
                },
                "required": ["title", "author", "year"],
                "additionalProperties": False,
            },
            "minItems": 3,
            "maxItems": 4,
        },
        "List three classic novels with their title, author and the year they were first "
        "published, as a JSON array of objects.",
    ),
}
SAMPLINGS = {"greedy": {"temperature": 0.0}, "t=0.8": {"temperature": 0.8, "seed": SEED}}


class SlowPaths:
    """Counts the scheduler's grammar retries, by the candidate arrays it fills: a
    shortlist of the likeliest tokens after the grammar refused the chain's first pick,
    or the whole vocabulary (``batching`` module docstring). Only the replica's thread
    samples, and the bench reads the counts between requests.

    It wraps a private method: the scheduler has no counter of its own, and these counts
    are what explains a constrained rate, so a rename there should break the bench."""

    def __init__(self, n_vocab: int) -> None:
        self.shortlists = self.whole_vocabulary = 0
        fill = batching._Candidates._fill

        def counted_fill(candidates, ids, logits):
            if len(ids) >= n_vocab:
                self.whole_vocabulary += 1
            else:
                self.shortlists += 1
            return fill(candidates, ids, logits)

        batching._Candidates._fill = counted_fill

    def read(self) -> tuple[int, int]:
        counts = (self.shortlists, self.whole_vocabulary)
        self.shortlists = self.whole_vocabulary = 0
        return counts


@dataclass
class Figures:
    """One schema and sampling's runs."""

    # Per run of each kind: when each count of tokens was reached (the deltas' "tokens").
    steps: dict[bool, list[dict[int, float]]] = field(default_factory=lambda: {True: [], False: []})
    lengths: list[int] = field(default_factory=list)
    shortlists: int = 0
    whole_vocabulary: int = 0
    valid: int = 0

    def rate(self, constrained: bool) -> float:
        """Tokens/s from the first token to the last, each token at its fastest step."""
        runs = self.steps[constrained]
        counts = sorted(set.intersection(*(set(run) for run in runs)))
        if len(counts) < 2:
            return float("nan")
        seconds = sum(min(run[b] - run[a] for run in runs) for a, b in itertools.pairwise(counts))
        return (counts[-1] - counts[0]) / seconds

    @property
    def ratio(self) -> float:
        return self.rate(True) / self.rate(False)

    @property
    def tokens(self) -> str:
        low, high = min(self.lengths), max(self.lengths)
        return str(low) if low == high else f"{low}–{high}"


def token_times(events: list[tuple[float, dict[str, Any]]]) -> dict[int, float]:
    """When each delta went out, by the count of tokens generated by then."""
    return {e["tokens"]: t for t, e in events if e["type"] == protocol.DELTA}


def run_rate(times: dict[int, float]) -> float:
    """One run's tokens/s from its first token's delta to its last one's."""
    if len(times) < 2:
        return float("nan")
    (first, start), (last, end) = min(times.items()), max(times.items())
    return (last - first) / (end - start) if end > start else float("nan")


def problem(text: str, schema: dict[str, Any]) -> str:
    """Why a constrained answer is not a valid instance of its schema ("" if it is)."""
    try:
        jsonschema.validate(json.loads(text), schema)
    except json.JSONDecodeError as exc:
        return f"does not parse: {exc}"
    except jsonschema.ValidationError as exc:
        return f"does not validate: {exc.message}"
    return ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--schemas", default=",".join(SCHEMAS), help="which of them, by name")
    parser.add_argument("--runs", type=int, default=4, help="pairs per schema and sampling")
    parser.add_argument("--tokens", type=int, default=256, help="most tokens per answer")
    parser.add_argument("--threads", type=int, default=default_threads(os.cpu_count() or 1))
    parser.add_argument("--model", help="a GGUF file (default: the bundled Gemma)")
    args = parser.parse_args()
    names = args.schemas.split(",")
    if unknown := [n for n in names if n not in SCHEMAS]:
        parser.error(f"unknown schemas {unknown}; known: {', '.join(SCHEMAS)}")
    for name in names:
        json_schema.check(SCHEMAS[name][0])  # what the API would refuse is no benchmark

    path = model_path(args.model)
    print(
        f"{path.name}, {args.threads} threads, 1 slot, {args.runs} runs per schema and "
        f"sampling, answers of at most {args.tokens} tokens; load average "
        f"{os.getloadavg()[0]:.2f}",
        flush=True,
    )
    sink = EventLog()
    replica = Replica(
        replica_spec(path, context=2048, slots=1, threads=args.threads),
        path,
        sink,
        os.cpu_count() or 1,
    )
    replica.load()
    client = Client(replica, sink, "structured")
    try:
        # The first decode allocates llama.cpp's buffers: not part of any figure.
        client.run(kind="completion", prompt="Warm-up.", max_tokens=4, temperature=0)
        results, invalid = measure(client, names, args.runs, args.tokens)
    finally:
        replica.stop("The bench is done.")

    print()
    print(
        "| schema | sampling | tokens | constrained tok/s | unconstrained tok/s | ratio "
        "| per answer: shortlists / whole-vocabulary filters | valid JSON |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for (name, label), figures in results.items():
        print(
            f"| {name} | {label} | {figures.tokens} "
            f"| {figures.rate(True):.1f} | {figures.rate(False):.1f} | {figures.ratio:.2f}× "
            f"| {figures.shortlists} / {figures.whole_vocabulary} | {figures.valid}/{args.runs} |"
        )
    ratios = [figures.ratio for figures in results.values()]
    print(
        f"\nConstrained / unconstrained decode rate (each token's best of {args.runs} runs): "
        f"{min(ratios):.2f}× to {max(ratios):.2f}×, "
        f"geometric mean {statistics.geometric_mean(ratios):.2f}× (target: at least 0.8×); "
        f"load average {os.getloadavg()[0]:.2f}."
    )
    if invalid:
        print("Constrained answers that are not valid:\n  " + "\n  ".join(invalid))
        sys.exit(1)
    print(f"All {len(results) * args.runs} constrained answers parse and validate.")


def measure(
    client: Client, names: list[str], runs: int, tokens: int
) -> tuple[dict[tuple[str, str], Figures], list[str]]:
    """The figures of each schema and sampling, and the constrained answers not valid."""
    slow = SlowPaths(client.replica.model.n_vocab())
    results = {}
    invalid = []
    for name in names:
        schema, prompt = SCHEMAS[name]
        messages = [{"role": "user", "content": prompt}]
        for label, sampling in SAMPLINGS.items():
            results[name, label] = figures = Figures()
            for run in range(1, runs + 1):
                # The constrained answer first, to know how many tokens the free one may
                # have; every other run the free one first, with the last run's length
                # (the same: greedy, or the same seed).
                order = (False, True) if run % 2 == 0 else (True, False)
                for constrained in order:
                    slow.read()
                    _, events = client.run(
                        kind="chat",
                        messages=messages,
                        max_tokens=tokens if constrained else figures.lengths[-1],
                        json_schema=schema if constrained else None,
                        **sampling,
                    )
                    figures.steps[constrained].append(token_times(events))
                    if not constrained:
                        continue
                    produced = event(events, protocol.END)["completion_tokens"]
                    shortlists, whole = slow.read()
                    # The same each run: greedy, or the same seed.
                    figures.shortlists = shortlists
                    figures.whole_vocabulary = whole
                    figures.lengths.append(produced)
                    text = answer(events)
                    if why := problem(text, schema):
                        invalid.append(f"{name} {label} run {run}: {why}: {text!r}")
                    else:
                        figures.valid += 1
                    if run == 1:
                        print(f"  {name} {label}: {text}", flush=True)
                print(
                    f"{name} {label} run {run}: {figures.lengths[-1]} tokens, "
                    f"{run_rate(figures.steps[True][-1]):.1f} tok/s constrained ({shortlists} "
                    f"shortlists, {whole} whole-vocabulary filters), "
                    f"{run_rate(figures.steps[False][-1]):.1f} unconstrained",
                    flush=True,
                )
    return results, invalid


if __name__ == "__main__":
    main()
