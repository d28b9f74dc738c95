"""The worker's model cache: the shared-filesystem copy, the size limit and its eviction,
and pulling over HTTP (resumed after a dropped connection) from a real local server."""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from workers.artifacts import IntegrityError
from workers.inference.cache import CacheError, ModelCache, RemoteSource


def artifact(directory: Path, size: int, fill: bytes) -> tuple[str, Path]:
    data = (fill * size)[:size]
    sha256 = hashlib.sha256(data).hexdigest()
    path = directory / sha256
    path.write_bytes(data)
    return sha256, path


@pytest.fixture
def store(tmp_path) -> Path:
    directory = tmp_path / "store"
    directory.mkdir()
    return directory


def age(cache: ModelCache, sha256: str, seconds_ago: int) -> None:
    path = cache.path_for(sha256)
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns - seconds_ago * 10**9, stat.st_mtime_ns))


def test_without_a_limit_or_a_remote_it_copies_from_the_store(store, tmp_path):
    sha256, source = artifact(store, 1000, b"a")
    cache = ModelCache(tmp_path / "cache")
    local = cache.fetch(sha256, source)
    assert local == tmp_path / "cache" / sha256[:2] / sha256
    assert local.read_bytes() == source.read_bytes()
    assert local.stat().st_ino == source.stat().st_ino  # a hard link on one filesystem


def test_a_changed_file_is_refused_and_deleted(store, tmp_path):
    sha256, source = artifact(store, 1000, b"a")
    cache = ModelCache(tmp_path / "cache")
    local = cache.fetch(sha256, source)
    local.unlink()
    local.write_bytes(b"b" * 1000)
    cache._verified.clear()  # another process start
    with pytest.raises(IntegrityError, match="changed"):
        cache.fetch(sha256, source)
    assert not local.exists()


def test_the_least_recently_used_file_is_evicted_to_make_room(store, tmp_path):
    cache = ModelCache(tmp_path / "cache", max_bytes=2500)
    old, old_source = artifact(store, 1000, b"o")
    recent, recent_source = artifact(store, 1000, b"r")
    cache.fetch(old, old_source)
    cache.fetch(recent, recent_source)
    age(cache, old, 100)
    age(cache, recent, 10)
    new, new_source = artifact(store, 1000, b"n")
    cache.fetch(new, new_source)
    assert not cache.path_for(old).exists()
    assert cache.path_for(recent).exists() and cache.path_for(new).exists()


def test_using_a_file_makes_it_recent(store, tmp_path):
    cache = ModelCache(tmp_path / "cache", max_bytes=2500)
    first, first_source = artifact(store, 1000, b"1")
    second, second_source = artifact(store, 1000, b"2")
    cache.fetch(first, first_source)
    cache.fetch(second, second_source)
    age(cache, first, 100)
    age(cache, second, 50)
    cache.fetch(first, first_source)  # used again: now the most recent
    third, third_source = artifact(store, 1000, b"3")
    cache.fetch(third, third_source)
    assert cache.path_for(first).exists()
    assert not cache.path_for(second).exists()


def test_files_that_loaded_replicas_hold_are_never_evicted(store, tmp_path):
    held: set[str] = set()
    cache = ModelCache(tmp_path / "cache", max_bytes=2500, in_use=lambda: held)
    loaded, loaded_source = artifact(store, 1000, b"l")
    idle, idle_source = artifact(store, 1000, b"i")
    cache.fetch(loaded, loaded_source)
    cache.fetch(idle, idle_source)
    held.add(loaded)
    age(cache, loaded, 100)  # the oldest, but in use
    new, new_source = artifact(store, 1000, b"n")
    cache.fetch(new, new_source)
    assert cache.path_for(loaded).exists()
    assert not cache.path_for(idle).exists()


def test_a_file_that_cannot_fit_fails_naming_the_sizes_and_evicts_nothing(store, tmp_path):
    held: set[str] = set()
    cache = ModelCache(tmp_path / "cache", max_bytes=2500, in_use=lambda: held)
    loaded, loaded_source = artifact(store, 1500, b"l")
    idle, idle_source = artifact(store, 500, b"i")
    cache.fetch(loaded, loaded_source)
    cache.fetch(idle, idle_source)
    held.add(loaded)
    big, big_source = artifact(store, 1200, b"b")
    with pytest.raises(CacheError) as failure:
        cache.fetch(big, big_source)
    message = str(failure.value)
    assert "1,200 bytes" in message and "2,500 bytes" in message and "1,500 bytes" in message
    assert "AIBOX_MODEL_CACHE_MAX_BYTES" in message
    assert cache.path_for(idle).exists()  # nothing evicted for a file that cannot fit
    assert not cache.path_for(big).exists()


def test_a_file_larger_than_the_whole_limit_is_refused(store, tmp_path):
    cache = ModelCache(tmp_path / "cache", max_bytes=100)
    sha256, source = artifact(store, 1000, b"x")
    with pytest.raises(CacheError, match="does not fit"):
        cache.fetch(sha256, source)


# --- over HTTP, from a real server ---------------------------------------------------


class ArtifactServer(ThreadingHTTPServer):
    """Serves files by sha256 with Range, checking the bearer token; it can cut the
    first transfer short (a dropped connection) or corrupt the first transfers."""

    daemon_threads = True

    def __init__(self, files: dict[str, bytes], token: str) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.files, self.token = files, token
        self.drop_first_after: int | None = None
        self.corrupt_transfers = 0
        self.ranges: list[str] = []


class Handler(BaseHTTPRequestHandler):
    server: ArtifactServer

    def log_message(self, *args) -> None:
        pass

    def _answer(self, head: bool) -> None:
        if self.headers.get("Authorization") != f"Bearer {self.server.token}":
            self.send_response(401)
            body = b'{"detail": "Unknown worker credential."}'
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        data = self.server.files[self.path.rsplit("/", 1)[-1]]
        first = 0
        requested = self.headers.get("Range", "")
        if not head:
            self.server.ranges.append(requested)
        if requested:
            first = int(requested.removeprefix("bytes=").rstrip("-"))
        body = data[first:]
        self.send_response(206 if requested else 200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if head:
            return
        if not requested and self.server.corrupt_transfers:
            self.server.corrupt_transfers -= 1
            body = bytes([body[0] ^ 0xFF]) + body[1:]
        if self.server.drop_first_after is not None:
            cut, self.server.drop_first_after = self.server.drop_first_after, None
            self.wfile.write(body[:cut])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)

    def do_HEAD(self) -> None:  # noqa: N802 - http.server's name
        self._answer(head=True)

    def do_GET(self) -> None:  # noqa: N802
        self._answer(head=False)


@pytest.fixture
def server() -> Iterator[ArtifactServer]:
    data = os.urandom(3 * 1024 * 1024 + 17)
    sha256 = hashlib.sha256(data).hexdigest()
    instance = ArtifactServer({sha256: data}, token="aibw_test")
    instance.sha256, instance.data = sha256, data
    thread = threading.Thread(target=instance.serve_forever, daemon=True)
    thread.start()
    yield instance
    instance.shutdown()
    instance.server_close()


def remote_cache(tmp_path: Path, server: ArtifactServer, token: str = "aibw_test") -> ModelCache:  # noqa: S107
    url = f"http://127.0.0.1:{server.server_address[1]}"
    return ModelCache(tmp_path / "cache", remote=RemoteSource(url, token))


def test_a_remote_pull_resumes_a_dropped_connection_with_a_range(server, tmp_path):
    server.drop_first_after = 1024 * 1024 + 5
    cache = remote_cache(tmp_path, server)
    local = cache.fetch(server.sha256, Path("/nonexistent/store/path"))
    assert local.read_bytes() == server.data
    # Resumed from what had been written (whole chunks), not from byte 0.
    assert len(server.ranges) == 2 and server.ranges[0] == ""
    assert 0 < int(server.ranges[1].removeprefix("bytes=").rstrip("-")) <= 1024 * 1024 + 5
    assert not list(local.parent.glob("*.part"))


def test_a_corrupted_pull_is_pulled_again(server, tmp_path):
    server.corrupt_transfers = 1
    cache = remote_cache(tmp_path, server)
    local = cache.fetch(server.sha256, Path("/nonexistent"))
    assert hashlib.sha256(local.read_bytes()).hexdigest() == server.sha256
    assert server.ranges == ["", ""]


def test_a_pull_corrupted_every_time_fails_and_leaves_nothing(server, tmp_path):
    """A transfer error, not the stored file's: the load fails with the reason, and the
    artifact is not reported as damaged (that is IntegrityError's meaning)."""
    server.corrupt_transfers = 10
    cache = remote_cache(tmp_path, server)
    with pytest.raises(CacheError, match="corrupted 3 times") as info:
        cache.fetch(server.sha256, Path("/nonexistent"))
    assert not isinstance(info.value, IntegrityError)
    assert len(server.ranges) == 3
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]


def test_a_refused_credential_fails_clearly(server, tmp_path):
    cache = remote_cache(tmp_path, server, token="aibw_wrong")
    with pytest.raises(CacheError, match="refused this worker's credential"):
        cache.fetch(server.sha256, Path("/nonexistent"))


def test_the_token_is_not_in_the_remotes_repr():
    assert "secret" not in repr(RemoteSource("http://cp", "aibw_secret"))
