"""Checking a signed audit export offline, as docs/audit-verification.md describes the
format: the Ed25519 signature over the manifest, the content's sha256, and each event's
hash and links. Needs ``cryptography`` (``pip install 'aibox-client[audit]'``).

Check against a public key taken from the box once over a channel you trust (or whose
fingerprint its operator confirmed): a key fetched alongside the file proves only that
the box you are talking to signed it."""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import json
from dataclasses import dataclass, field
from typing import Any

from aibox_client.errors import MissingExtra

HASHED_FIELDS = (
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
)
CSV_TRAILER = b"#aibox-export-manifest,"
PDF_TRAILER = b"%AIBOX-EXPORT-MANIFEST "


def canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


@dataclass
class Verification:
    """What was checked: ``ok`` when ``problems`` is empty."""

    format: str
    manifest: dict[str, Any]
    events: int | None
    fingerprint: str
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def fingerprint(public_key_pem: bytes | str) -> str:
    """sha256 of the key's 32 raw bytes, hex: what the box shows beside its key."""
    raw = _public_key(public_key_pem).public_bytes_raw()
    return hashlib.sha256(raw).hexdigest()


def _public_key(pem: bytes | str):
    try:
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
        from cryptography.hazmat.primitives.serialization import load_pem_public_key
    except ImportError as exc:
        raise MissingExtra(
            "Verifying signatures needs the 'cryptography' package: "
            "pip install 'aibox-client[audit]'."
        ) from exc
    key = load_pem_public_key(pem.encode() if isinstance(pem, str) else pem)
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError("The public key is not an Ed25519 key.")
    return key


def _split(data: bytes) -> tuple[str, bytes, dict[str, Any], str]:
    """(format, content, manifest, signature); ValueError when there is no trailer."""
    if data.lstrip().startswith(b"{"):
        try:
            whole = json.loads(data)
        except ValueError:
            whole = None  # JSON Lines: one object per line
        if isinstance(whole, dict) and "document" in whole:
            content = canonical(whole["document"]).encode()
            return "json", content, whole["aibox_export_manifest"], whole["signature"]
    body = data[:-1] if data.endswith(b"\n") else data
    cut = body.rfind(b"\n") + 1
    content, last = data[:cut], body[cut:].rstrip(b"\r")
    if last.startswith(PDF_TRAILER):
        _, manifest, signature = last.split(b" ")
        return "pdf", content, json.loads(base64.b64decode(manifest)), signature.decode()
    if last.startswith(CSV_TRAILER):
        _, manifest, signature = next(csv.reader([last.decode()]))
        return "csv", content, json.loads(manifest), signature
    trailer = json.loads(last)
    return "jsonl", content, trailer["aibox_export_manifest"], trailer["signature"]


def _events(fmt: str, content: bytes) -> list[dict[str, Any]]:
    if fmt == "jsonl":
        return [json.loads(line) for line in content.decode().splitlines() if line]
    reader = csv.reader(io.StringIO(content.decode(), newline=""))
    header = next(reader)
    events = []
    for row in reader:
        # Cells that a spreadsheet would run as a formula carry one leading quote.
        event: dict[str, Any] = dict(
            zip(header, (cell[1:] if cell.startswith("'") else cell for cell in row), strict=True)
        )
        event["seq"] = int(event["seq"])
        event["details"] = json.loads(event["details"])
        event["source_ip"] = event["source_ip"] or None
        events.append(event)
    return events


def _event_hash(event: dict[str, Any]) -> str:
    payload = canonical({name: event[name] for name in HASHED_FIELDS})
    return hashlib.sha256(f"{event['prev_hash']}\n{payload}".encode()).hexdigest()


def verify_export(data: bytes, public_key_pem: bytes | str) -> Verification:
    """Check an export (CSV, JSON Lines, PDF, or a JSON report) against the box's key."""
    key = _public_key(public_key_pem)  # first: it says how to install cryptography
    from cryptography.exceptions import InvalidSignature

    print_ = hashlib.sha256(key.public_bytes_raw()).hexdigest()
    try:
        fmt, content, manifest, signature = _split(data)
    except (ValueError, KeyError, StopIteration, IndexError):
        return Verification(
            "unknown",
            {},
            None,
            print_,
            ["No AIBox manifest on the last line: the file was cut short or is not an export."],
        )
    result = Verification(fmt, manifest, None, print_)
    problems = result.problems
    try:
        key.verify(base64.b64decode(signature), canonical(manifest).encode())
    except (InvalidSignature, ValueError):
        problems.append(
            "The signature does not verify: the manifest was altered or another key signed it."
        )
    if hashlib.sha256(content).hexdigest() != manifest.get("content_sha256"):
        problems.append("The content's sha256 differs from the manifest's: the file was altered.")
    if manifest.get("kind") == "audit-events" and fmt in ("csv", "jsonl"):
        try:
            events = _events(fmt, content)
        except (ValueError, KeyError, StopIteration) as exc:
            problems.append(f"The events cannot be read: {exc}.")
            events = []
        result.events = len(events)
        if len(events) != manifest.get("events"):
            problems.append(
                f"{len(events)} events, but the manifest says {manifest.get('events')}."
            )
        previous: dict[str, Any] | None = None
        for event in events:
            if _event_hash(event) != event["hash"]:
                problems.append(f"Event #{event['seq']}: its contents do not match its hash.")
            if previous is not None:
                if event["seq"] <= previous["seq"]:
                    problems.append(f"Event #{event['seq']}: out of order.")
                elif event["seq"] == previous["seq"] + 1:
                    if event["prev_hash"] != previous["hash"]:
                        problems.append(
                            f"Event #{event['seq']}: the link to the one before is broken."
                        )
                elif not manifest.get("filters"):
                    problems.append(f"Events are missing before #{event['seq']}.")
            previous = event
    if manifest.get("chain_ok") is False:
        problems.append(f"The box found the chain broken: {manifest.get('chain_error')}")
    return result
