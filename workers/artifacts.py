"""The content-addressed artifact store: files named by their sha256.

Plain Python (no Django), so the control plane and every worker share one
implementation of how artifacts are written, found and verified. Layout under the root:

    sha256/ab/abcdef…   the artifact whose sha256 is abcdef…
    tmp/                staging for files being received (same filesystem: renames are atomic)
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

CHUNK = 1024 * 1024
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class ArtifactError(Exception):
    """A problem with an artifact that the caller can show as is."""


class TooLarge(ArtifactError):
    pass


class IntegrityError(ArtifactError):
    """The file on disk no longer has the sha256 it was stored under."""


@dataclass
class Staged:
    """A received file, hashed, waiting in tmp/ to be committed or discarded."""

    path: Path
    sha256: str
    size: int

    def discard(self) -> None:
        self.path.unlink(missing_ok=True)


class ArtifactStore:
    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.tmp = self.root / "tmp"

    def path_for(self, sha256: str) -> Path:
        if not _SHA256.match(sha256):
            raise ArtifactError(f"Not a sha256 digest: {sha256!r}")
        return self.root / "sha256" / sha256[:2] / sha256

    def exists(self, sha256: str) -> bool:
        return self.path_for(sha256).is_file()

    def new_temp_file(self) -> tuple[int, Path]:
        self.tmp.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=self.tmp, prefix="incoming-")
        return fd, Path(name)

    def prune_staging(self, *, older_than: float) -> list[tuple[str, int]]:
        """Remove files in tmp/ untouched for ``older_than`` seconds; (name, size) of each.

        A receiving process writes its staged file continuously and commits or discards it
        at once, so a file left this long belongs to a process that died mid-way.
        """
        if not self.tmp.is_dir():
            return []
        cutoff = time.time() - older_than
        removed = []
        for entry in os.scandir(self.tmp):
            stat = entry.stat(follow_symlinks=False)
            if entry.is_file(follow_symlinks=False) and stat.st_mtime < cutoff:
                Path(entry.path).unlink(missing_ok=True)
                removed.append((entry.name, stat.st_size))
        return removed

    def stage_chunks(self, chunks: Iterable[bytes], *, max_bytes: int | None = None) -> Staged:
        """Write a stream to tmp/ while hashing it; never holds more than one chunk."""
        fd, path = self.new_temp_file()
        digest, size = hashlib.sha256(), 0
        try:
            with os.fdopen(fd, "wb") as out:
                for chunk in chunks:
                    size += len(chunk)
                    if max_bytes is not None and size > max_bytes:
                        raise TooLarge(f"The file is larger than the limit of {max_bytes:,} bytes.")
                    digest.update(chunk)
                    out.write(chunk)
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        return Staged(path=path, sha256=digest.hexdigest(), size=size)

    def stage_copy(self, source: Path, *, max_bytes: int | None = None) -> Staged:
        """Copy a local file into tmp/, hashing as it goes."""
        if max_bytes is not None and source.stat().st_size > max_bytes:
            raise TooLarge(f"The file is larger than the limit of {max_bytes:,} bytes.")
        with source.open("rb") as fh:
            return self.stage_chunks(iter(lambda: fh.read(CHUNK), b""), max_bytes=max_bytes)

    def stage_in_place(self, path: Path) -> Staged:
        """Stage a file a job wrote inside tmp/ itself: hashed where it is, not copied,
        so a model of many gigabytes is never written twice."""
        if path.parent != self.tmp:
            raise ArtifactError(f"{path} is not in the staging folder {self.tmp}.")
        return Staged(path=path, sha256=file_sha256(path), size=path.stat().st_size)

    def commit(self, staged: Staged) -> tuple[Path, bool]:
        """Move a staged file to its final name; returns (path, newly_stored).

        Identical content is stored once: if the artifact exists, the staged copy is
        dropped. Stored files are read-only.
        """
        final = self.path_for(staged.sha256)
        if final.exists():
            staged.discard()
            return final, False
        final.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(staged.path, 0o444)
        os.replace(staged.path, final)
        return final, True

    def remove(self, sha256: str) -> None:
        self.path_for(sha256).unlink(missing_ok=True)

    def verify(self, sha256: str) -> Path:
        """Re-hash the stored file; raise IntegrityError if it is missing or changed."""
        path = self.path_for(sha256)
        if not path.is_file():
            raise IntegrityError(f"Artifact {sha256[:12]}… is missing from the store.")
        actual = file_sha256(path)
        if actual != sha256:
            raise IntegrityError(
                f"Artifact {sha256[:12]}… has changed on disk (now {actual[:12]}…); refusing it."
            )
        return path


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()
