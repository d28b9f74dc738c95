"""The worker's local model cache: files named by sha256, verified before they load.

A worker may sit on another machine than the artifact store; it copies an artifact
into its own cache once (a hard link when both are on one filesystem) and hashes the
copy. A file whose hash does not match is deleted and refused, so llama.cpp never
loads bytes that differ from the approved version.
"""

from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path

from workers.artifacts import IntegrityError, file_sha256


class ModelCache:
    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self._lock = threading.Lock()
        # Files hashed by this process: (sha256) -> (size, mtime_ns) at verification.
        self._verified: dict[str, tuple[int, int]] = {}

    def path_for(self, sha256: str) -> Path:
        return self.root / sha256[:2] / sha256

    def fetch(self, sha256: str, source: Path) -> Path:
        """Return a verified local copy of ``source``, whose content must hash to ``sha256``."""
        with self._lock:
            local = self.path_for(sha256)
            if not local.is_file():
                self._copy_in(source, local)
            stat = local.stat()
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

    def _copy_in(self, source: Path, local: Path) -> None:
        if not source.is_file():
            raise IntegrityError(f"The model file {source.name[:12]}… is missing from the store.")
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
