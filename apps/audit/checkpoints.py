"""Signed checkpoints of the audit chain's head, kept outside the database.

The hash chain proves that no event inside it was altered or removed, but not that it
was not cut short: deleting the newest events, or truncating the table, leaves a shorter
chain that still verifies. So every few minutes (Celery beat, ``audit.checkpoint``) the
box appends the head's seq and hash, signed with the audit signing key, as one JSON line
to ``AUDIT_CHECKPOINT_FILE``: a file outside the database, on a volume of its own, that
operators may also ship to a log host. ``manage.py audit_verify`` checks the database
against the newest checkpoint: the event it names must still be there, unchanged.

A line: ``{"seq": 41, "hash": "…", "at": "2026-…Z", "key": "<public key fingerprint>",
"signature": "<base64 Ed25519 over canonical_json({seq, hash, at})>"}``.
"""

from __future__ import annotations

import base64
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from django.utils import timezone

from apps.audit.chain import canonical_json, format_timestamp
from apps.audit.models import AuditEvent
from apps.audit.selectors import audit_head_seq
from apps.audit.signing import PublicKey, public_key, sign


@dataclass(frozen=True)
class Checkpoint:
    seq: int
    hash: str
    at: str

    def message(self) -> bytes:
        return canonical_json({"seq": self.seq, "hash": self.hash, "at": self.at}).encode()


@dataclass
class CheckpointReport:
    path: Path
    lines: int = 0
    newest: Checkpoint | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _lines(path: Path) -> list[str]:
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return []


def _last_line(path: Path) -> str | None:
    """The file's last line, read from its end: the file grows by a line every 5 minutes."""
    try:
        with path.open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - 4096))
            tail = fh.read().decode("utf-8", errors="replace").splitlines()
    except FileNotFoundError:
        return None
    return tail[-1] if tail else None


def _parse(line: str) -> tuple[Checkpoint, str, str]:
    data = json.loads(line)
    point = Checkpoint(seq=int(data["seq"]), hash=str(data["hash"]), at=str(data["at"]))
    return point, str(data["key"]), str(data["signature"])


def checkpoint_write(*, path: Path) -> Checkpoint | None:
    """Append a signed checkpoint of the chain's head, unless the newest line names it
    already (or the log is empty). Returns the checkpoint written, if any."""
    head = AuditEvent.objects.order_by("-seq").values("seq", "hash").first()
    if head is None:
        return None
    last = _last_line(path)
    if last:
        try:
            newest, _, _ = _parse(last)
        except (ValueError, KeyError):
            newest = None  # audit_verify reports the bad line; keep checkpointing
        if newest is not None and (newest.seq, newest.hash) == (head["seq"], head["hash"]):
            return None
    point = Checkpoint(seq=head["seq"], hash=head["hash"], at=format_timestamp(timezone.now()))
    line = json.dumps(
        {
            "seq": point.seq,
            "hash": point.hash,
            "at": point.at,
            "key": public_key().fingerprint,
            "signature": sign(point.message()),
        }
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, (line + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    return point


def checkpoints_verify(*, path: Path, key: PublicKey) -> CheckpointReport:
    """Check every line's signature, then the database against the newest checkpoint."""
    report = CheckpointReport(path=path)
    verifier = Ed25519PublicKey.from_public_bytes(key.raw)
    for number, line in enumerate(_lines(path), start=1):
        report.lines += 1
        try:
            point, fingerprint, signature = _parse(line)
        except (ValueError, KeyError):
            report.problems.append(f"{path} line {number}: not a checkpoint")
            continue
        if fingerprint != key.fingerprint:
            report.problems.append(
                f"{path} line {number}: signed by key {fingerprint[:16]}…, not the box's "
                f"audit signing key {key.fingerprint[:16]}…"
            )
            continue
        try:
            verifier.verify(base64.b64decode(signature, validate=True), point.message())
        except (InvalidSignature, ValueError):
            report.problems.append(f"{path} line {number}: the signature does not verify")
            continue
        report.newest = point
    newest = report.newest
    if newest is None:
        return report
    event = AuditEvent.objects.filter(seq=newest.seq).values("hash").first()
    if event is None:
        report.problems.append(
            f"events are missing from the end of the log: the checkpoint of {newest.at} saw "
            f"the chain reach #{newest.seq}, the database now ends at #{audit_head_seq()} "
            "(events deleted or the table truncated)"
        )
    elif event["hash"] != newest.hash:
        report.problems.append(
            f"event #{newest.seq} is not the one the checkpoint of {newest.at} signed "
            "(the chain was rewritten)"
        )
    return report
