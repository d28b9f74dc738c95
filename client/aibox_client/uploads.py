"""Files sent to the box as multipart bodies streamed from disk: never read whole into
memory, a progress bar as they go, and a bounded number of fresh starts when the
connection drops (the box has no resumable uploads: a dropped upload leaves nothing there,
and sending the same file again is safe: a model file already stored answers its existing
version)."""

from __future__ import annotations

import mimetypes
import os
import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

CHUNK = 256 * 1024


def _quoted(value: str) -> str:
    # RFC 7578: names travel as quoted strings; a quote or line break in them is escaped.
    return value.replace("\\", "\\\\").replace('"', "%22").replace("\r", "%0D").replace("\n", "%0A")


@dataclass
class MultipartFile:
    """One file field plus plain text fields, as a multipart/form-data body whose length
    is known before it is sent (the box checks the size before it reads the body)."""

    path: Path
    fields: dict[str, str]
    field_name: str = "file"

    def __post_init__(self) -> None:
        self.boundary = secrets.token_hex(16)
        parts = []
        for name, value in self.fields.items():
            parts.append(
                f'--{self.boundary}\r\nContent-Disposition: form-data; name="{_quoted(name)}"'
                f"\r\n\r\n{value}\r\n".encode()
            )
        content_type = mimetypes.guess_type(self.path.name)[0] or "application/octet-stream"
        parts.append(
            f"--{self.boundary}\r\nContent-Disposition: form-data; "
            f'name="{self.field_name}"; filename="{_quoted(self.path.name)}"\r\n'
            f"Content-Type: {content_type}\r\n\r\n".encode()
        )
        self.head = b"".join(parts)
        self.tail = f"\r\n--{self.boundary}--\r\n".encode()
        self.file_size = os.stat(self.path).st_size
        self.length = len(self.head) + self.file_size + len(self.tail)

    @property
    def content_type(self) -> str:
        return f"multipart/form-data; boundary={self.boundary}"

    def body(self, progress: Callable[[int], None]) -> Iterator[bytes]:
        """The body in chunks; ``progress(n)`` after each chunk of the file is handed on."""
        yield self.head
        with self.path.open("rb") as file:
            while chunk := file.read(CHUNK):
                yield chunk
                progress(len(chunk))
        yield self.tail
