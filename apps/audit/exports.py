"""Streamed, signed exports of a filtered view of the audit log (CSV, JSON Lines, PDF).

What an export guarantees (docs/audit-verification.md says the same to auditors):

* It lists, in chain order (seq ascending), the events the filters matched with
  seq <= the head of the log when the export began; the export's own ``audit.export``
  event comes after that head, so it is never part of its own export.
* While writing them, the box re-verified the chain over the whole seq range from the
  first to the last exported event, including the events the filters left out, and
  including the link from the first event to the one before it (or to the genesis
  hash). The manifest states that range, how many events were checked, and the first
  broken link if there was one. For an unfiltered export an outsider can redo the whole
  check from the file; for a filtered one, the outsider can check every exported event
  against its own hash and every link between consecutive exported events, and relies
  on the box's signed statement for the events in between.
* The manifest carries the sha256 of the content and is signed with the box's Ed25519
  key, so any change to the file (a byte, a removed or reordered line) is detected.

Nothing is held in memory: rows come from a server-side cursor in chunks, the hash of
the content is computed as it is written, and the manifest goes out last.
"""

from __future__ import annotations

import csv
import hashlib
import io
import tempfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from asgiref.sync import sync_to_async
from django.core.handlers.asgi import ASGIRequest
from django.db.models import BooleanField, ExpressionWrapper, Value
from django.http import HttpRequest, StreamingHttpResponse

from apps.audit import signing
from apps.audit.chain import GENESIS_HASH, ChainChecker, canonical_json, format_timestamp
from apps.audit.models import AuditEvent
from apps.audit.selectors import EVENT_COLUMNS, AuditFilters
from apps.audit.signed import csv_escape, manifest_bytes, trailer_line

FORMATS = {
    "csv": "text/csv; charset=utf-8",
    "jsonl": "application/x-ndjson; charset=utf-8",
    "pdf": "application/pdf",
}
EXPORT_VERSION = 1
CHUNK_EVENTS = 1000  # events per chunk sent to the client (and per cursor fetch, x2)
PDF_EVENT_ROWS = 2000  # a PDF lists the first events; CSV and JSON Lines list them all


@dataclass(frozen=True)
class ExportPlan:
    """What one export covers, fixed when it begins (see services.audit_export_begin)."""

    fmt: str
    filters: AuditFilters
    head_seq: int
    bounds: tuple[int, int] | None
    export_event_seq: int
    generated_at: str
    generated_by: str

    @property
    def filename(self) -> str:
        return f"aibox-audit-{self.generated_at[:19].replace(':', '')}.{self.fmt}"


def _range_rows(plan: ExportPlan) -> Iterator[dict[str, Any]]:
    """Every event from the first to the last match, each with ``matched``."""
    if plan.bounds is None:
        return
    first, last = plan.bounds
    matched = (
        Value(True)
        if plan.filters.is_empty
        else ExpressionWrapper(plan.filters.q(), output_field=BooleanField())
    )
    qs = (
        AuditEvent.objects.filter(seq__gte=first, seq__lte=last)
        .order_by("seq")
        .annotate(matched=matched)
        .values(*EVENT_COLUMNS, "matched")
    )
    yield from qs.iterator(chunk_size=2 * CHUNK_EVENTS)


def _link_into_range(plan: ExportPlan) -> str:
    """The hash the first event of the range must link to."""
    if plan.bounds is None or plan.bounds[0] == 1:
        return GENESIS_HASH
    previous = AuditEvent.objects.filter(seq=plan.bounds[0] - 1).values_list("hash", flat=True)
    # A missing predecessor is itself a break; an impossible hash makes the checker say so.
    return previous.first() or f"(event #{plan.bounds[0] - 1} is missing)"


def _plain(row: dict[str, Any]) -> dict[str, Any]:
    event = {name: row[name] for name in EVENT_COLUMNS}
    event["created_at"] = format_timestamp(event["created_at"])
    return event


class _Tally:
    """Counts for the manifest and the PDF summary, kept while streaming."""

    def __init__(self) -> None:
        self.events = 0
        self.first: dict[str, Any] | None = None
        self.last: dict[str, Any] | None = None
        self.by_action: Counter[str] = Counter()
        self.by_outcome: Counter[str] = Counter()
        self.by_actor: Counter[str] = Counter()

    def add(self, row: dict[str, Any]) -> None:
        self.events += 1
        link = {"seq": row["seq"], "hash": row["hash"]}
        self.first = self.first or link
        self.last = link
        self.by_action[row["action"]] += 1
        self.by_outcome[row["outcome"]] += 1
        self.by_actor[row["actor_label"]] += 1


def _manifest(
    plan: ExportPlan, tally: _Tally, checker: ChainChecker, link: str, sha: str
) -> dict[str, Any]:
    result = checker.result()
    return {
        "aibox_audit_export": EXPORT_VERSION,
        "kind": "audit-events",
        "format": plan.fmt,
        "generated_at": plan.generated_at,
        "generated_by": plan.generated_by,
        "export_event_seq": plan.export_event_seq,
        "log_head_seq": plan.head_seq,
        "filters": plan.filters.as_dict(),
        "events": tally.events,
        "first_event": tally.first,
        "last_event": tally.last,
        "verified_range": None
        if plan.bounds is None
        else {
            "first_seq": plan.bounds[0],
            "last_seq": plan.bounds[1],
            "links_to": link,
            "events_checked": result.checked,
        },
        "chain_ok": result.ok,
        "chain_error": None if result.ok else str(result.error),
        "content_sha256": sha,
        "public_key_sha256": signing.public_key().fingerprint,
    }


def _csv_rows(rows: list[dict[str, Any]]) -> bytes:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    for event in rows:
        writer.writerow(
            [
                event["seq"],
                *(
                    csv_escape(value)
                    for value in (
                        event["created_at"],
                        event["actor_label"],
                        event["action"],
                        event["target_type"],
                        event["target_id"],
                        event["target_label"],
                        event["outcome"],
                        event["source_ip"] or "",
                        event["user_agent"],
                        canonical_json(event["details"]),
                    )
                ),
                event["prev_hash"],
                event["hash"],
            ]
        )
    return buffer.getvalue().encode("utf-8")


def _jsonl_rows(rows: list[dict[str, Any]]) -> bytes:
    return "".join(canonical_json(event) + "\n" for event in rows).encode("utf-8")


def _verified_events(plan: ExportPlan, checker: ChainChecker, tally: _Tally):
    """Matched events as plain dicts, while every event of the range goes through the
    chain checker."""
    for row in _range_rows(plan):
        checker.feed(row)
        if row["matched"]:
            tally.add(row)
            yield _plain(row)


def stream_export(plan: ExportPlan) -> Iterator[bytes]:
    """The export's bytes in chunks: content, then the signed manifest line."""
    link = _link_into_range(plan)
    checker = ChainChecker(
        expected_prev_hash=link,
        expected_first_seq=plan.bounds[0] if plan.bounds else None,
    )
    tally = _Tally()
    sha = hashlib.sha256()
    if plan.fmt == "pdf":
        content = _pdf_chunks(plan, checker, tally, link)
    else:
        content = _text_chunks(plan, checker, tally)
    for chunk in content:
        sha.update(chunk)
        yield chunk
    manifest = _manifest(plan, tally, checker, link, sha.hexdigest())
    yield trailer_line(plan.fmt, manifest, signing.sign(manifest_bytes(manifest)))


def _text_chunks(plan: ExportPlan, checker: ChainChecker, tally: _Tally) -> Iterator[bytes]:
    encode = _csv_rows if plan.fmt == "csv" else _jsonl_rows
    if plan.fmt == "csv":
        yield (",".join(EVENT_COLUMNS) + "\r\n").encode("utf-8")
    batch: list[dict[str, Any]] = []
    for event in _verified_events(plan, checker, tally):
        batch.append(event)
        if len(batch) >= CHUNK_EVENTS:
            yield encode(batch)
            batch = []
    if batch:
        yield encode(batch)


def _pdf_chunks(
    plan: ExportPlan, checker: ChainChecker, tally: _Tally, link: str
) -> Iterator[bytes]:
    from apps.audit import pdf  # here, so reportlab loads only when a PDF is made

    listed = []
    for event in _verified_events(plan, checker, tally):
        if len(listed) < PDF_EVENT_ROWS:
            listed.append(event)
    result = checker.result()
    with tempfile.SpooledTemporaryFile(max_size=8 * 1024 * 1024) as out:
        pdf.export_pdf(
            out,
            plan=plan,
            events=listed,
            total=tally.events,
            by_action=tally.by_action,
            by_outcome=tally.by_outcome,
            by_actor=tally.by_actor,
            chain_ok=result.ok,
            chain_error=None if result.ok else str(result.error),
            checked=result.checked,
            first=tally.first,
            last=tally.last,
            fingerprint=signing.public_key().fingerprint,
        )
        out.seek(0)
        while chunk := out.read(256 * 1024):
            yield chunk


async def _async_chunks(chunks: Iterator[bytes]):
    """Feed a sync generator to an ASGI server one chunk at a time, on the request's
    own thread (its database connection holds the cursor). Django would otherwise
    read a sync iterator to the end into a list before sending anything."""
    step = sync_to_async(lambda: next(chunks, None), thread_sensitive=True)
    try:
        while (chunk := await step()) is not None:
            yield chunk
    finally:
        await sync_to_async(chunks.close, thread_sensitive=True)()


def streamed_download(
    request: HttpRequest, chunks: Iterator[bytes], *, content_type: str, filename: str
) -> StreamingHttpResponse:
    raw = getattr(request, "_request", request)  # a DRF Request wraps Django's
    content = _async_chunks(chunks) if isinstance(raw, ASGIRequest) else chunks
    response = StreamingHttpResponse(content, content_type=content_type)
    response["Content-Disposition"] = f'attachment; filename="{filename}"'
    response["Cache-Control"] = "no-store"
    return response
