"""The worker's local model cache: files named by sha256, verified before they load.

A file comes in one of two ways:

- From the artifact store on a shared filesystem (no ``remote``): a hard link when both
  are on one filesystem, else a copy; then hashed.
- Over HTTP from the control plane (``remote``: a worker on another host, with no shared
  disk): ``GET <url>/internal/v1/artifacts/<sha256>`` with the worker's credential,
  streamed into a ``.part`` file and hashed as it is written. A dropped connection
  resumes with a ``Range`` request; a finished file whose hash does not match is deleted
  and pulled again, and after ``PULL_TRIES`` mismatches the load fails.

A file whose hash does not match is deleted and refused, so llama.cpp never loads bytes
that differ from the approved version.

With a size limit (``max_bytes``), room for a new file is made by deleting the least
recently used files that no loaded replica holds (``in_use``, which the runtime passes
in); a file that cannot fit fails the load, naming the sizes.
"""

from __future__ import annotations

import hashlib
import logging
import os
import queue
import re
import shutil
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import httpx

from workers.artifacts import ArtifactError, IntegrityError, file_sha256

log = logging.getLogger(__name__)

CHUNK = 1024 * 1024
# Whole transfers of a file whose hash did not match, before the load fails.
PULL_TRIES = 3
# Resumptions (Range requests) of one transfer after a dropped connection.
RESUME_TRIES = 5
RESUME_BACKOFF_SECONDS = 0.5
_CACHED_NAME = re.compile(r"^[0-9a-f]{64}$")


class CacheError(ArtifactError):
    """A file could not be brought into the cache (no room, refused, unreachable); the
    message is fit to show as the load's reason."""


@dataclass(frozen=True)
class RemoteSource:
    """The control plane's artifact endpoint and this worker's credential."""

    url: str
    token: str
    timeout: float = 60.0

    def artifact_url(self, sha256: str) -> str:
        return f"{self.url.rstrip('/')}/internal/v1/artifacts/{sha256}"

    def __repr__(self) -> str:  # never print the token
        return f"RemoteSource(url={self.url!r})"


class _HashingWriter:
    """Writes and hashes received chunks on a thread of its own, so that the next chunk
    is received meanwhile (file writes and hashing release the GIL). At most
    ``QUEUED_CHUNKS`` chunks wait: memory stays flat whatever the file's size."""

    QUEUED_CHUNKS = 8

    def __init__(self, out: BinaryIO) -> None:
        self.out = out
        self.digest = hashlib.sha256()
        self.error: BaseException | None = None
        self._queue: queue.Queue[bytes | None] = queue.Queue(maxsize=self.QUEUED_CHUNKS)
        self._thread = threading.Thread(target=self._run, name="cache-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            chunk = self._queue.get()
            try:
                if chunk is None:
                    return
                if self.error is None:
                    self.out.write(chunk)
                    self.digest.update(chunk)
            except BaseException as exc:  # noqa: BLE001 - raised in the receiving thread
                self.error = exc
            finally:
                self._queue.task_done()

    def put(self, chunk: bytes) -> None:
        if self.error is not None:
            raise self.error
        self._queue.put(chunk)

    def restart(self) -> None:
        """Drop what was written: the file starts again from byte 0."""
        self._queue.join()
        self.out.seek(0)
        self.out.truncate()
        self.digest = hashlib.sha256()

    def close(self) -> str:
        """Wait for the queued chunks; the hex sha256 of everything written."""
        self._queue.put(None)
        self._thread.join()
        if self.error is not None:
            raise self.error
        return self.digest.hexdigest()


class ModelCache:
    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        remote: RemoteSource | None = None,
        max_bytes: int = 0,
        in_use: Callable[[], Iterable[str]] = frozenset,
    ) -> None:
        self.root = Path(root)
        self.remote = remote
        self.max_bytes = max_bytes
        # The sha256s that loaded (or loading) replicas hold: never evicted.
        self.in_use = in_use
        self._lock = threading.Lock()
        # Files hashed by this process: (sha256) -> (size, mtime_ns) at verification.
        self._verified: dict[str, tuple[int, int]] = {}

    def path_for(self, sha256: str) -> Path:
        return self.root / sha256[:2] / sha256

    def fetch(self, sha256: str, source: Path) -> Path:
        """Return a verified local copy of the artifact ``sha256``: pulled from the control
        plane when the cache has a ``remote``, else copied from ``source`` (its path in a
        shared artifact store)."""
        with self._lock:
            local = self.path_for(sha256)
            if not local.is_file():
                if self.remote is not None:
                    self._pull(sha256, local)
                else:
                    self._copy_in(source, local, sha256)
            stat = local.stat()
            self._touch(local, stat)
            if self._verified.get(sha256) == (stat.st_size, stat.st_mtime_ns):
                return local
            actual = file_sha256(local)
            if actual != sha256:
                local.unlink(missing_ok=True)
                raise IntegrityError(
                    f"The model file {sha256[:12]}… changed (it hashes to {actual[:12]}…); "
                    "refusing to load it."
                )
            self._verified[sha256] = (stat.st_size, stat.st_mtime_ns)
            return local

    # --- the shared filesystem --------------------------------------------------------

    def _copy_in(self, source: Path, local: Path, sha256: str) -> None:
        if not source.is_file():
            raise IntegrityError(f"The model file {source.name[:12]}… is missing from the store.")
        self._make_room(sha256, source.stat().st_size)
        local.parent.mkdir(parents=True, exist_ok=True)
        tmp = local.with_name(f".{local.name}.{os.getpid()}.part")
        try:
            try:
                os.link(source, tmp)
            except OSError:  # another filesystem, or links not allowed: copy
                shutil.copyfile(source, tmp)
            os.replace(tmp, local)
        finally:
            tmp.unlink(missing_ok=True)

    # --- over HTTP --------------------------------------------------------------------

    def _pull(self, sha256: str, local: Path) -> None:
        remote = self.remote
        assert remote is not None
        url = remote.artifact_url(sha256)
        headers = {"Authorization": f"Bearer {remote.token}"}
        with httpx.Client(timeout=httpx.Timeout(remote.timeout, connect=10.0)) as client:
            size = self._remote_size(client, url, headers, sha256)
            self._make_room(sha256, size)
            local.parent.mkdir(parents=True, exist_ok=True)
            part = local.with_name(f".{local.name}.{os.getpid()}.part")
            try:
                for attempt in range(1, PULL_TRIES + 1):
                    digest = self._transfer(client, url, headers, part, size, sha256)
                    if digest == sha256:
                        os.replace(part, local)
                        stat = local.stat()
                        # Hashed as it was written: no second pass over the file.
                        self._verified[sha256] = (stat.st_size, stat.st_mtime_ns)
                        return
                    part.unlink(missing_ok=True)
                    log.warning(
                        "pulled %s… but it hashes to %s… (transfer %d of %d); pulling it again",
                        sha256[:12],
                        digest[:12],
                        attempt,
                        PULL_TRIES,
                    )
            finally:
                part.unlink(missing_ok=True)
        # The transfer, not the stored file, is at fault (the control plane serves what it
        # verified): a CacheError fails this load without marking the artifact as damaged.
        raise CacheError(
            f"The model file {sha256[:12]}… arrived corrupted {PULL_TRIES} times in a row from "
            f"{remote.url} (its sha256 never matched); refusing to load it."
        )

    def _remote_size(
        self, client: httpx.Client, url: str, headers: dict[str, str], sha256: str
    ) -> int:
        try:
            response = client.head(url, headers=headers)
        except httpx.HTTPError as exc:
            raise CacheError(
                f"Could not reach the control plane at {self.remote.url} to pull the model "
                f"file {sha256[:12]}…: {exc}"
            ) from exc
        if response.status_code != 200:
            # A HEAD's refusal has no body: ask again with a GET for the message.
            with client.stream("GET", url, headers=headers) as refusal:
                if refusal.status_code >= 300:
                    refusal.read()
                    self._check_status(refusal, sha256, (200,))
            self._check_status(response, sha256, (200,))
        return int(response.headers["Content-Length"])

    def _check_status(self, response: httpx.Response, sha256: str, ok: tuple[int, ...]) -> None:
        if response.status_code in ok:
            return
        try:
            detail = response.json().get("detail", "")
        except ValueError:
            detail = ""
        if response.status_code == 401:
            raise CacheError(
                "The control plane refused this worker's credential (AIBOX_WORKER_TOKEN): "
                f"{detail or 'unauthorised'}"
            )
        raise CacheError(
            f"The control plane answered {response.status_code} for the model file "
            f"{sha256[:12]}…" + (f": {detail}" if detail else ".")
        )

    def _transfer(
        self,
        client: httpx.Client,
        url: str,
        headers: dict[str, str],
        part: Path,
        size: int,
        sha256: str,
    ) -> str:
        """Stream the file into ``part``, hashing as it goes, resuming a dropped
        connection from where it stopped; return the hex sha256 of what arrived."""
        written = 0
        drops = 0
        with part.open("wb") as out:
            sink = _HashingWriter(out)
            try:
                while written < size:
                    request_headers = dict(headers)
                    if written:
                        request_headers["Range"] = f"bytes={written}-"
                    try:
                        with client.stream("GET", url, headers=request_headers) as response:
                            if written and response.status_code == 200:
                                # The server ignored the range: start again from byte 0.
                                sink.restart()
                                written = 0
                            elif response.status_code not in (200, 206):
                                response.read()
                                self._check_status(response, sha256, (200, 206))
                            for chunk in response.iter_raw(CHUNK):
                                sink.put(chunk)
                                written += len(chunk)
                        if written < size:
                            raise httpx.RemoteProtocolError("the body ended early")
                    except httpx.TransportError as exc:
                        drops += 1
                        if drops > RESUME_TRIES:
                            raise CacheError(
                                f"Pulling the model file {sha256[:12]}… from {self.remote.url} "
                                f"failed: the connection dropped {drops} times (last: {exc})."
                            ) from exc
                        log.warning(
                            "pulling %s… dropped at %d of %d bytes (%s); resuming",
                            sha256[:12],
                            written,
                            size,
                            exc,
                        )
                        time.sleep(RESUME_BACKOFF_SECONDS * drops)
            finally:
                digest = sink.close()
        return digest

    # --- size limit -------------------------------------------------------------------

    def _cached_files(self) -> list[tuple[Path, os.stat_result]]:
        files = []
        if not self.root.is_dir():
            return files
        for prefix in self.root.iterdir():
            if not prefix.is_dir():
                continue
            for path in prefix.iterdir():
                if _CACHED_NAME.match(path.name):
                    try:
                        files.append((path, path.stat()))
                    except FileNotFoundError:
                        continue
        return files

    def _make_room(self, sha256: str, size: int) -> None:
        """Evict least recently used files no replica holds until ``size`` bytes fit."""
        if not self.max_bytes:
            return
        keep = set(self.in_use()) | {sha256}
        files = self._cached_files()
        total = sum(stat.st_size for _, stat in files)
        held = sum(stat.st_size for path, stat in files if path.name in keep)
        if held + size > self.max_bytes:
            raise CacheError(
                f"The model file {sha256[:12]}… ({size:,} bytes) does not fit in the model "
                f"cache: its limit (AIBOX_MODEL_CACHE_MAX_BYTES) is {self.max_bytes:,} bytes "
                f"and loaded replicas hold {held:,} bytes of it."
            )
        evictable = sorted(
            ((path, stat) for path, stat in files if path.name not in keep),
            key=lambda item: item[1].st_atime_ns,
        )
        for path, stat in evictable:
            if total + size <= self.max_bytes:
                break
            log.info("evicting %s… (%d bytes) from the model cache", path.name[:12], stat.st_size)
            path.unlink(missing_ok=True)
            self._verified.pop(path.name, None)
            total -= stat.st_size

    @staticmethod
    def _touch(local: Path, stat: os.stat_result) -> None:
        # The access time orders eviction (least recently used first); the modification
        # time stays, as verification is keyed on it.
        os.utime(local, ns=(time.time_ns(), stat.st_mtime_ns))


def pull_by_sha256(
    root: str | os.PathLike[str], remote: RemoteSource, *, max_bytes: int, keep: Iterable[str]
) -> Callable[[str], Path]:
    """The fetch of a job's inputs on a worker with no shared store: each sha256 pulled
    from the control plane into the cache at ``root`` and verified. That is the host's
    model cache, which serving workers there use too; its size limit evicts the least
    recently used files but ``keep`` (the job's inputs), and a replica that loaded an
    evicted file keeps it open, a later load pulling it again."""
    kept = frozenset(keep)
    cache = ModelCache(root, remote=remote, max_bytes=max_bytes, in_use=lambda: kept)
    return lambda sha256: cache.fetch(sha256, Path(os.devnull))
