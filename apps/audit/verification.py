"""Checking a signed export, report or dossier (apps.audit.signed) from its bytes alone.

No Django and no database: only the file and the box's public key, exactly what an
outside auditor has. ``manage.py audit_verify_export`` runs this; the stand-alone script
in docs/audit-verification.md does the same with the standard library and
``cryptography``.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import json
from dataclasses import dataclass, field
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from apps.audit.chain import canonical_json, compute_hash
from apps.audit.signed import (
    JSON_MANIFEST_KEY,
    NotSigned,
    csv_unescape,
    manifest_bytes,
    split_line_file,
)

EVENT_COLUMNS = (
    "seq",
    "created_at",
    "actor_label",
    "action",
    "target_type",
    "target_id",
    "target_label",
    "outcome",
    "source_ip",
    "user_agent",
    "details",
    "prev_hash",
    "hash",
)


@dataclass
class Report:
    """What a check found; ``problems`` name each failure, in the order found."""

    format: str = ""
    manifest: dict[str, Any] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    events: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems


def _signature_ok(manifest: dict[str, Any], signature: str, public_key: bytes) -> bool:
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(
            base64.b64decode(signature, validate=True), manifest_bytes(manifest)
        )
    except (InvalidSignature, ValueError):
        return False
    return True


def _csv_events(content: bytes) -> list[tuple[int, dict[str, Any] | str]]:
    """(line number, event or a parse problem) for each data row of a CSV export."""
    reader = csv.reader(io.StringIO(content.decode("utf-8"), newline=""))
    out: list[tuple[int, dict[str, Any] | str]] = []
    header = next(reader, None)
    if header != list(EVENT_COLUMNS):
        return [(1, "the CSV header is not the export's column list")]
    for row in reader:
        line = reader.line_num
        if len(row) != len(EVENT_COLUMNS):
            out.append((line, f"has {len(row)} cells, not {len(EVENT_COLUMNS)}"))
            continue
        event: dict[str, Any] = {
            name: csv_unescape(value) for name, value in zip(EVENT_COLUMNS, row, strict=True)
        }
        try:
            event["seq"] = int(event["seq"])
            event["details"] = json.loads(event["details"])
        except ValueError:
            out.append((line, "has a seq or details cell that does not parse"))
            continue
        event["source_ip"] = event["source_ip"] or None
        out.append((line, event))
    return out


def _jsonl_events(content: bytes) -> list[tuple[int, dict[str, Any] | str]]:
    out: list[tuple[int, dict[str, Any] | str]] = []
    for number, line in enumerate(content.decode("utf-8").splitlines(), start=1):
        try:
            event = json.loads(line)
            if not isinstance(event, dict) or set(event) != set(EVENT_COLUMNS):
                raise ValueError
        except ValueError:
            out.append((number, "is not an exported event"))
            continue
        out.append((number, event))
    return out


def _check_events(report: Report, events: list[tuple[int, dict[str, Any] | str]]) -> None:
    manifest = report.manifest
    previous: dict[str, Any] | None = None
    unfiltered = not manifest.get("filters")
    good: list[dict[str, Any]] = []
    for line, event in events:
        if isinstance(event, str):
            report.problems.append(f"line {line} {event}")
            continue
        seq = event["seq"]
        where = f"line {line}, event #{seq}"
        if compute_hash(event["prev_hash"], event) != event["hash"]:
            report.problems.append(f"{where}: its contents do not match its hash (altered)")
        if previous is not None:
            if seq <= previous["seq"]:
                report.problems.append(
                    f"{where}: out of order (comes after event #{previous['seq']}): "
                    "lines were reordered"
                )
            elif seq == previous["seq"] + 1 and event["prev_hash"] != previous["hash"]:
                report.problems.append(f"{where}: does not link to event #{previous['seq']}")
            elif seq > previous["seq"] + 1 and unfiltered:
                report.problems.append(
                    f"{where}: event(s) #{previous['seq'] + 1}..#{seq - 1} missing before it "
                    "in an unfiltered export: lines were removed"
                )
        previous = event
        good.append(event)
    report.events = len(good)
    if len(events) != manifest.get("events"):
        report.problems.append(
            f"the file holds {len(events)} events, the signed manifest says "
            f"{manifest.get('events')}: lines were removed or added"
        )
    ends = [({"seq": e["seq"], "hash": e["hash"]}) for e in (good[:1] + good[-1:])] if good else []
    if good and ends[0] != manifest.get("first_event"):
        report.problems.append("the first event is not the one the signed manifest names")
    if good and ends[-1] != manifest.get("last_event"):
        report.problems.append("the last event is not the one the signed manifest names")
    verified = manifest.get("verified_range") or {}
    if good and unfiltered and good[0]["prev_hash"] != verified.get("links_to"):
        report.problems.append(
            f"event #{good[0]['seq']} does not link to the hash the manifest gives for the "
            "event before the range"
        )


def verify_export(data: bytes, *, public_key: bytes) -> Report:
    """Check a file's signature, content hash and (for CSV and JSON Lines) every event."""
    report = Report()
    if data.lstrip().startswith(b"{"):
        try:
            parsed = json.loads(data)
        except ValueError:
            parsed = None  # JSON Lines: many lines, not one document
        if isinstance(parsed, dict) and "document" in parsed:
            return _verify_json_document(report, parsed, public_key)
    try:
        fmt, content, manifest, signature = split_line_file(data)
    except NotSigned as exc:
        report.problems.append(str(exc))
        return report
    report.format, report.manifest = fmt, manifest
    if not _signature_ok(manifest, signature, public_key):
        report.problems.append(
            "the signature does not verify: the manifest was altered, or the file was not "
            "signed by this box's key"
        )
    if hashlib.sha256(content).hexdigest() != manifest.get("content_sha256"):
        report.problems.append(
            "the content's sha256 differs from the signed manifest: the file was altered "
            "after export"
        )
    if manifest.get("format") != fmt:
        report.problems.append(f"the manifest says {manifest.get('format')}, the file is {fmt}")
    if manifest.get("kind") == "audit-events" and fmt in ("csv", "jsonl"):
        _check_events(report, _csv_events(content) if fmt == "csv" else _jsonl_events(content))
    elif manifest.get("kind") == "audit-events":
        report.events = manifest.get("events", 0)
    if manifest.get("chain_ok") is False:
        report.problems.append(
            f"the box found the audit chain broken when exporting: {manifest.get('chain_error')}"
        )
    return report


def _verify_json_document(report: Report, parsed: dict, public_key: bytes) -> Report:
    report.format = "json"
    try:
        document, manifest = parsed["document"], parsed[JSON_MANIFEST_KEY]
        signature = parsed["signature"]
    except KeyError:
        report.problems.append("not a signed AIBox JSON document (no manifest or signature)")
        return report
    report.manifest = manifest
    if not _signature_ok(manifest, signature, public_key):
        report.problems.append(
            "the signature does not verify: the manifest was altered, or the file was not "
            "signed by this box's key"
        )
    digest = hashlib.sha256(canonical_json(document).encode("utf-8")).hexdigest()
    if digest != manifest.get("content_sha256"):
        report.problems.append(
            "the document's sha256 differs from the signed manifest: the file was altered "
            "after export"
        )
    return report
