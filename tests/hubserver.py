"""A small Hugging Face Hub for tests: a real HTTP server speaking the part of the hub's
protocol that huggingface_hub 2.4 uses to resolve and download one file.

- ``GET /api/models/<id>/revision/<rev>`` (and ``/api/datasets/...``): repo info with
  ``sha``, ``cardData``, ``tags``, ``gated`` and ``siblings`` (with ``size``, ``blobId``
  and ``lfs: {sha256, size, pointerSize}`` when asked for ``blobs``).
- ``HEAD``/``GET /<id>/resolve/<rev>/<path>`` (and ``/datasets/<id>/resolve/...``): as on
  the hub, an LFS file answers 302 to a CDN on another host (here ``localhost`` instead of
  ``127.0.0.1``) with ``X-Repo-Commit``, ``X-Linked-Etag`` and ``X-Linked-Size``; a file
  kept in git answers 200 with ``ETag`` and ``X-Repo-Commit``. The CDN honours ``Range``.
- Errors carry the hub's ``X-Error-Code`` (``RepoNotFound``, ``RevisionNotFound``,
  ``EntryNotFound``, ``GatedRepo``), which the client turns into its exception types.
- A gated repo's files need ``Authorization: Bearer <token>``; its info stays public.

Tests build repos with ``add_file``; every call is a new commit on the branch.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

# Hub paths: repo ids are owner/name; revisions arrive URL-quoted ("refs%2Fpr%2F1").
_INFO = re.compile(r"^/api/(models|datasets)/([^/]+/[^/]+)(?:/revision/([^/]+))?$")
_RESOLVE = re.compile(r"^(/datasets)?/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$")
_CDN = re.compile(r"^/_cdn/([0-9a-f]{64})$")


@dataclass
class HubFile:
    data: bytes
    lfs: bool
    sha256: str  # what the hub announces: the real one unless a test makes it lie

    @property
    def git_oid(self) -> str:
        # Git's object id, as the hub gives for files kept in git (and LFS pointers).
        blob = b"blob %d\0" % len(self.data) + self.data
        return hashlib.sha1(blob, usedforsecurity=False).hexdigest()


@dataclass
class HubRepo:
    repo_type: str
    repo_id: str
    licence: str | None
    gated_token: str | None
    branches: dict[str, str] = field(default_factory=dict)  # branch → commit
    commits: dict[str, dict[str, HubFile]] = field(default_factory=dict)  # commit → files


@dataclass
class Seen:
    method: str
    path: str
    host: str
    authorization: str | None


class FakeHub:
    """Start with ``start()``; ``url`` is the endpoint to give the client."""

    def __init__(self) -> None:
        self.repos: dict[tuple[str, str], HubRepo] = {}
        self.blobs: dict[str, bytes] = {}  # real sha256 → content, for the CDN
        self.requests: list[Seen] = []
        self.seconds_per_chunk = 0.0  # slows the CDN down, so progress can be watched
        self.chunk_size = 64 * 1024
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    # Test set-up -------------------------------------------------------------------

    def add_file(
        self,
        repo_id: str,
        filename: str,
        data: bytes,
        *,
        repo_type: str = "model",
        licence: str | None = "apache-2.0",
        revision: str = "main",
        gated_token: str | None = None,
        lfs: bool = True,
        announced_sha256: str | None = None,
    ) -> str:
        """Commit ``data`` as ``filename`` on branch ``revision``; return the commit sha.

        ``announced_sha256`` makes the hub claim another LFS sha256 than the bytes have.
        """
        with self._lock:
            repo = self.repos.setdefault(
                (repo_type, repo_id), HubRepo(repo_type, repo_id, licence, gated_token)
            )
            repo.licence, repo.gated_token = licence, gated_token
            real = hashlib.sha256(data).hexdigest()
            self.blobs[real] = data
            parent = repo.branches.get(revision)
            files = dict(repo.commits.get(parent, {})) if parent else {}
            files[filename] = HubFile(data=data, lfs=lfs, sha256=announced_sha256 or real)
            commit = hashlib.sha1(
                f"{repo_id}\n{parent}\n{filename}\n{real}\n{len(repo.commits)}".encode(),
                usedforsecurity=False,
            ).hexdigest()
            repo.commits[commit] = files
            repo.branches[revision] = commit
            return commit

    @property
    def url(self) -> str:
        assert self._server is not None, "start() the hub first"
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    @property
    def cdn_url(self) -> str:
        return f"http://localhost:{self._server.server_address[1]}"

    def start(self) -> FakeHub:
        hub = self

        class Handler(_Handler):
            pass

        Handler.hub = hub
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    # Lookups ------------------------------------------------------------------------

    def resolve(self, repo_type: str, repo_id: str, revision: str) -> tuple[HubRepo, str] | None:
        repo = self.repos.get((repo_type, repo_id))
        if repo is None:
            return None
        commit = revision if revision in repo.commits else repo.branches.get(revision)
        return repo, commit or ""


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    hub: FakeHub

    def log_message(self, format: str, *args) -> None:  # quiet test output
        pass

    def do_HEAD(self) -> None:
        self._route(body=False)

    def do_GET(self) -> None:
        self._route(body=True)

    # Routing -------------------------------------------------------------------------

    def _route(self, *, body: bool) -> None:
        path, query = urlsplit(self.path).path, urlsplit(self.path).query
        auth = self.headers.get("Authorization")
        self.hub.requests.append(Seen(self.command, path, self.headers.get("Host", ""), auth))
        if m := _INFO.match(path):
            kind = "model" if m[1] == "models" else "dataset"
            self._info(kind, m[2], unquote(m[3] or "main"), blobs="blobs=" in query, body=body)
        elif m := _RESOLVE.match(path):
            kind = "dataset" if m[1] else "model"
            self._resolve(kind, m[2], unquote(m[3]), unquote(m[4]), body=body)
        elif m := _CDN.match(path):
            self._cdn(m[1], body=body)
        else:
            self._send(404, {"error": "Not found"}, body=body)

    def _info(self, kind: str, repo_id: str, revision: str, *, blobs: bool, body: bool) -> None:
        found = self.hub.resolve(kind, repo_id, revision)
        if found is None:
            return self._repo_not_found(body)
        repo, commit = found
        if not commit:
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}", body)
        siblings = []
        for name, f in sorted(repo.commits[commit].items()):
            sibling: dict = {"rfilename": name}
            if blobs:
                sibling |= {"size": len(f.data), "blobId": f.git_oid}
                if f.lfs:
                    sibling["lfs"] = {"sha256": f.sha256, "size": len(f.data), "pointerSize": 134}
            siblings.append(sibling)
        tags = ["gguf"] + ([f"license:{repo.licence}"] if repo.licence else [])
        info = {
            "_id": hashlib.sha256(repo_id.encode()).hexdigest()[:24],
            "id": repo_id,
            "author": repo_id.split("/")[0],
            "sha": commit,
            "private": False,
            "gated": "manual" if repo.gated_token else False,
            "disabled": False,
            "tags": tags,
            "cardData": {"license": repo.licence, "tags": ["gguf"]} if repo.licence else {},
            "siblings": siblings,
            "lastModified": "2025-01-01T00:00:00.000Z",
            "createdAt": "2025-01-01T00:00:00.000Z",
        }
        self._send(200, info, body=body)

    def _resolve(self, kind: str, repo_id: str, revision: str, name: str, *, body: bool) -> None:
        found = self.hub.resolve(kind, repo_id, revision)
        if found is None:
            return self._repo_not_found(body)
        repo, commit = found
        if not commit:
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}", body)
        if repo.gated_token:
            sent = self.headers.get("Authorization")
            if sent is None:
                return self._error(
                    401,
                    "GatedRepo",
                    f"Access to model {repo_id} is restricted. You must have access to it "
                    "and be authenticated to access it. Please log in.",
                    body,
                )
            if sent != f"Bearer {repo.gated_token}":
                return self._error(401, None, "Invalid credentials in Authorization header", body)
        f = repo.commits[commit].get(name)
        if f is None:
            return self._error(
                404, "EntryNotFound", "Entry not found", body, {"X-Repo-Commit": commit}
            )
        headers = {"X-Repo-Commit": commit, "Accept-Ranges": "bytes"}
        if f.lfs:
            real = hashlib.sha256(f.data).hexdigest()
            headers |= {
                "Location": f"{self.hub.cdn_url}/_cdn/{real}",
                "ETag": f'"{f.git_oid}"',
                "X-Linked-Etag": f'"{f.sha256}"',
                "X-Linked-Size": str(len(f.data)),
            }
            return self._send(302, b"", body=body, headers=headers)
        headers["ETag"] = f'"{f.git_oid}"'
        self._send_bytes(f.data, body=body, headers=headers)

    def _cdn(self, sha256: str, *, body: bool) -> None:
        data = self.hub.blobs.get(sha256)
        if data is None:
            return self._send(404, b"NoSuchKey", body=body)
        self._send_bytes(data, body=body, headers={"Accept-Ranges": "bytes"}, slow=True)

    # Responses -----------------------------------------------------------------------

    def _repo_not_found(self, body: bool) -> None:
        # The hub answers 401 to an anonymous caller and 404 to a logged-in one.
        status = 404 if self.headers.get("Authorization") else 401
        self._error(status, "RepoNotFound", "Repository not found", body)

    def _error(
        self, status: int, code: str | None, message: str, body: bool, extra: dict | None = None
    ) -> None:
        headers = {"X-Error-Message": message, **(extra or {})}
        if code:
            headers["X-Error-Code"] = code
        self._send(status, {"error": message}, body=body, headers=headers)

    def _send(
        self, status: int, payload: dict | bytes, *, body: bool, headers: dict | None = None
    ) -> None:
        data = json.dumps(payload).encode() if isinstance(payload, dict) else payload
        self.send_response(status)
        if isinstance(payload, dict):
            self.send_header("Content-Type", "application/json")
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if body:
            self.wfile.write(data)

    def _send_bytes(
        self, data: bytes, *, body: bool, headers: dict | None = None, slow: bool = False
    ) -> None:
        start, status = 0, 200
        if m := re.match(r"^bytes=(\d+)-$", self.headers.get("Range", "")):
            start, status = min(int(m[1]), len(data)), 206
        part = data[start:]
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Content-Length", str(len(part)))
        self.end_headers()
        if not body:
            return
        step = self.hub.chunk_size
        for offset in range(0, len(part), step):
            if slow and self.hub.seconds_per_chunk:
                time.sleep(self.hub.seconds_per_chunk)
            self.wfile.write(part[offset : offset + step])
