"""Pulling a model file over HTTP the way a worker on another host does, against a plain
download of the same file.

Needs a scratch database (DATABASE_URL, migrated) and Redis, as the app does. It
writes a file of --size-mib (default 2048) into a temporary artifact store, registers it
as a model version (rows only: it is random bytes, not a GGUF) and issues a worker
credential, then starts two servers of its own on local ports:

  aibox    uvicorn serving aibox.asgi:application (the production ASGI app), pulled from
           /internal/v1/artifacts/<sha256> with the worker's own code:
           ModelCache.fetch with a RemoteSource (HEAD, then a streamed GET into a .part
           file, hashed as it is written, renamed into the cache)
  plain    `python -m http.server` serving the same file, downloaded with httpx
           streaming to disk (no hashing): the baseline

Each pull runs in a fresh process (its peak RSS is its own), --repeat times, taking
turns; the best of each is reported with MiB/s, the ratio aibox/plain (target >= 0.8)
and the pulling process's peak RSS (flat: it does not grow with the file).

    DATABASE_URL=postgres://postgres@127.0.0.1:5432/aibox_bench \\
        .venv/bin/python bench/artifact_pull.py --size-mib 512
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "aibox.settings")
os.environ.setdefault("AIBOX_DEBUG", "true")

MIB = 1024 * 1024


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _write_file(path: Path, size_mib: int) -> str:
    """Random-looking bytes (one random MiB, varied per MiB), hashed as written."""
    import hashlib

    block = os.urandom(MIB)
    digest = hashlib.sha256()
    with path.open("wb") as out:
        for i in range(size_mib):
            chunk = i.to_bytes(8, "little") + block[8:]
            out.write(chunk)
            digest.update(chunk)
    return digest.hexdigest()


def prepare(store_root: Path, size_mib: int) -> tuple[str, str]:
    """The file in the store, its version's rows and a credential: (sha256, secret)."""
    import django

    django.setup()
    from apps.accounts.services import system_user
    from apps.deployments.credentials import worker_credential_issue
    from apps.registry.models import Artifact, Format, ModelRepo, ModelVersion, SourceKind
    from workers.artifacts import ArtifactStore

    incoming = store_root / "incoming.bin"
    sha256 = _write_file(incoming, size_mib)
    target = ArtifactStore(store_root).path_for(sha256)
    target.parent.mkdir(parents=True, exist_ok=True)
    incoming.rename(target)
    actor = system_user()
    suffix = uuid.uuid4().hex[:8]
    repo = ModelRepo.objects.create(name=f"bench-pull-{suffix}", licence="mit")
    artifact, _ = Artifact.objects.get_or_create(sha256=sha256, defaults={"size": size_mib * MIB})
    ModelVersion.objects.create(
        repo=repo,
        number=1,
        artifact=artifact,
        file_name="bench.gguf",
        format=Format.GGUF_MODEL,
        source_kind=SourceKind.UPLOAD,
        created_by=actor,
    )
    secret = worker_credential_issue(actor=actor, name=f"bench-{suffix}").secret
    return sha256, secret


def _wait_for(url: str, process: subprocess.Popen, what: str) -> None:
    import httpx

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"{what} exited ({process.returncode})")
        try:
            httpx.get(url, timeout=1)
            return
        except httpx.HTTPError:
            time.sleep(0.2)
    raise SystemExit(f"{what} did not come up")


def pull_aibox(url: str, token: str, sha256: str, cache: Path) -> dict:
    from workers.inference.cache import ModelCache, RemoteSource

    started = time.perf_counter()
    path = ModelCache(cache, remote=RemoteSource(url, token)).fetch(sha256, Path("/nonexistent"))
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "bytes": path.stat().st_size, "peak_rss_mib": _peak_rss_mib()}


def pull_plain(url: str, target: Path) -> dict:
    import httpx

    started = time.perf_counter()
    with httpx.Client(timeout=60) as client, client.stream("GET", url) as response:
        response.raise_for_status()
        with target.open("wb") as out:
            for chunk in response.iter_raw(MIB):
                out.write(chunk)
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "bytes": target.stat().st_size, "peak_rss_mib": _peak_rss_mib()}


def _in_fresh_process(args: list[str], env: dict[str, str]) -> dict:
    output = subprocess.run(  # noqa: S603 - this script, by its own path
        [sys.executable, __file__, *args], env=env, check=True, capture_output=True, text=True
    ).stdout
    return json.loads(output.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size-mib", type=int, default=2048)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--work-dir", default="", help="Where the store and caches go (tmp).")
    # Internal: one pull in this (fresh) process.
    parser.add_argument("--pull", choices=["aibox", "plain"], help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--sha256", help=argparse.SUPPRESS)
    parser.add_argument("--target", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.pull == "aibox":
        token = os.environ["BENCH_WORKER_TOKEN"]
        print(json.dumps(pull_aibox(args.url, token, args.sha256, Path(args.target))))
        return
    if args.pull == "plain":
        print(json.dumps(pull_plain(args.url, Path(args.target))))
        return

    work = Path(tempfile.mkdtemp(prefix="artifact-pull-", dir=args.work_dir or None))
    store = work / "artifacts"
    store.mkdir()
    os.environ["AIBOX_ARTIFACT_ROOT"] = str(store)
    processes: list[subprocess.Popen] = []
    try:
        print(f"writing and registering a {args.size_mib} MiB file in {store} ...", flush=True)
        sha256, secret = prepare(store, args.size_mib)
        env = {**os.environ, "AIBOX_ARTIFACT_ROOT": str(store), "AIBOX_LOG_LEVEL": "WARNING"}
        aibox_port, plain_port = _free_port(), _free_port()
        uvicorn = subprocess.Popen(  # noqa: S603 - our own interpreter and arguments
            [
                sys.executable,
                "-m",
                "uvicorn",
                "aibox.asgi:application",
                "--host",
                "127.0.0.1",
                "--port",
                str(aibox_port),
                "--lifespan",
                "off",
                "--log-level",
                "warning",
            ],
            cwd=ROOT,
            env=env,
        )
        processes.append(uvicorn)
        served = store / "sha256" / sha256[:2]
        plain = subprocess.Popen(  # noqa: S603 - our own interpreter and arguments
            [sys.executable, "-m", "http.server", str(plain_port), "--bind", "127.0.0.1"],
            cwd=served,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        processes.append(plain)
        aibox_url = f"http://127.0.0.1:{aibox_port}"
        plain_url = f"http://127.0.0.1:{plain_port}/{sha256}"
        _wait_for(f"{aibox_url}/healthz", uvicorn, "uvicorn")
        _wait_for(plain_url.rsplit("/", 1)[0] + "/", plain, "http.server")

        pull_env = {**env, "BENCH_WORKER_TOKEN": secret}
        results: dict[str, list[dict]] = {"aibox": [], "plain": []}
        for run in range(args.repeat):
            for kind in ("plain", "aibox") if run % 2 == 0 else ("aibox", "plain"):
                target = work / f"pull-{kind}"
                shutil.rmtree(target, ignore_errors=True)
                target.unlink(missing_ok=True)
                extra = (
                    ["--url", aibox_url, "--sha256", sha256, "--target", str(target)]
                    if kind == "aibox"
                    else ["--url", plain_url, "--target", str(target)]
                )
                result = _in_fresh_process(["--pull", kind, *extra], pull_env)
                assert result["bytes"] == args.size_mib * MIB, result
                results[kind].append(result)
                rate = args.size_mib / result["seconds"]
                print(
                    f"  run {run + 1} {kind:5}  {result['seconds']:6.2f} s  {rate:7.1f} MiB/s  "
                    f"peak RSS {result['peak_rss_mib']:.0f} MiB",
                    flush=True,
                )
                shutil.rmtree(target, ignore_errors=True)
                target.unlink(missing_ok=True)
        best = {kind: min(rs, key=lambda r: r["seconds"]) for kind, rs in results.items()}
        rates = {kind: args.size_mib / r["seconds"] for kind, r in best.items()}
        print(f"file: {args.size_mib} MiB, best of {args.repeat}")
        print(
            f"aibox  (/internal/v1/artifacts, ModelCache: hashed, resumable): "
            f"{rates['aibox']:.1f} MiB/s, peak RSS {best['aibox']['peak_rss_mib']:.0f} MiB"
        )
        print(
            f"plain  (python -m http.server, httpx to disk, no hash):       "
            f"{rates['plain']:.1f} MiB/s, peak RSS {best['plain']['peak_rss_mib']:.0f} MiB"
        )
        print(f"ratio aibox/plain: {rates['aibox'] / rates['plain']:.2f}x (target >= 0.8x)")
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
