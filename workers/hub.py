"""Files from the Hugging Face Hub (or a mirror), through the official huggingface_hub client.

Plain Python (no Django): the control plane's tasks call it with everything it needs.
``hub_file_info`` resolves a file at a revision to an immutable commit and says what the
hub claims about it (size, etag, LFS sha256, the model card's licence);
``hub_download`` fetches exactly that commit's file with byte progress. Every failure
the caller can do something about (no such repo or file, a gated repo, no network)
becomes a ``HubError`` with a sentence to show, never a traceback.

Only the token passed in is ever sent: a token stored in the worker's home directory or
``HF_TOKEN`` environment is ignored, so what AIBox sends is what its settings say.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Literal

# huggingface_hub's own HTTP client; its transport errors mean the hub was not reached.
import httpx2
from huggingface_hub import HfApi, get_hf_file_metadata, hf_hub_download, hf_hub_url
from huggingface_hub.errors import (
    DisabledRepoError,
    EntryNotFoundError,
    FileMetadataError,
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

RepoType = Literal["model", "dataset"]
REPO_TYPES: tuple[RepoType, ...] = ("model", "dataset")
DEFAULT_REVISION = "main"

_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
_REVISION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,199}$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f\\]")


class HubError(Exception):
    """A hub problem, worded for the person who asked for the file."""


class DownloadTooLarge(HubError):
    """The bytes arriving passed the size limit, whatever size the hub had stated."""


@dataclass(frozen=True)
class HubFile:
    """One file at one commit, as the hub describes it. Holds no credentials."""

    endpoint: str
    repo_type: RepoType
    repo_id: str
    filename: str
    revision: str  # as asked for: a branch, tag or commit
    commit: str  # the commit that revision resolved to
    size: int | None
    etag: str
    sha256: str | None  # the LFS sha256, when the hub stores the file with LFS
    licence: str  # from the repo card's metadata; "" when it names none
    gated: bool

    @property
    def name(self) -> str:
        """The file's own name, without the repo's sub-folders."""
        return PurePosixPath(self.filename).name

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def check_sha256(self, sha256: str) -> None:
        """Raise HubError unless ``sha256`` (of the bytes received) is what the hub
        announced. Files the hub keeps outside LFS carry no sha256 to compare."""
        if self.sha256 is not None and sha256 != self.sha256:
            raise HubError(
                f"The downloaded {self.filename} has sha256 {sha256}, but the hub announced "
                f"{self.sha256} for it at commit {self.commit[:12]}; the file was discarded."
            )


def check_repo_id(repo_id: str) -> str:
    repo_id = repo_id.strip()
    if not _REPO_ID.match(repo_id) or ".." in repo_id or "--" in repo_id:
        raise HubError(
            f"{repo_id!r} is not a Hugging Face repo id: use owner/name (letters, digits, "
            "'.', '_' and '-'), e.g. google/gemma-3-270m."
        )
    return repo_id


def check_filename(filename: str) -> str:
    """A path inside the repo, as the hub names it (sub-folders allowed); it is only ever
    part of a URL, never a local path the caller uses."""
    filename = filename.strip()
    parts = filename.split("/")
    if (
        not filename
        or len(filename) > 1000
        or _CONTROL.search(filename)
        or any(part in {"", ".", ".."} for part in parts)
    ):
        raise HubError(
            f"{filename!r} is not a file name in a repo: give its path in the repo, "
            "e.g. model-q4_k_m.gguf or gguf/model-q4_k_m.gguf."
        )
    return filename


def check_revision(revision: str) -> str:
    revision = revision.strip() or DEFAULT_REVISION
    if not _REVISION.match(revision) or ".." in revision:
        raise HubError(f"{revision!r} is not a branch, tag or commit.")
    return revision


def check_endpoint(endpoint: str) -> str:
    endpoint = endpoint.strip().rstrip("/")
    if not re.match(r"^https?://[^/\s]+(/[^\s]*)?$", endpoint):
        raise HubError(f"{endpoint!r} is not a hub address (http:// or https://).")
    return endpoint


def _token(token: str | None) -> str | bool:
    # False: never fall back to a token the machine happens to have stored.
    return token or False


def _card_licence(card: Any, tags: list[str] | None) -> str:
    licence = getattr(card, "license", None) if card is not None else None
    if isinstance(licence, list):
        licence = ", ".join(str(item) for item in licence)
    if licence == "other" and getattr(card, "license_name", None):
        licence = f"other: {card.license_name}"
    if not licence:
        # The hub mirrors the card's licence into a tag; a mirror may only keep the tags.
        licence = next((t.split(":", 1)[1] for t in tags or () if t.startswith("license:")), "")
    return str(licence)[:100]


def _describe(exc: Exception, *, what: str, endpoint: str, token: str | None) -> HubError:
    """Turn a huggingface_hub or transport error into a sentence for the user; anything
    else (a bug rather than the hub) is raised again as it is."""
    if isinstance(exc, HubError):
        return exc
    if isinstance(exc, GatedRepoError):
        if token:
            return HubError(
                f"{what} is gated, and the configured Hugging Face token does not give access: "
                "accept the repo's terms on the hub with the token's account, or use a token "
                "that has been granted access."
            )
        return HubError(
            f"{what} is gated: the hub serves its files only to an account that has accepted "
            "its terms. Set AIBOX_HF_TOKEN to a token of such an account."
        )
    if isinstance(exc, DisabledRepoError):
        return HubError(f"{what} has been disabled on the hub.")
    if isinstance(exc, RepositoryNotFoundError):
        return HubError(
            f"No repository {what} on {endpoint}. Check the repo id; a private repo needs a "
            "token (AIBOX_HF_TOKEN) that can read it."
        )
    if isinstance(exc, RevisionNotFoundError):
        return HubError(f"{what}: no such branch, tag or commit on {endpoint}.")
    if isinstance(exc, EntryNotFoundError) and not isinstance(exc, LocalEntryNotFoundError):
        return HubError(f"{what}: no such file in the repo at that revision.")
    if isinstance(exc, HfHubHTTPError):
        status = exc.response.status_code if exc.response is not None else None
        if status == 401:
            return HubError(
                f"{endpoint} refused the configured Hugging Face token (401). Check AIBOX_HF_TOKEN."
                if token
                else f"{endpoint} asks for a login (401) to read {what}: set AIBOX_HF_TOKEN."
            )
        if status == 403:
            return HubError(f"{endpoint} refused access to {what} (403).")
        if status == 429:
            return HubError(f"{endpoint} is rate-limiting this box (429); try again later.")
        return HubError(f"{endpoint} answered {status} for {what}; try again later.")
    if isinstance(exc, httpx2.TransportError | LocalEntryNotFoundError | ConnectionError):
        return HubError(
            f"Could not reach the hub at {endpoint} ({type(exc).__name__}). Check the network "
            "and AIBOX_HF_ENDPOINT (a mirror can be set there)."
        )
    if isinstance(exc, FileMetadataError):
        return HubError(f"{endpoint} does not answer like a Hugging Face hub for {what}: {exc}")
    if isinstance(exc, HFValidationError):
        return HubError(f"{what} is not a valid Hugging Face name: {exc}")
    if isinstance(exc, OSError) and "Consistency check failed" in str(exc):
        return HubError(f"The download of {what} ended early (the connection dropped); try again.")
    raise exc


def hub_file_info(
    *,
    repo_id: str,
    filename: str,
    revision: str = DEFAULT_REVISION,
    repo_type: RepoType = "model",
    endpoint: str,
    token: str | None,
) -> HubFile:
    """Resolve ``revision`` to a commit and describe ``filename`` there.

    Reads the repo's info (``/api/{models|datasets}/<id>/revision/<rev>`` with file
    metadata: commit, card, LFS sha256 and size) and then the file's own headers
    (``HEAD .../resolve/<commit>/<file>``: etag, size, and whether the token may read
    it), so a gated repo or missing file is refused before anything is downloaded.
    """
    if repo_type not in REPO_TYPES:
        raise HubError(f"Unknown repo type {repo_type!r}.")
    repo_id = check_repo_id(repo_id)
    filename = check_filename(filename)
    revision = check_revision(revision)
    endpoint = check_endpoint(endpoint)
    what = repo_id if repo_type == "model" else f"dataset {repo_id}"
    api = HfApi(endpoint=endpoint, token=_token(token))
    try:
        if repo_type == "model":
            info = api.model_info(repo_id, revision=revision, files_metadata=True)
        else:
            info = api.dataset_info(repo_id, revision=revision, files_metadata=True)
    except Exception as exc:
        raise _describe(exc, what=f"{what}@{revision}", endpoint=endpoint, token=token) from None
    commit = info.sha or ""
    if not _COMMIT.match(commit):
        raise HubError(f"{endpoint} did not say which commit {revision} of {what} is.")
    sibling = next((s for s in info.siblings or () if s.rfilename == filename), None)
    if info.siblings is not None and sibling is None:
        raise HubError(f"{what} has no file {filename!r} at {revision} (commit {commit[:12]}).")
    url = hf_hub_url(repo_id, filename, repo_type=repo_type, revision=commit, endpoint=endpoint)
    try:
        meta = get_hf_file_metadata(url, token=_token(token), endpoint=endpoint)
    except Exception as exc:
        raise _describe(exc, what=f"{what}/{filename}", endpoint=endpoint, token=token) from None
    if meta.commit_hash and meta.commit_hash != commit:
        raise HubError(
            f"{endpoint} served {filename} from commit {meta.commit_hash[:12]}, not the "
            f"resolved {commit[:12]}; try again."
        )
    lfs = sibling.lfs if sibling is not None else None
    sha256 = lfs.sha256 if lfs is not None else None
    if sha256 is not None and not _SHA256.match(sha256):
        raise HubError(f"{endpoint} gave a malformed sha256 for {filename}.")
    size = lfs.size if lfs is not None else (sibling.size if sibling is not None else None)
    return HubFile(
        endpoint=endpoint,
        repo_type=repo_type,
        repo_id=repo_id,
        filename=filename,
        revision=revision,
        commit=commit,
        size=size if size is not None else meta.size,
        etag=meta.etag or "",
        sha256=sha256,
        licence=_card_licence(info.card_data, info.tags),
        gated=bool(info.gated),
    )


class _Bytes:
    """Bytes written so far by one download; updated from the client's threads."""

    def __init__(self, total: int | None, limit: int | None, what: str) -> None:
        self.done = 0
        self.total = total
        self.limit = limit
        self.what = what
        self.lock = threading.Lock()

    def check(self) -> None:
        """Stop the download (raised inside huggingface_hub's write loop) past the limit."""
        if self.limit is not None and max(self.done, self.total or 0) > self.limit:
            raise DownloadTooLarge(
                f"{self.what} is larger than the limit of {self.limit:,} bytes "
                "(AIBOX_UPLOAD_MAX_BYTES); the download was stopped."
            )


def _progress_bar_class(count: _Bytes) -> type:
    """What huggingface_hub takes as a progress bar (``tqdm_class``) and instantiates
    itself: a bar that only counts into ``count``.

    ``update`` counts bytes written to the file, for plain HTTP and Xet downloads alike.
    ``update_transfer`` (a Xet download's network bytes) is ignored; having it makes the
    Xet path use this one bar for both.
    """

    class ByteCountBar:
        def __init__(self, *args: Any, total: int | None = None, initial: int = 0, **kw: Any):
            with count.lock:
                count.total = total or count.total
                count.done = initial or 0
            count.check()  # the length the server sends, which the hub may not have stated

        @property
        def n(self) -> int:
            return count.done

        @property
        def total(self) -> int | None:
            return count.total

        @total.setter
        def total(self, value: int | None) -> None:
            count.total = value or count.total

        def update(self, n: float | None = 1) -> None:
            with count.lock:
                count.done += int(n or 0)
            count.check()

        def update_transfer(self, n: float | None = 1) -> None:
            pass

        def set_postfix_str(self, *args: Any, **kwargs: Any) -> None:
            pass

        set_transfer_postfix_str = set_postfix_str
        refresh = set_postfix_str
        close = set_postfix_str

        def __enter__(self) -> ByteCountBar:
            return self

        def __exit__(self, *exc: object) -> None:
            pass

    return ByteCountBar


def hub_download(
    *,
    file: HubFile,
    dest_dir: Path,
    token: str | None,
    progress: Callable[[int, int], None] | None = None,
    interval: float = 0.5,
    max_bytes: int | None = None,
) -> Path:
    """Download ``file`` at its resolved commit into ``dest_dir``; return its path there.

    The download runs in a helper thread; ``progress(bytes_done, bytes_total)`` is called
    from the calling thread at most every ``interval`` seconds while bytes arrive, and
    once at the end. The file lands under ``dest_dir`` at its repo path; the caller hashes
    it and removes ``dest_dir`` when done. Past ``max_bytes`` received (or announced by
    the download's own headers) it stops with DownloadTooLarge, whatever the hub stated.
    """
    what = f"{file.repo_id}/{file.filename}"
    count = _Bytes(file.size, max_bytes, what)

    def run() -> str:
        return hf_hub_download(
            file.repo_id,
            file.filename,
            repo_type=file.repo_type,
            revision=file.commit,  # the commit that was recorded, never a moving branch
            endpoint=file.endpoint,
            token=_token(token),
            local_dir=dest_dir,
            # Only consulted for an already-cached copy: keep it inside dest_dir, never the
            # worker user's own Hugging Face cache.
            cache_dir=dest_dir / ".hub-cache",
            tqdm_class=_progress_bar_class(count),
        )

    dest_dir.mkdir(parents=True, exist_ok=True)
    reported = -1
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hub-download")
    future: Future[str] = pool.submit(run)
    try:
        while not wait([future], timeout=interval).done:
            if progress is not None and count.done != reported:
                reported = count.done
                progress(count.done, count.total or 0)
        path = future.result()
    except DownloadTooLarge:
        raise
    except Exception as exc:
        raise _describe(exc, what=what, endpoint=file.endpoint, token=token) from None
    finally:
        # Never wait for a download the caller gave up on (a time limit, say): the
        # caller removes dest_dir, and the thread ends with its connection.
        pool.shutdown(wait=False, cancel_futures=True)
    local = Path(path).resolve()
    if not local.is_relative_to(dest_dir.resolve()) or not local.is_file():
        raise HubError(f"The download of {what} did not produce a file.")
    if progress is not None:
        size = local.stat().st_size
        progress(size, count.total or size)
    return local
