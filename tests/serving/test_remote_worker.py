"""A serving worker on "another host": no shared disk, no database, its own credential.

One more Celery worker process, started once for the module, with an empty cache, an
empty artifact root (the store is not there), a DATABASE_URL that reaches nothing, its
own hostname and secret key, and ``AIBOX_CONTROL_PLANE_URL`` pointing at a small TCP
proxy in front of the stack's uvicorn. The proxy counts the worker's artifact
transfers and, when told, flips one byte of the next transfer's body.

The tests share that worker and run in file order; the last revokes its credential.
"""

from __future__ import annotations

import contextlib
import secrets
import shutil
import socket
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from django.test import Client

from apps.audit.models import AuditEvent
from apps.deployments import services
from apps.deployments.credentials import worker_credential_issue, worker_credential_revoke
from apps.deployments.models import State
from tests.live import start_celery_worker, stop_processes
from tests.serving.conftest import wait_for_state
from workers.artifacts import file_sha256

# Where in a transfer's byte stream (headers included) the proxy flips a byte: well into
# the model file's body.
CORRUPT_AT = 1_000_000


class ArtifactProxy:
    """A TCP proxy (threads and sockets) between the remote worker and the web server."""

    def __init__(self, upstream: str) -> None:
        parts = urlsplit(upstream)
        self.upstream = (parts.hostname, parts.port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.transfers = 0
        self.corrupt_next = False
        self.corrupted = 0
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self.listener.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.upstream)
            # Bytes sent down this connection so far, and where to corrupt one (if asked).
            state: dict[str, int | None] = {"down": 0, "corrupt_at": None}
            threading.Thread(target=self._up, args=(client, upstream, state), daemon=True).start()
            threading.Thread(target=self._down, args=(upstream, client, state), daemon=True).start()

    def _up(self, source: socket.socket, target: socket.socket, state: dict) -> None:
        try:
            while data := source.recv(65536):
                if data.startswith(b"GET /internal/v1/artifacts/"):
                    with self._lock:
                        self.transfers += 1
                        if self.corrupt_next:
                            self.corrupt_next = False
                            # The client sends a GET only after reading the previous
                            # answer, so everything after this point is this GET's.
                            state["corrupt_at"] = state["down"] + CORRUPT_AT
                target.sendall(data)
        except OSError:
            pass
        finally:
            _close(source, target)

    def _down(self, source: socket.socket, target: socket.socket, state: dict) -> None:
        try:
            while data := source.recv(65536):
                at, start = state["corrupt_at"], state["down"]
                if at is not None and start <= at < start + len(data):
                    data = bytearray(data)
                    data[at - start] ^= 0xFF
                    state["corrupt_at"] = None
                    with self._lock:
                        self.corrupted += 1
                state["down"] = start + len(data)
                target.sendall(data)
        except OSError:
            pass
        finally:
            _close(source, target)


def _close(*sockets: socket.socket) -> None:
    for sock in sockets:
        with contextlib.suppress(OSError):
            sock.close()


@dataclass
class Remote:
    name: str
    cache: Path
    proxy: ArtifactProxy
    credential: object

    def cached_file(self, sha256: str) -> Path:
        return self.cache / sha256[:2] / sha256

    def forget(self) -> None:
        """Empty its cache, so the next load pulls again."""
        shutil.rmtree(self.cache, ignore_errors=True)
        self.cache.mkdir()


@pytest.fixture(scope="module")
def remote(stack, tmp_path_factory) -> Iterator[Remote]:
    base = tmp_path_factory.mktemp("otherhost")
    cache, empty_store = base / "model-cache", base / "artifacts"
    cache.mkdir()
    empty_store.mkdir()
    suffix = uuid.uuid4().hex[:6]
    name = f"remote-{suffix}@otherhost"
    issued = worker_credential_issue(actor=stack.admin, name=name)
    proxy = ArtifactProxy(stack.url)
    env = {
        **stack.env,
        "AIBOX_MODEL_CACHE_DIR": str(cache),
        "AIBOX_ARTIFACT_ROOT": str(empty_store),
        # Nothing answers there: a serving worker needs no database.
        "DATABASE_URL": "postgres://nobody@127.0.0.1:1/none",
        # Nor the control plane's secret key.
        "AIBOX_SECRET_KEY": secrets.token_hex(24),
        "AIBOX_CONTROL_PLANE_URL": proxy.url,
        "AIBOX_WORKER_TOKEN": issued.secret,
    }
    log = stack.logs / f"remote-{suffix}.log"
    # Only its own queue (and Celery's worker-direct one): the default queue's tasks are
    # the control plane's, which need the database.
    process = start_celery_worker(env=env, name=name, log=log, queues=f"remote-{suffix}")
    try:
        yield Remote(name=name, cache=cache, proxy=proxy, credential=issued.credential)
    finally:
        stop_processes([process])
        proxy.close()
        assert issued.secret not in log.read_text(errors="replace"), "the token was logged"


def _stop(stack, deployment) -> None:
    services.deployment_stop(actor=stack.admin, deployment=deployment)
    wait_for_state(deployment, State.STOPPED)


def test_a_worker_on_another_host_pulls_its_model_and_serves(stack, remote):
    sha256 = stack.version.sha256
    remote.forget()
    remote.proxy.transfers = 0
    deployment = stack.deploy("gemma-remote", context_length=512, placement_worker=remote.name)
    assert deployment.replica_set.get().worker == remote.name
    cached = remote.cached_file(sha256)
    assert file_sha256(cached) == sha256
    assert cached.stat().st_nlink == 1  # pulled, not a link into the store
    assert remote.proxy.transfers == 1
    assert AuditEvent.objects.filter(
        action="artifact.pulled", target_id=sha256, actor_label=f"worker:{remote.name}"
    ).exists()

    reply = httpx.post(
        f"{stack.url}/v1/completions",
        headers={"Authorization": f"Bearer {stack.key()}"},
        json={"model": "gemma-remote", "prompt": "The capital of France is", "max_tokens": 4},
        timeout=60,
    )
    assert reply.status_code == 200, reply.text
    assert reply.json()["choices"][0]["text"]

    workers = httpx.get(
        f"{stack.url}/api/v1/workers/", headers={"Authorization": f"Bearer {stack.key()}"}
    ).json()
    listed = next(w for w in workers if w["hostname"] == remote.name)
    assert listed["online"] and listed["serving"]
    assert listed["cpu_cores"] > 0 and listed["ram_total_mib"] > 0
    assert [r["deployment"] for r in listed["replicas"]] == ["gemma-remote"]
    page = Client()
    page.force_login(stack.admin)
    assert remote.name in page.get("/deployments/workers/").content.decode()
    _stop(stack, deployment)


def test_a_corrupted_transfer_is_detected_and_pulled_again(stack, remote):
    sha256 = stack.version.sha256
    remote.forget()
    remote.proxy.transfers = 0
    remote.proxy.corrupt_next = True
    deployment = stack.deploy("gemma-remote-2", context_length=512, placement_worker=remote.name)
    assert remote.proxy.corrupted == 1
    assert remote.proxy.transfers == 2  # the corrupted one, then a good one
    assert file_sha256(remote.cached_file(sha256)) == sha256
    assert not list(remote.cache.rglob("*.part"))
    _stop(stack, deployment)


def test_a_revoked_credential_fails_the_load_clearly(stack, remote):
    remote.forget()
    worker_credential_revoke(actor=stack.admin, credential=remote.credential)
    deployment = services.deployment_create(
        actor=stack.admin,
        name="gemma-revoked",
        model_version=stack.version,
        context_length=512,
        placement_worker=remote.name,
    )
    wait_for_state(deployment, State.FAILED)
    reason = deployment.replica_set.get().state_reason
    assert "refused this worker's credential" in reason and "revoked" in reason, reason
    assert not list(remote.cache.rglob("*"))  # refused before a byte came in
    services.deployment_stop(actor=stack.admin, deployment=deployment)
