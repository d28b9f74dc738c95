"""PDF renderings (reportlab) of audit exports, period reports and model dossiers.

Each writes a complete PDF into a binary file object; the caller appends the signed
manifest line (apps.audit.signed) after it.
"""

from __future__ import annotations

from collections import Counter
from typing import IO, Any
from xml.sax.saxutils import escape

from reportlab.lib import colors
from reportlab.lib.pagesizes import A4, landscape
from reportlab.lib.styles import getSampleStyleSheet
from reportlab.lib.units import mm
from reportlab.platypus import Paragraph, SimpleDocTemplate, Spacer, Table, TableStyle

_STYLES = getSampleStyleSheet()
_PORTRAIT_WIDTH = A4[0] - 24 * mm
_SMALL = _STYLES["BodyText"].clone("small", fontSize=7, leading=8.5)
_TABLE_STYLE = TableStyle(
    [
        ("FONTSIZE", (0, 0), (-1, -1), 7),
        ("LEADING", (0, 0), (-1, -1), 8.5),
        ("BACKGROUND", (0, 0), (-1, 0), colors.HexColor("#e8e8e8")),
        ("GRID", (0, 0), (-1, -1), 0.25, colors.grey),
        ("VALIGN", (0, 0), (-1, -1), "TOP"),
    ]
)


def _p(text: Any, style=None) -> Paragraph:
    return Paragraph(escape(str(text)), style or _SMALL)


def _table(header: list[str], rows: list[list[Any]], widths: list[float] | None = None) -> Table:
    data = [[_p(h) for h in header]] + [[_p(c) for c in row] for row in rows]
    if widths is None:
        # Paragraph cells need explicit widths; split the portrait page's width evenly.
        widths = [_PORTRAIT_WIDTH / len(header)] * len(header)
    table = Table(data, colWidths=widths, repeatRows=1)
    table.setStyle(_TABLE_STYLE)
    return table


def _counts(title: str, counter: Counter[str], limit: int = 50) -> list:
    rows = [[name or "(none)", count] for name, count in counter.most_common(limit)]
    if len(counter) > limit:
        rows.append([f"... {len(counter) - limit} more", ""])
    return [Paragraph(escape(title), _STYLES["Heading3"]), _table([title, "Events"], rows)]


def _facts(pairs: list[tuple[str, Any]]) -> Table:
    table = Table([[_p(k), _p(v)] for k, v in pairs], colWidths=[45 * mm, None])
    table.setStyle(
        TableStyle([("FONTSIZE", (0, 0), (-1, -1), 7), ("VALIGN", (0, 0), (-1, -1), "TOP")])
    )
    return table


def _build(out: IO[bytes], title: str, story: list, *, wide: bool = False) -> None:
    doc = SimpleDocTemplate(
        out,
        pagesize=landscape(A4) if wide else A4,
        title=title,
        author="AIBox",
        leftMargin=12 * mm,
        rightMargin=12 * mm,
        topMargin=12 * mm,
        bottomMargin=12 * mm,
    )
    doc.build(story)


def export_pdf(
    out: IO[bytes],
    *,
    plan,
    events: list[dict[str, Any]],
    total: int,
    by_action: Counter[str],
    by_outcome: Counter[str],
    by_actor: Counter[str],
    chain_ok: bool,
    chain_error: str | None,
    checked: int,
    first: dict | None,
    last: dict | None,
    fingerprint: str,
) -> None:
    filters = plan.filters.as_dict()
    story: list = [
        Paragraph("Audit log export", _STYLES["Title"]),
        Paragraph(f"Events: {total}", _STYLES["Heading2"]),
        Paragraph(
            "Chain verified" if chain_ok else f"CHAIN BROKEN: {escape(chain_error or '')}",
            _STYLES["Heading2"],
        ),
        _facts(
            [
                ("Generated", f"{plan.generated_at} by {plan.generated_by}"),
                ("Filters", ", ".join(f"{k}={v}" for k, v in filters.items()) or "none"),
                ("Log head at export", f"#{plan.head_seq}"),
                (
                    "Verified range",
                    f"#{plan.bounds[0]}..#{plan.bounds[1]}, {checked} events checked"
                    if plan.bounds
                    else "no events",
                ),
                ("First event", f"#{first['seq']} {first['hash']}" if first else "-"),
                ("Last event", f"#{last['seq']} {last['hash']}" if last else "-"),
                ("Signing key (sha256)", fingerprint),
            ]
        ),
        Spacer(1, 4 * mm),
        *_counts("Action", by_action),
        *_counts("Outcome", by_outcome),
        *_counts("Actor", by_actor),
        Paragraph("Events", _STYLES["Heading3"]),
    ]
    if total > len(events):
        story.append(
            _p(
                f"The first {len(events)} of {total} events; "
                "the CSV and JSON Lines exports list all."
            )
        )
    rows = [
        [
            e["seq"],
            e["created_at"][:19].replace("T", " "),
            e["actor_label"],
            e["action"],
            " ".join(filter(None, [e["target_type"], e["target_id"], e["target_label"]])),
            e["outcome"],
            e["hash"][:16],
        ]
        for e in events
    ]
    story.append(
        _table(
            ["#", "Time (UTC)", "Actor", "Action", "Target", "Outcome", "Hash"],
            rows,
            widths=[16 * mm, 32 * mm, 35 * mm, 45 * mm, 80 * mm, 20 * mm, 30 * mm],
        )
    )
    _build(out, "Audit log export", story, wide=True)


def _section(title: str, header: list[str], rows: list[list[Any]]) -> list:
    body: list = [Paragraph(escape(title), _STYLES["Heading2"])]
    body.append(_table(header, rows) if rows else _p("None in this period."))
    return body


def document_pdf(
    out: IO[bytes], *, title: str, summary: list[tuple[str, Any]], sections: list
) -> None:
    """A report or dossier: a title, facts, then (title, header, rows) sections."""
    story: list = [Paragraph(escape(title), _STYLES["Title"]), _facts(summary), Spacer(1, 4 * mm)]
    for section_title, header, rows in sections:
        story += _section(section_title, header, rows)
    _build(out, title, story)
