"""Streaming uploads straight into the artifact store's staging area.

Django hands each received chunk to this handler: it is hashed and written to disk at
once, so a multi-gigabyte model never sits in memory, and an upload over the limit is
cut off as soon as it crosses it. A disk that fills mid-way ends the upload the same
way: the partial file is removed at once and the client told why (507).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
from collections.abc import Callable
from functools import wraps

from django.conf import settings
from django.core.files.uploadedfile import UploadedFile
from django.core.files.uploadhandler import FileUploadHandler, StopUpload
from django.http import HttpRequest, HttpResponse
from django.views.decorators.csrf import csrf_exempt, csrf_protect
from rest_framework.parsers import MultiPartParser

from apps.registry.artifacts import artifact_store
from apps.registry.models import SourceKind
from apps.registry.services import model_version_ingest
from workers.artifacts import Staged


class StagedUpload(UploadedFile):
    """What lands in ``request.FILES``: the staged file plus its sha256."""

    def __init__(self, staged: Staged, name: str) -> None:
        # A File with no name is falsy, and Django drops falsy uploads.
        super().__init__(file=None, name=name or "unnamed", size=staged.size)
        self.staged = staged
        self.original_name = name  # unchecked client input: services validate it


# A full disk or an exhausted quota: the upload cannot go on, but the next one may.
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


class ArtifactUploadHandler(FileUploadHandler):
    def __init__(self, request=None, max_bytes: int | None = None) -> None:
        super().__init__(request)
        self.max_bytes = settings.UPLOAD_MAX_BYTES if max_bytes is None else max_bytes
        self.too_large = False
        self.no_space = False
        self._fh = None
        self._staged: Staged | None = None

    def new_file(self, *args, **kwargs) -> None:
        super().new_file(*args, **kwargs)
        self._discard()
        fd, path = artifact_store().new_temp_file()
        self._fh = os.fdopen(fd, "wb")
        self._staged = Staged(path=path, sha256="", size=0)
        self._digest = hashlib.sha256()

    def receive_data_chunk(self, raw_data: bytes, start: int) -> None:
        assert self._staged is not None and self._fh is not None
        self._staged.size += len(raw_data)
        if self._staged.size > self.max_bytes:
            self.too_large = True
            self._discard()
            raise StopUpload(connection_reset=True)
        self._digest.update(raw_data)
        try:
            self._fh.write(raw_data)
        except OSError as exc:
            self._failed(exc)
            raise StopUpload(connection_reset=True) from exc
        return None

    def file_complete(self, file_size: int) -> StagedUpload | None:
        if self._staged is None or self._fh is None:
            return None
        try:
            self._fh.close()  # writes what is still buffered
        except OSError as exc:
            self._failed(exc)
            return None
        self._fh = None
        self._staged.sha256 = self._digest.hexdigest()
        upload = StagedUpload(self._staged, self.file_name or "")
        self._staged = None
        return upload

    def upload_interrupted(self) -> None:
        self._discard()

    def _failed(self, exc: OSError) -> None:
        """A write failed: remove the partial file (freeing what it took), then say why."""
        self._discard()
        if exc.errno not in NO_SPACE:
            raise exc  # any other disk error is the server's, and logged as such
        self.no_space = True

    def _discard(self) -> None:
        if self._fh is not None:
            with contextlib.suppress(OSError):  # its buffer cannot be written: dropped
                self._fh.close()
            self._fh = None
        if self._staged is not None:
            self._staged.discard()
            self._staged = None


def received_file(request, handler: ArtifactUploadHandler) -> tuple[StagedUpload | None, str, int]:
    """The staged ``file`` field, or why there is none: (None, message, HTTP status).

    An empty message on a 400 means no file was sent; the caller says how to send one.
    """
    upload = request.FILES.get("file")
    if handler.too_large:
        limit = handler.max_bytes
        return None, f"The file is larger than the upload limit of {limit:,} bytes.", 413
    if handler.no_space:
        message = (
            "There is not enough free disk space on the server to store this file; nothing "
            "was kept. Ask an administrator to free space in the artifact store, then retry."
        )
        return None, message, 507
    if not isinstance(upload, StagedUpload):
        return None, "", 400
    return upload, "", 0


def streamed_upload(view: Callable[..., HttpResponse]) -> Callable[..., HttpResponse]:
    """For a page's upload endpoint: the body streams through ArtifactUploadHandler
    (the view gets it as ``handler=``), CSRF is checked once that handler is in place,
    and no staged file outlives the request, whatever the outcome."""

    @csrf_exempt  # checked below, once the streaming upload handler is in place
    @wraps(view)
    def wrapped(request: HttpRequest, *args, **kwargs) -> HttpResponse:
        handler = ArtifactUploadHandler(request)
        request.upload_handlers = [handler]
        try:
            return csrf_protect(view)(request, *args, handler=handler, **kwargs)
        finally:
            discard_uploads(getattr(request, "_files", None) or {})

    wrapped.body_limit = "upload"  # aibox/limits.py: only upload endpoints take large bodies
    return wrapped


class StreamedUploadMixin:
    """For a DRF view taking a multipart ``file``: streamed to the artifact store's
    staging area, and discarded after the request unless a service committed it."""

    parser_classes = [MultiPartParser]
    body_limit = "upload"  # aibox/limits.py: only upload endpoints take large bodies

    def initialize_request(self, request, *args, **kwargs):
        # Must be set before anything reads the body.
        self.upload_handler = ArtifactUploadHandler(request)
        request.upload_handlers = [self.upload_handler]
        return super().initialize_request(request, *args, **kwargs)

    def finalize_response(self, request, response, *args, **kwargs):
        files = getattr(request, "_files", None)  # only once the body was parsed
        if hasattr(files, "values"):
            discard_uploads(files)
        return super().finalize_response(request, response, *args, **kwargs)


def discard_uploads(files) -> None:
    """Remove staged files that a view did not hand to a service (bad form, say)."""
    for upload in files.values():
        if isinstance(upload, StagedUpload):
            upload.staged.discard()


def ingest_upload(*, actor, repo, upload: StagedUpload, via: str):
    """Hand a streamed upload to the registry, recording how it arrived."""

    return model_version_ingest(
        actor=actor,
        repo=repo,
        staged=upload.staged,
        file_name=upload.original_name,
        source_kind=SourceKind.UPLOAD,
        source={"client_file_name": upload.original_name[:255], "via": via},
    )
