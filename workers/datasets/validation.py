"""validate(): one streaming pass over a dataset file that judges every row and gathers
what a reviewer needs to accept it: counts, errors with their lines, lengths, duplicates,
personal data, and an index for previewing any page of the file."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import orjson

from . import pii
from .core import DatasetError, FileFormat, RowError, Shape, ValidationOptions
from .readers import Source
from .rows import BadRow, RowChecker, row_text, scan_text, type_name
from .stats import HashSpill, LengthHistogram

MAX_COLUMNS = 200
MAX_INDEX_ENTRIES = 20_000
Progress = Callable[[int, int], None]


@dataclass(slots=True)
class Checked:
    """One data row as judged: its canonical form when valid, its first error otherwise."""

    number: int
    line: int
    offset: int
    shape: Shape | None
    row: dict[str, Any] | None
    error: RowError | None
    raw: Any
    value: Any = None
    text: str | None = None
    length: int = 0


def iter_checked(
    source: Source,
    checker: RowChecker,
    *,
    offset: int | None = None,
    line: int | None = None,
    number: int = 0,
    skip: int = 0,
    batch: int = 64,
    on_bytes: Callable[[int], None] | None = None,
    count_tokens: bool = True,
) -> Iterator[Checked]:
    """Every data row of source from row `skip`, judged: the one definition of a valid
    row that validation, preview, transformations and export share.

    A tokenizer with a `many(texts)` method (tokens.TokenCounter, which counts on several
    threads) is given `batch` rows at a time. Without count_tokens, lengths are in
    characters and no row is too long."""
    options = source.options
    if not count_tokens:
        options = replace(options, tokenize=None, max_tokens=None)
    tokenize = options.tokenize
    many = getattr(tokenize, "many", None)
    pending: list[Checked] = []
    for num, ln, off, value, error, raw in source.records(offset, line, number, on_bytes):
        if num < skip:
            continue
        if error is not None:
            checked = Checked(
                num, ln, off, None, None, RowError(ln, error[0], error[1]), raw, value
            )
        else:
            try:
                shape, row, chars = checker.check(value, ln, num)
            except BadRow as bad:
                error = RowError(ln, bad.code, bad.message, bad.field)
                checked = Checked(num, ln, off, None, None, error, raw, value)
            else:
                if tokenize is None:
                    checked = Checked(num, ln, off, shape, row, None, raw, value, None, chars)
                elif many is not None:
                    text = row_text(row, shape)
                    checked = Checked(num, ln, off, shape, row, None, raw, value, text)
                else:
                    text = row_text(row, shape)
                    checked = Checked(
                        num, ln, off, shape, row, None, raw, value, text, tokenize(text)
                    )
                    if options.max_tokens is not None:
                        _limit(checked, options.max_tokens)
        if many is None:
            yield checked
            continue
        pending.append(checked)
        if len(pending) >= batch:
            yield from _measure(pending, many, options.max_tokens)
            pending = []
    if pending:
        yield from _measure(pending, many, options.max_tokens)


def _measure(
    rows: list[Checked], many: Callable[[list[str]], list[int]], max_tokens: int | None
) -> list[Checked]:
    valid = [c for c in rows if c.error is None]
    for checked, length in zip(valid, many([c.text for c in valid]), strict=True):
        checked.length = length
        if max_tokens is not None:
            _limit(checked, max_tokens)
    return rows


def _limit(checked: Checked, max_tokens: int) -> None:
    if checked.length > max_tokens:
        checked.error = RowError(
            checked.line,
            "too_long",
            f"the row has {checked.length:,} tokens; the model's context is {max_tokens:,}",
        )
        checked.row = None


def personal_data(checked: Checked) -> list[tuple[str, str]]:
    """The personal data in a valid row (kind, matched text)."""
    raw = checked.raw
    if type(raw) in (bytes, bytearray) and not pii.may_contain(raw):
        return []
    return pii.find(scan_text(checked.row, checked.shape, checked.text))


def row_digest(row: dict[str, Any]) -> int:
    """A 64-bit digest of a canonical row (whose keys are always built in one order, so
    its JSON is canonical too). Python's own hash of bytes is SipHash-1-3 with a key drawn
    per process: as collision-resistant as an 8-byte blake2b for this, three times faster,
    and the digests never outlive the process that made them."""
    return hash(orjson.dumps(row))


@dataclass
class Report:
    """What validate() found; as_dict() is what the control plane stores."""

    format: str
    shape: str | None
    columns: list[str]
    rows: int
    valid_rows: int
    error_count: int
    errors_by_code: dict[str, int]
    errors: list[RowError]
    length_unit: str
    length_stats: dict[str, float] | None
    histogram: list[dict[str, int]]
    duplicate_rows: int
    pii: dict[str, dict[str, Any]]
    pii_rows: int
    index: dict[str, Any]
    bytes: int
    column_types: dict[str, list[str]] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Report:
        data = dict(data)
        data["errors"] = [RowError(**e) for e in data.get("errors", [])]
        known = cls.__dataclass_fields__
        return cls(**{k: v for k, v in data.items() if k in known})


class Throttle:
    """Calls progress(done, total) at most every `every` seconds, and at the end."""

    def __init__(self, progress: Progress | None, total: int, every: float = 0.5) -> None:
        self.progress = progress
        self.total = total
        self.every = every
        self.done = 0
        self.last = time.monotonic()

    def __call__(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if self.progress is not None and now - self.last >= self.every:
            self.last = now
            self.progress(min(self.done, self.total), self.total)

    def finish(self) -> None:
        if self.progress is not None:
            self.progress(self.total, self.total)


def validate(
    path: Path,
    fmt: FileFormat,
    options: ValidationOptions,
    progress: Progress | None = None,
) -> Report:
    """Read the whole file once and report on every row; raise DatasetError when the file
    as a whole cannot be a dataset (empty, unreadable, no row of any shape)."""
    source = Source(path, fmt, options)
    checker = RowChecker(options, json_cells=source.fmt is not FileFormat.JSONL)
    throttle = Throttle(progress, source.size)
    every = options.index_every
    keep = options.max_errors_kept
    lengths = LengthHistogram()
    tally = pii.PiiTally(max_examples=options.max_examples)
    errors: list[RowError] = []
    by_code: dict[str, int] = {}
    offsets: list[list[int]] = []
    if source.fmt is FileFormat.PARQUET:
        columns = {c: {source.column_types[c]} for c in source.columns[:MAX_COLUMNS]}
    else:
        columns = {c: {"string"} for c in source.columns[:MAX_COLUMNS]}
    track_keys = source.fmt is FileFormat.JSONL
    # Parquet is indexed by its row groups; text formats by byte offsets, recorded here.
    track_offsets = source.fmt is not FileFormat.PARQUET
    rows = valid = 0
    with HashSpill(options.temp_dir) as spill:
        for checked in iter_checked(source, checker, on_bytes=throttle):
            rows += 1
            if track_offsets and checked.number % every == 0:
                offsets.append([checked.offset, checked.line])
                if len(offsets) > MAX_INDEX_ENTRIES:
                    # Keep the index bounded on huge files: half the entries, twice apart.
                    offsets = offsets[::2]
                    every *= 2
            if track_keys and type(value := checked.value) is dict:
                for key, item in value.items():
                    types = columns.get(key)
                    if types is None:
                        if len(columns) >= MAX_COLUMNS:
                            continue
                        types = columns[key] = set()
                    types.add(type_name(item))
            error = checked.error
            if error is not None:
                by_code[error.code] = by_code.get(error.code, 0) + 1
                if len(errors) < keep:
                    errors.append(error)
                continue
            valid += 1
            lengths.add(checked.length)
            spill.add(row_digest(checked.row))
            tally.add(personal_data(checked))
        duplicates = spill.duplicates()
    throttle.finish()
    if rows == 0:
        raise DatasetError("The file is empty.")
    shape = checker.shape or checker.first_detected
    if shape is None:
        first = errors[0] if errors else None
        raise DatasetError(
            "No row is a dataset row: each needs messages (chat), instruction and output, "
            "prompt and completion, or text."
            + (f" Line {first.line}: {first.message}." if first else "")
        )
    if source.fmt is FileFormat.PARQUET:
        index = {"kind": "row_groups", "starts": source.group_starts}
    else:
        index = {"kind": "offsets", "every": every, "entries": offsets}
    index["shape"] = shape.value
    index["shape_row"] = checker.shape_row
    index["shape_line"] = checker.shape_line
    if source.fmt is FileFormat.CSV:
        index["delimiter"] = source.delimiter
    return Report(
        format=source.fmt.value,
        shape=shape.value,
        columns=list(columns),
        rows=rows,
        valid_rows=valid,
        error_count=rows - valid,
        errors_by_code=by_code,
        errors=errors,
        length_unit=options.length_unit,
        length_stats=lengths.stats(),
        histogram=lengths.buckets(),
        duplicate_rows=duplicates,
        pii=tally.as_dict(),
        pii_rows=tally.rows_with_any,
        index=index,
        bytes=source.size,
        column_types={c: sorted(t) for c, t in columns.items()},
    )
