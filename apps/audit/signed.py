"""The signed-file format shared by audit exports, period reports and model dossiers.

Pure Python (the standard library and ``cryptography``), no Django, so that
docs/audit-verification.md can describe it completely and an outsider can re-implement
it. Two shapes, both streamable by the writer:

* Line files (CSV, JSON Lines, PDF): the content, then ONE trailer line, the last line
  of the file, holding a manifest and the signature::

      CSV    #aibox-export-manifest,"<manifest JSON>",<signature>
      JSONL  {"aibox_export_manifest": <manifest>, "signature": "<signature>"}
      PDF    %AIBOX-EXPORT-MANIFEST <base64 of the manifest JSON> <signature>

  ``manifest["content_sha256"]`` is the sha256 of every byte before the trailer line.
* JSON documents (reports, dossiers): one object
  ``{"document": ..., "aibox_export_manifest": ..., "signature": ...}`` where
  ``content_sha256`` is the sha256 of ``canonical_json(document)``.

The signature is Ed25519 over ``canonical_json(manifest)`` (UTF-8), base64-encoded.
"""

from __future__ import annotations

import base64
import csv
import io
import json
from typing import Any

from apps.audit.chain import canonical_json

CSV_TRAILER_TAG = "#aibox-export-manifest"
PDF_TRAILER_TAG = b"%AIBOX-EXPORT-MANIFEST"
JSON_MANIFEST_KEY = "aibox_export_manifest"

# A spreadsheet runs a cell that starts with one of these as a formula. Such cells get
# a leading apostrophe; so does a cell that already starts with one, which makes the
# escaping reversible: a reader removes exactly one leading apostrophe.
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r", "'")


def csv_escape(value: str) -> str:
    return "'" + value if value.startswith(FORMULA_STARTS) else value


def csv_unescape(value: str) -> str:
    return value[1:] if value.startswith("'") else value


def manifest_bytes(manifest: dict[str, Any]) -> bytes:
    return canonical_json(manifest).encode("utf-8")


def trailer_line(fmt: str, manifest: dict[str, Any], signature: str) -> bytes:
    if fmt == "csv":
        buffer = io.StringIO()
        csv.writer(buffer).writerow([CSV_TRAILER_TAG, canonical_json(manifest), signature])
        return buffer.getvalue().encode("utf-8")
    if fmt == "jsonl":
        line = canonical_json({JSON_MANIFEST_KEY: manifest, "signature": signature})
        return (line + "\n").encode("utf-8")
    if fmt == "pdf":
        encoded = base64.b64encode(manifest_bytes(manifest))
        return PDF_TRAILER_TAG + b" " + encoded + b" " + signature.encode("ascii") + b"\n"
    raise ValueError(f"unknown format {fmt!r}")


class NotSigned(ValueError):
    """The file carries no AIBox manifest where one must be."""


def split_line_file(data: bytes) -> tuple[str, bytes, dict[str, Any], str]:
    """``(format, content, manifest, signature)`` of a line file, by its trailer line."""
    body = data[:-1] if data.endswith(b"\n") else data
    cut = body.rfind(b"\n") + 1
    content, last = data[:cut], body[cut:].rstrip(b"\r")
    try:
        if last.startswith(PDF_TRAILER_TAG + b" "):
            _, encoded, signature = last.split(b" ")
            manifest = json.loads(base64.b64decode(encoded, validate=True))
            return "pdf", content, manifest, signature.decode("ascii")
        text = last.decode("utf-8")
        if text.startswith(CSV_TRAILER_TAG + ","):
            tag, manifest_json, signature = next(csv.reader([text]))
            return "csv", content, json.loads(manifest_json), signature
        if text.startswith("{"):
            trailer = json.loads(text)
            if isinstance(trailer, dict) and JSON_MANIFEST_KEY in trailer:
                return "jsonl", content, trailer[JSON_MANIFEST_KEY], trailer["signature"]
    except (ValueError, KeyError, StopIteration, UnicodeDecodeError):
        pass
    raise NotSigned(
        "the last line is not an AIBox manifest: the file was cut short, had lines "
        "appended, or is not an AIBox export"
    )
