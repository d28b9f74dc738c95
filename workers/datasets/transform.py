"""Derived datasets (split, dedupe, filter) written as canonical JSON Lines, and CSV
export; both stream the source, so memory stays flat whatever its size."""

from __future__ import annotations

import csv
import hashlib
import io
import os
import random
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, TextIO

import orjson

from .core import FIELDS, DatasetError, FileFormat, ValidationOptions
from .readers import Source
from .rows import RowChecker
from .stats import HashSpill
from .validation import (
    Checked,
    Progress,
    Throttle,
    iter_checked,
    personal_data,
    row_digest,
)

OPS = ("split", "dedupe", "filter")


@dataclass
class Derived:
    """A file written by transform(): canonical JSON Lines, valid rows only."""

    name: str  # "train", "validation", "deduplicated" or "filtered"
    path: Path
    rows: int
    sha256: str
    size: int
    details: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "path": str(self.path),
            "rows": self.rows,
            "sha256": self.sha256,
            "size": self.size,
            "details": self.details,
        }


class _Writer:
    """Rows to a temporary file in out_dir, renamed into place only when the whole
    transformation succeeds."""

    def __init__(self, out_dir: Path, name: str) -> None:
        self.name = name
        self.final = out_dir / f"{name}.jsonl"
        fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=f".{name}-", suffix=".part")
        self.tmp = Path(tmp)
        self.file = os.fdopen(fd, "wb", buffering=1 << 20)
        self.sha256 = hashlib.sha256()
        self.rows = 0
        self.size = 0

    def write(self, row: dict[str, Any]) -> None:
        data = orjson.dumps(row) + b"\n"
        self.file.write(data)
        self.sha256.update(data)
        self.size += len(data)
        self.rows += 1

    def commit(self, details: dict[str, Any]) -> Derived:
        self.file.close()
        os.replace(self.tmp, self.final)
        digest = self.sha256.hexdigest()
        return Derived(self.name, self.final, self.rows, digest, self.size, details)

    def discard(self) -> None:
        self.file.close()
        self.tmp.unlink(missing_ok=True)


class _Pass:
    """Reading the source once more, with a fresh checker and the progress shared across
    passes."""

    def __init__(self, source: Source, throttle: Throttle) -> None:
        self.source = source
        self.throttle = throttle

    def __call__(self, count_tokens: bool = True) -> Iterator[Checked]:
        checker = RowChecker(
            self.source.options, json_cells=self.source.fmt is not FileFormat.JSONL
        )
        return iter_checked(self.source, checker, on_bytes=self.throttle, count_tokens=count_tokens)


def transform(
    path: Path,
    fmt: FileFormat,
    options: ValidationOptions,
    op: str,
    params: dict[str, Any],
    out_dir: Path,
    progress: Progress | None = None,
) -> list[Derived]:
    """Write the derived files of `op` into out_dir, valid rows only, as canonical JSON
    Lines; each Derived's details say what was dropped and why. Nothing is left in
    out_dir when it fails.

    split  {"validation_fraction": 0.1, "seed": 42, "valid_rows": n (optional)}
           -> train, validation: round(n * fraction) rows chosen by a seeded sample, so
           the same file and seed always give byte-identical files
    dedupe -> deduplicated: the first of each set of identical canonical rows
    filter {"drop_pii": false} -> filtered: without invalid rows and, with drop_pii, rows
           with personal data
    """
    if op not in OPS:
        raise DatasetError(f"Unknown transformation {op!r}; choose one of {', '.join(OPS)}.")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    source = Source(path, fmt, options)
    passes = 1 if op == "filter" or (op == "split" and "valid_rows" in params) else 2
    throttle = Throttle(progress, source.size * passes)
    read = _Pass(source, throttle)
    writers: list[_Writer] = []

    def writer(name: str) -> _Writer:
        w = _Writer(out_dir, name)
        writers.append(w)
        return w

    try:
        if op == "split":
            details, outputs = _split(read, params, writer)
        elif op == "dedupe":
            details, outputs = _dedupe(read, options, writer)
        else:
            details, outputs = _filter(read, params, writer)
    except BaseException:
        for w in writers:
            w.discard()
        raise
    throttle.finish()
    return [w.commit(details) for w in outputs]


def canonical(path: Path, fmt: FileFormat, options: ValidationOptions, target: Path) -> Path:
    """The file's valid rows as canonical JSON Lines at ``target``, the one form every
    consumer reads (fine-tunes, evaluations). An existing ``target`` is reused, so a
    resumed job does not convert again; a failed conversion leaves nothing there."""
    target = Path(target)
    if target.exists():
        return target
    with tempfile.TemporaryDirectory(prefix=f".{target.name}-", dir=target.parent) as out:
        (derived,) = transform(
            path, fmt, options, "filter", {"drop_invalid": True, "drop_pii": False}, Path(out)
        )
        os.replace(derived.path, target)
    return target


def _tally_invalid(details: dict[str, Any], checked: Checked) -> None:
    details["dropped_invalid"] += 1
    codes = details["dropped_invalid_by_code"]
    codes[checked.error.code] = codes.get(checked.error.code, 0) + 1


def _split(
    read: _Pass, params: dict[str, Any], writer: Callable[[str], _Writer]
) -> tuple[dict[str, Any], list[_Writer]]:
    try:
        fraction = float(params.get("validation_fraction", 0.1))
        seed = int(params.get("seed", 42))
    except (TypeError, ValueError):
        raise DatasetError("The validation fraction and the seed must be numbers.") from None
    if not 0 < fraction < 1:
        raise DatasetError("The validation fraction must be between 0 and 1.")
    n = params.get("valid_rows")
    if n is None:
        n = sum(1 for checked in read() if checked.error is None)
    n = int(n)
    if n < 2:
        raise DatasetError(f"A split needs at least 2 valid rows; the file has {n}.")
    k = min(max(round(n * fraction), 1), n - 1)
    details: dict[str, Any] = {
        "op": "split",
        "validation_fraction": fraction,
        "seed": seed,
        "valid_rows": n,
        "train_rows": n - k,
        "validation_rows": k,
        "dropped_invalid": 0,
        "dropped_invalid_by_code": {},
    }
    train, validation = writer("train"), writer("validation")
    # Selection sampling (Knuth's algorithm S): exactly k of the n valid rows, uniformly,
    # in one pass and constant memory, reproducible from the seed.
    rng = random.Random(seed)  # noqa: S311 - a reproducible split, not a secret
    need, left = k, n
    for checked in read():
        if checked.error is not None:
            _tally_invalid(details, checked)
            continue
        if left == 0:
            raise DatasetError("The file has more valid rows than the split was told.")
        if rng.random() * left < need:
            validation.write(checked.row)
            need -= 1
        else:
            train.write(checked.row)
        left -= 1
    if left:
        raise DatasetError("The file has fewer valid rows than the split was told.")
    return details, [train, validation]


def _dedupe(
    read: _Pass, options: ValidationOptions, writer: Callable[[str], _Writer]
) -> tuple[dict[str, Any], list[_Writer]]:
    details: dict[str, Any] = {
        "op": "dedupe",
        "kept": 0,
        "dropped_duplicates": 0,
        "dropped_invalid": 0,
        "dropped_invalid_by_code": {},
    }
    out = writer("deduplicated")
    with HashSpill(options.temp_dir, with_numbers=True) as spill:
        # Identical rows have identical token counts, so a row and its copies are all too
        # long or none is: finding the copies needs no tokenizer, the slow part.
        for checked in read(count_tokens=False):
            if checked.error is None:
                spill.add(row_digest(checked.row), checked.number)
        repeated = spill.repeated_numbers()
        next_repeat = next(repeated, None)
        for checked in read():
            if checked.error is not None:
                _tally_invalid(details, checked)
                continue
            while next_repeat is not None and next_repeat < checked.number:
                next_repeat = next(repeated, None)
            if checked.number == next_repeat:
                details["dropped_duplicates"] += 1
                continue
            out.write(checked.row)
            details["kept"] += 1
    return details, [out]


def _filter(
    read: _Pass, params: dict[str, Any], writer: Callable[[str], _Writer]
) -> tuple[dict[str, Any], list[_Writer]]:
    drop_pii = bool(params.get("drop_pii", False))
    details: dict[str, Any] = {
        "op": "filter",
        "drop_pii": drop_pii,
        "kept": 0,
        "dropped_invalid": 0,
        "dropped_invalid_by_code": {},
        "dropped_pii": 0,
        "dropped_pii_by_kind": {},
    }
    out = writer("filtered")
    by_kind = details["dropped_pii_by_kind"]
    for checked in read():
        if checked.error is not None:
            _tally_invalid(details, checked)
            continue
        if drop_pii:
            findings = personal_data(checked)
            if findings:
                details["dropped_pii"] += 1
                for kind in {kind for kind, _ in findings}:
                    by_kind[kind] = by_kind.get(kind, 0) + 1
                continue
        out.write(checked.row)
        details["kept"] += 1
    return details, [out]


# CSV export -------------------------------------------------------------------------

_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def csv_safe_cell(value: str) -> str:
    """A cell a spreadsheet will not run as a formula (OWASP, CSV injection): one that
    starts with = + - @ tab or carriage return gets a leading single quote."""
    if value.startswith(_FORMULA_START):
        return "'" + value
    return value


class _TextOut:
    def __init__(self, out: BinaryIO | TextIO) -> None:
        self.out = out
        self.binary = not (isinstance(out, io.TextIOBase) or hasattr(out, "encoding"))

    def write(self, text: str) -> None:
        self.out.write(text.encode("utf-8") if self.binary else text)


def export_csv(
    path: Path,
    fmt: FileFormat,
    options: ValidationOptions,
    out: BinaryIO | TextIO,
) -> int:
    """Write the valid rows as CSV, canonical fields as the header (chat messages as JSON
    text), every cell made safe for spreadsheets; return the number of rows written."""
    source = Source(path, fmt, options)
    checker = RowChecker(options, json_cells=source.fmt is not FileFormat.JSONL)
    stream = _TextOut(out)
    writer = csv.writer(stream)
    fields: tuple[str, ...] | None = None
    rows = 0
    for checked in iter_checked(source, checker):
        if checked.error is not None:
            continue
        if fields is None:
            fields = FIELDS[checked.shape]
            writer.writerow(fields)
        row = checked.row
        writer.writerow(
            [
                csv_safe_cell(orjson.dumps(row[name]).decode() if name == "messages" else row[name])
                for name in fields
            ]
        )
        rows += 1
    if fields is None:
        raise DatasetError("The file has no valid rows to export.")
    return rows
