"""read_page(): any page of a dataset file, without reading it from the start."""

from __future__ import annotations

from bisect import bisect_right
from contextlib import closing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import orjson

from .core import FileFormat, ValidationOptions
from .readers import Source
from .rows import RowChecker
from .validation import Checked, iter_checked, personal_data

RAW_LIMIT = 2048


@dataclass
class PreviewRow:
    number: int  # data row, from 0
    line: int
    row: dict[str, Any] | None  # canonical, when valid
    shape: str | None
    error: str | None
    raw: str | None  # the source text of an invalid row, cut to about 2 KB
    error_code: str | None = None
    pii: list[str] = field(default_factory=list)  # kinds of personal data found

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def read_page(
    path: Path,
    fmt: FileFormat,
    options: ValidationOptions,
    index: dict[str, Any] | None,
    start: int,
    count: int,
) -> list[PreviewRow]:
    """Data rows start..start+count-1 (from 0, valid or not), judged as validate() judged
    them. `index` is Report.index: reading starts at the nearest recorded row before
    `start` (or row group, for Parquet), so a page deep in a large file is quick."""
    if start < 0 or count < 0:
        raise ValueError("start and count must not be negative")
    source = Source(path, fmt, options)
    index = index or {}
    checker = RowChecker(
        options,
        json_cells=source.fmt is not FileFormat.JSONL,
        shape=index.get("shape"),
        shape_row=index.get("shape_row") or 0,
        shape_line=index.get("shape_line"),
    )
    if source.fmt is FileFormat.PARQUET:
        starts = source.group_starts
        group = max(0, bisect_right(starts, start) - 1)
        rows = iter_checked(source, checker, offset=group, skip=start, batch=max(count, 1))
    else:
        entries = index.get("entries") or []
        every = index.get("every") or 1
        k = min(start // every, len(entries) - 1)
        if k >= 0:
            offset, line = entries[k]
            rows = iter_checked(
                source,
                checker,
                offset=offset,
                line=line,
                number=k * every,
                skip=start,
                batch=max(count, 1),
            )
        else:
            rows = iter_checked(source, checker, skip=start, batch=max(count, 1))
    page: list[PreviewRow] = []
    if count == 0:
        return page
    with closing(rows):
        for checked in rows:
            if checked.number < start:
                continue
            page.append(_preview(checked, source))
            if len(page) >= count:
                break
    return page


def _preview(checked: Checked, source: Source) -> PreviewRow:
    error = checked.error
    if error is None:
        kinds = sorted({kind for kind, _ in personal_data(checked)})
        return PreviewRow(
            checked.number, checked.line, checked.row, checked.shape.value, None, None, None, kinds
        )
    return PreviewRow(
        checked.number,
        checked.line,
        None,
        checked.shape.value if checked.shape else None,
        error.message,
        raw_text(checked.raw, source),
        error.code,
    )


def raw_text(raw: Any, source: Source, limit: int = RAW_LIMIT) -> str | None:
    if raw is None:
        return None
    if isinstance(raw, bytes | bytearray):
        text = bytes(raw[: limit * 4]).decode("utf-8", "replace")
    elif isinstance(raw, list):
        text = source.delimiter.join(raw)
        # A row that was not UTF-8 was decoded with surrogateescape: show those bytes as �.
        text = text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    else:
        text = orjson.dumps(raw, default=str).decode()
    text = text.rstrip("\r\n")
    return text if len(text) <= limit else text[:limit] + "…"
