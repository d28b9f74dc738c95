"""Reading dataset files as a stream of records, with bounded memory.

JSON Lines and CSV are read in fixed-size binary blocks: a physical line longer than
`max_line_bytes` is skipped as it streams past, never held whole. Every record carries
the byte offset where it starts, which is what lets a preview seek to the middle of a
large file. Parquet is read one row group (in batches) at a time.
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson

from .core import CANONICAL_FIELDS, REQUIRED, SIGNATURE, DatasetError, FileFormat, Shape
from .core import ValidationOptions as Options

BLOCK = 1 << 20
BOM = b"\xef\xbb\xbf"
SUFFIXES = {
    ".jsonl": FileFormat.JSONL,
    ".ndjson": FileFormat.JSONL,
    ".json": FileFormat.JSONL,
    ".csv": FileFormat.CSV,
    ".parquet": FileFormat.PARQUET,
}
FORMAT_NAMES = {
    FileFormat.JSONL: "JSON Lines",
    FileFormat.CSV: "CSV",
    FileFormat.PARQUET: "Parquet",
}
_MAGIC = (
    (b"\x89PNG", "a PNG image"),
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"GIF8", "a GIF image"),
    (b"%PDF", "a PDF document"),
    (b"PK\x03\x04", "a ZIP archive; an Excel workbook is one, save it as CSV instead"),
    (b"\x1f\x8b", "a gzip archive; upload the file uncompressed"),
    (b"BZh", "a bzip2 archive; upload the file uncompressed"),
    (b"\xfd7zXZ", "an xz archive; upload the file uncompressed"),
    (b"(\xb5/\xfd", "a zstd archive; upload the file uncompressed"),
    (b"GGUF", "a GGUF model"),
    (b"\xff\xfe", "UTF-16 text; save it as UTF-8"),
    (b"\xfe\xff", "UTF-16 text; save it as UTF-8"),
)

# A record: (data row number from 0, line, byte offset or row group, source object or
# None, (error code, message) or None, raw source for display).
Record = tuple[int, int, int, Any, tuple[str, str] | None, Any]
OnBytes = Callable[[int], None] | None


def sniff_format(path: Path, file_name: str) -> FileFormat:
    """The file's format from its name, checked against its first bytes."""
    suffix = Path(file_name).suffix.lower()
    fmt = SUFFIXES.get(suffix)
    if fmt is None:
        raise DatasetError(
            f"{file_name!r} is not a dataset file AIBox reads: upload JSON Lines (.jsonl, "
            ".ndjson or .json with one object per line), CSV (.csv) or Parquet (.parquet)."
        )
    with open(path, "rb") as f:
        head = f.read(65536)
    if not head:
        raise DatasetError("The file is empty.")
    parquet = head.startswith(b"PAR1")
    if fmt is FileFormat.PARQUET:
        if not parquet:
            raise DatasetError(
                f"{file_name!r} is not a Parquet file: it does not start with the Parquet "
                "signature (PAR1)."
            )
        return fmt
    if parquet:
        raise DatasetError(
            f"{file_name!r} is a Parquet file, not {FORMAT_NAMES[fmt]}: name it .parquet."
        )
    what = binary_kind(head)
    if what:
        raise DatasetError(
            f"{file_name!r} looks like a binary file ({what}), not {FORMAT_NAMES[fmt]} text."
        )
    if fmt is FileFormat.JSONL and _one_array(head.removeprefix(BOM).lstrip()):
        raise DatasetError(
            f"{file_name!r} holds one JSON array; AIBox reads JSON Lines, one JSON object per "
            "line. Convert it, for example with: jq -c '.[]' data.json > data.jsonl"
        )
    return fmt


def _one_array(head: bytes) -> bool:
    """Whether a .json file is one JSON array rather than JSON Lines whose first row
    happens to be an array (a row error, reported on its line)."""
    if head[:1] != b"[":
        return False
    first, newline, rest = head.partition(b"\n")
    if not newline or not rest.strip():
        return True
    try:
        orjson.loads(first)
    except orjson.JSONDecodeError:
        return True
    return False


def binary_kind(head: bytes) -> str | None:
    """What a file's first bytes say it is, when that is not text."""
    for magic, what in _MAGIC:
        if head.startswith(magic):
            return what
    if b"\x00" in head:
        return "it contains NUL bytes"
    sample = head[:-4] if len(head) > 4 else head
    controls = sum(sample.count(bytes([c])) for c in range(32) if c not in (9, 10, 12, 13))
    replaced = sample.decode("utf-8", "replace").count("\ufffd")
    if sample and (controls + replaced) / len(sample) > 0.1:
        return "most of its bytes are not text"
    return None


def physical_lines(
    f: Any, pos: int, line: int, limit: int, on_bytes: OnBytes
) -> Iterator[tuple[int, int, bytes | bytearray | None, int]]:
    """(line number, offset, bytes without the newline or None when longer than limit,
    length) for every physical line from pos. Holds at most limit + one block."""
    pending: bytearray | None = None
    plen = 0  # bytes of the line in progress, counted even once it is too long to keep
    while block := f.read(BLOCK):
        if on_bytes is not None:
            on_bytes(len(block))
        parts = block.split(b"\n")
        tail = parts.pop()
        if parts:
            if plen:
                first = parts[0]
                total = plen + len(first)
                if pending is not None and total <= limit:
                    pending += first
                    yield line, pos, pending, total
                else:
                    yield line, pos, None, total
                pos += total + 1
                line += 1
                pending = None
                plen = 0
                parts = parts[1:]
            for part in parts:
                n = len(part)
                yield line, pos, (part if n <= limit else None), n
                pos += n + 1
                line += 1
        if tail:
            if not plen:
                pending = bytearray(tail) if len(tail) <= limit else None
                plen = len(tail)
            else:
                plen += len(tail)
                if pending is not None:
                    if plen <= limit:
                        pending += tail
                    else:
                        pending = None  # too long: drop what we had and count the rest
    if plen:
        yield line, pos, pending, plen


def too_long_message(size: int, limit: int) -> str:
    return f"the line is {_mb(size)}, longer than the limit of {_mb(limit)}"


def _mb(n: int) -> str:
    return f"{n / 1048576:.1f} MB" if n >= 1048576 else f"{n:,} bytes"


def check_columns(columns: list[str], options: Options, fmt: FileFormat) -> None:
    """Whole-file checks of a CSV header or a Parquet schema against the options."""
    listed = ", ".join(columns[:50]) + (", …" if len(columns) > 50 else "")
    mapping = options.column_mapping
    present = set(columns)
    for name, src in mapping.items():
        if src not in present:
            raise DatasetError(
                f"Column {src!r} (mapped to {name}) is not in the file; its columns are: {listed}."
            )
    available = {f for f in CANONICAL_FIELDS if mapping.get(f, f) in present}
    if options.shape is not None:
        missing = [f for f in REQUIRED[options.shape] if f not in available]
        if missing:
            raise DatasetError(
                f"A {options.shape.value} dataset needs the column(s) {', '.join(missing)}, "
                f"which the file does not have; its columns are: {listed}. Map your columns "
                "to these fields if they are named differently."
            )
        return
    if not any(key in available for key, _ in SIGNATURE):
        intro = (
            "The first row of a CSV file must be a header naming its columns"
            if fmt is FileFormat.CSV
            else "No column of the file is a dataset field"
        )
        raise DatasetError(
            f"{intro}: messages (chat); instruction, input and output; prompt and completion; "
            f"or text. Map your own column names to these fields otherwise. The file's "
            f"{'first row' if fmt is FileFormat.CSV else 'columns'}: {listed}."
        )


class Source:
    """An opened dataset file: its columns, and its records from any recorded offset."""

    def __init__(self, path: Path, fmt: FileFormat, options: Options) -> None:
        self.path = Path(path)
        self.fmt = FileFormat(fmt)
        self.options = options
        self.size = self.path.stat().st_size
        self.columns: list[str] = []
        self.column_types: dict[str, str] = {}
        self.delimiter = ","
        self.data_offset = 0
        self.data_line = 1
        self.parquet: Any = None
        self.group_starts: list[int] = []
        if self.size == 0:
            raise DatasetError("The file is empty.")
        if self.fmt is FileFormat.CSV:
            self._open_csv()
        elif self.fmt is FileFormat.PARQUET:
            self._open_parquet()

    # JSON Lines ------------------------------------------------------------------------

    def records(
        self,
        offset: int | None = None,
        line: int | None = None,
        number: int = 0,
        on_bytes: OnBytes = None,
    ) -> Iterator[Record]:
        """Records from a recorded (offset, line) or, for Parquet, a row group, numbered
        from `number`; from the first record when offset is None."""
        if self.fmt is FileFormat.JSONL:
            return self._jsonl(offset or 0, line or 1, number, on_bytes)
        if self.fmt is FileFormat.CSV:
            if offset is None:
                offset, line = self.data_offset, self.data_line
            return self._csv(offset, line, number, on_bytes)
        return self._parquet(offset or 0, on_bytes)

    def _jsonl(self, pos: int, line: int, number: int, on_bytes: OnBytes) -> Iterator[Record]:
        limit = self.options.max_line_bytes
        loads = orjson.loads
        decode_error = orjson.JSONDecodeError
        with open(self.path, "rb", buffering=0) as f:
            f.seek(pos)
            for line_no, offset, data, size in physical_lines(f, pos, line, limit, on_bytes):
                if data is None:
                    yield (
                        number,
                        line_no,
                        offset,
                        None,
                        (
                            "line_too_long",
                            too_long_message(size, limit),
                        ),
                        None,
                    )
                    number += 1
                    continue
                if not data or data[0] != 123:  # fast path: a line starting with "{"
                    if offset == 0 and data.startswith(BOM):
                        data = data[3:]
                    if not data.strip():
                        continue  # blank lines are not rows
                try:
                    value = loads(data)
                except decode_error as exc:
                    yield number, line_no, offset, None, json_error(data, exc), data
                else:
                    yield number, line_no, offset, value, None, data
                number += 1

    # CSV -------------------------------------------------------------------------------

    def _open_csv(self) -> None:
        with open(self.path, "rb", buffering=0) as f:
            for _, _, data, _ in physical_lines(f, 0, 1, self.options.max_line_bytes, None):
                if data is None:
                    raise DatasetError("The CSV header row is too long to be a header.")
                if data.strip():
                    text = bytes(data).removeprefix(BOM).decode("utf-8", "replace")
                    counts = {d: text.count(d) for d in (",", ";", "\t")}
                    best = max(counts, key=lambda d: counts[d])
                    self.delimiter = best if counts[best] > counts[","] else ","
                    break
        header: list[str] | None = None
        for _, line, _, value, error, raw in self._csv(0, 1, 0, None, header=True):
            if error is not None:
                raise DatasetError(f"The CSV header row cannot be read: {error[1]}.")
            header = raw
            self.data_line = line + 1
            self.data_offset = value
            break
        if header is None:
            raise DatasetError("The file is empty.")
        header = [h.strip() for h in header]
        if header:
            header[0] = header[0].removeprefix("\ufeff")
        seen: set[str] = set()
        for name in header:
            if name and name in seen:
                raise DatasetError(f"The CSV header names the column {name!r} twice.")
            seen.add(name)
        self.columns = header
        check_columns(header, self.options, self.fmt)

    def _csv(
        self, pos: int, line: int, number: int, on_bytes: OnBytes, header: bool = False
    ) -> Iterator[Record]:
        limit = self.options.max_line_bytes
        columns = self.columns
        ncols = len(columns)
        old_limit = csv.field_size_limit()
        # Python's csv module caps a field at 128 KiB by default; a field as long as a line
        # may be is a row like any other. (A process-wide setting: restored when done.)
        csv.field_size_limit(max(limit, old_limit))
        try:
            with open(self.path, "rb", buffering=0) as f:
                f.seek(pos)
                feed = _CsvFeed(physical_lines(f, pos, line, limit, on_bytes), pos)
                reader = csv.reader(feed, delimiter=self.delimiter)
                while True:
                    start = feed.next_offset
                    feed.too_long = feed.bad_utf8 = 0
                    try:
                        cells = next(reader)
                    except StopIteration:
                        return
                    except csv.Error as exc:
                        error = ("csv_error", f"the row is not CSV: {exc}")
                        yield number, line, start, None, error, None
                        number += 1
                        line += 1
                        continue
                    rec_line = line
                    line += 1
                    error = None
                    value: Any = None
                    if feed.too_long:
                        error = ("line_too_long", too_long_message(feed.too_long, limit))
                    elif not any(cell.strip() for cell in cells):
                        continue  # blank rows (and rows of empty cells) are not data
                    elif feed.bad_utf8:
                        error = ("not_utf8", "the row is not valid UTF-8")
                    elif header:
                        yield number, rec_line, start, feed.next_offset, None, cells
                        return
                    elif len(cells) != ncols:
                        error = (
                            "csv_error",
                            f"the row has {len(cells)} cells but the header has {ncols} columns",
                        )
                    else:
                        value = dict(zip(columns, cells, strict=True))
                    yield number, rec_line, start, value, error, cells
                    number += 1
        finally:
            csv.field_size_limit(old_limit)

    # Parquet ---------------------------------------------------------------------------

    def _open_parquet(self) -> None:
        import pyarrow.parquet as pq

        try:
            self.parquet = pq.ParquetFile(self.path)
            schema = self.parquet.schema_arrow
        except Exception as exc:  # noqa: BLE001 - pyarrow raises many kinds on bad input
            raise DatasetError(f"The Parquet file cannot be read: {exc}") from None
        self.columns = list(schema.names)
        self.column_types = {f.name: str(f.type) for f in schema}
        check_columns(self.columns, self.options, self.fmt)
        meta = self.parquet.metadata
        start = 0
        for g in range(meta.num_row_groups):
            self.group_starts.append(start)
            start += meta.row_group(g).num_rows
        if start == 0:
            raise DatasetError("The file is empty.")
        mapping = self.options.column_mapping
        wanted = {mapping.get(f, f) for f in CANONICAL_FIELDS}
        self.read_columns = [c for c in self.columns if c in wanted]

    def _parquet(self, group: int, on_bytes: OnBytes) -> Iterator[Record]:
        pf = self.parquet
        total_rows = pf.metadata.num_rows
        for g in range(group, len(self.group_starts)):
            number = self.group_starts[g]
            try:
                batches = pf.iter_batches(
                    batch_size=1024, row_groups=[g], columns=self.read_columns, use_threads=False
                )
                for batch in batches:
                    for row in batch.to_pylist():
                        yield number, number + 1, g, row, None, row
                        number += 1
            except Exception as exc:  # noqa: BLE001 - a damaged file, in any of many ways
                raise DatasetError(
                    f"The Parquet file is damaged: row group {g} cannot be read ({exc})."
                ) from None
            if on_bytes is not None:
                rows = pf.metadata.row_group(g).num_rows
                on_bytes(round(self.size * rows / total_rows))


class _CsvFeed:
    """Physical lines as text for csv.reader, noting where the next record starts and
    whether the current one had a line that was too long or not UTF-8."""

    def __init__(self, lines: Iterator, pos: int) -> None:
        self.lines = lines
        self.next_offset = pos
        self.too_long = 0
        self.bad_utf8 = 0
        self.first = pos == 0

    def __iter__(self) -> _CsvFeed:
        return self

    def __next__(self) -> str:
        _, offset, data, size = next(self.lines)
        self.next_offset = offset + size + 1
        if data is None:
            self.too_long = size
            return "\n"
        if self.first:
            self.first = False
            data = bytes(data).removeprefix(BOM)
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            self.bad_utf8 = 1
            text = data.decode("utf-8", "surrogateescape")
        return text + "\n"


def json_error(data: bytes | bytearray, exc: orjson.JSONDecodeError) -> tuple[str, str]:
    try:
        bytes(data).decode("utf-8")
    except UnicodeDecodeError as bad:
        return "not_utf8", (
            f"the line is not valid UTF-8 (byte 0x{data[bad.start]:02x} at position "
            f"{bad.start + 1}); save the file as UTF-8"
        )
    return "invalid_json", f"the line is not valid JSON: {exc.msg} at column {exc.colno}"


def shape_of(value: str | None) -> Shape | None:
    return Shape(value) if value else None
