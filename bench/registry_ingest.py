"""Registry ingest benchmark: upload throughput and server memory for a large GGUF.

Runs AIBox under uvicorn on a free local port (against the real PostgreSQL), uploads a
generated GGUF file of --size-mb through the REST API with a streamed multipart body, and
compares with a plain file copy of the same file measured in the same run. Reports the
server process's peak RSS before and after the upload: it must stay flat (the file is
streamed to disk, never held in memory).

    .venv/bin/python bench/registry_ingest.py            # 2048 MB
    .venv/bin/python bench/registry_ingest.py --size-mb 256
"""

from __future__ import annotations

import argparse
import http.client
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
CHUNK = 1024 * 1024


def make_gguf(path: Path, size_mb: int) -> None:
    from gguf import GGUFWriter

    n = size_mb * CHUNK // 4
    data = np.lib.format.open_memmap(
        path.with_suffix(".npy"), mode="w+", dtype=np.float32, shape=(n,)
    )
    data[::4096] = 1.0  # touch a few pages so the file is not all one value
    writer = GGUFWriter(str(path), arch="llama")
    writer.add_context_length(2048)
    writer.add_block_count(1)
    writer.add_embedding_length(64)
    writer.add_tensor("token_embd.weight", data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file(progress=False)
    writer.close()
    del data
    path.with_suffix(".npy").unlink()


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def django_setup(env: dict[str, str]) -> tuple[str, str]:
    """Create an admin key and an empty repo in the benchmark database."""
    os.environ.update(env)
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "aibox.settings")
    import django

    django.setup()
    from django.core.management import call_command

    call_command("db_create", verbosity=0)
    call_command("migrate", verbosity=0)
    from apps.accounts.models import Role, User
    from apps.accounts.services import api_key_create, system_user
    from apps.registry.models import ModelRepo
    from apps.registry.services import model_repo_create

    admin, _ = User.objects.get_or_create(username="bench-admin", defaults={"role": Role.ADMIN})
    key = api_key_create(actor=admin, owner=admin, name="bench", scopes=["admin"])
    name = f"bench-{int(time.time())}"
    if not ModelRepo.objects.filter(name=name).exists():
        model_repo_create(actor=system_user(), name=name, licence="mit")
    return key.secret, name


def upload(port: int, secret: str, repo: str, path: Path) -> tuple[int, bytes, float]:
    boundary = "aiboxbenchboundary"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{path.name}"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    tail = f"\r\n--{boundary}--\r\n".encode()
    length = len(head) + path.stat().st_size + len(tail)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    start = time.perf_counter()
    conn.putrequest("POST", f"/api/v1/registry/repos/{repo}/versions/")
    conn.putheader("Authorization", f"Bearer {secret}")
    conn.putheader("Content-Type", f"multipart/form-data; boundary={boundary}")
    conn.putheader("Content-Length", str(length))
    conn.endheaders()
    conn.send(head)
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(CHUNK), b""):
            conn.send(block)
    conn.send(tail)
    response = conn.getresponse()
    body = response.read()
    return response.status, body, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size-mb", type=int, default=2048)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="aibox-bench-", dir=ROOT / "var"))
    env = {
        "AIBOX_ARTIFACT_ROOT": str(work / "artifacts"),
        "AIBOX_UPLOAD_MAX_BYTES": str((args.size_mb + 64) * CHUNK),
        "DATABASE_URL": os.environ.get(
            "DATABASE_URL", "postgres://postgres@127.0.0.1:5432/aibox_bench"
        ),
    }
    try:
        print(f"Generating a {args.size_mb} MB GGUF file…", flush=True)
        source = work / "big.gguf"
        make_gguf(source, args.size_mb)
        size = source.stat().st_size

        print("Baseline: plain file copy…", flush=True)
        start = time.perf_counter()
        shutil.copyfile(source, work / "copy.gguf")
        os.sync()
        copy_s = time.perf_counter() - start
        (work / "copy.gguf").unlink()

        secret, repo = django_setup(env)
        port = free_port()
        server = subprocess.Popen(  # noqa: S603 - our own interpreter and module
            [
                sys.executable,
                "-m",
                "uvicorn",
                "aibox.asgi:application",
                "--port",
                str(port),
                "--lifespan",
                "off",
                "--log-level",
                "warning",
            ],
            cwd=ROOT,
            env={**os.environ, **env},
        )
        try:
            for _ in range(100):
                try:
                    http.client.HTTPConnection("127.0.0.1", port, timeout=1).request(
                        "GET", "/healthz"
                    )
                    break
                except OSError:
                    time.sleep(0.2)
            # Warm the process (imports, DB connection) so the peak measures the upload.
            conn = http.client.HTTPConnection("127.0.0.1", port)
            conn.request("GET", "/api/v1/me", headers={"Authorization": f"Bearer {secret}"})
            conn.getresponse().read()
            rss_before = peak_rss_mib(server.pid)
            print("AIBox: streamed upload through the REST API…", flush=True)
            status, body, upload_s = upload(port, secret, repo, source)
            os.sync()
            rss_after = peak_rss_mib(server.pid)
        finally:
            server.terminate()
            server.wait(timeout=30)
        if status != 201:
            sys.exit(f"upload failed: HTTP {status} {body[:300]!r}")

        mb = size / CHUNK
        print()
        print(f"file size                       {mb:10.0f} MiB")
        print(f"plain copy                      {mb / copy_s:10.1f} MiB/s  ({copy_s:.1f} s)")
        print(f"AIBox upload (HTTP, hash, GGUF) {mb / upload_s:10.1f} MiB/s  ({upload_s:.1f} s)")
        print(f"ratio upload / copy             {copy_s / upload_s:10.2f}")
        print(f"server peak RSS before upload   {rss_before:10.0f} MiB")
        growth = rss_after - rss_before
        print(f"server peak RSS after upload    {rss_after:10.0f} MiB  (+{growth:.0f} MiB)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
