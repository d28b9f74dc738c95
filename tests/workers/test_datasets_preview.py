import csv
import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from workers.datasets import FileFormat, ValidationOptions, read_page, validate
from workers.datasets import readers as readers_module

EVERY = 50
N = 3 * EVERY + 37  # more than three index entries, and a partial last stretch


def row(i: int) -> dict:
    return {
        "messages": [
            {"role": "user", "content": f"question {i}"},
            {"role": "assistant", "content": f"answer {i}"},
        ]
    }


@pytest.fixture
def seeks(monkeypatch):
    """The offsets reading started from."""
    started = []
    original = readers_module.physical_lines

    def spy(f, pos, *args, **kwargs):
        started.append(pos)
        return original(f, pos, *args, **kwargs)

    monkeypatch.setattr(readers_module, "physical_lines", spy)
    return started


def check_page_matches_full_read(path, fmt, options, start, count, seeks):
    report = validate(path, fmt, options)
    everything = read_page(path, fmt, options, None, 0, report.rows)
    assert [p.number for p in everything] == list(range(report.rows))
    seeks.clear()
    page = read_page(path, fmt, options, report.index, start, count)
    assert page == everything[start : start + count]
    return report, page


def test_jsonl_page_from_the_middle(tmp_path, seeks):
    path = tmp_path / "d.jsonl"
    lines = [json.dumps(row(i)) for i in range(N)]
    lines[130] = "{broken"
    lines.insert(100, "")  # a blank line: row numbers and physical lines part ways
    path.write_text("\n".join(lines) + "\n")
    options = ValidationOptions(index_every=EVERY)
    report, page = check_page_matches_full_read(path, FileFormat.JSONL, options, 125, 10, seeks)
    # Started at the index entry for row 100, not at the start of the file.
    assert seeks == [report.index["entries"][2][0]] and seeks[0] > 0
    assert page[0].number == 125 and page[0].line == 127
    assert page[0].row == row(125) and page[0].shape == "chat" and page[0].error is None
    broken = page[5]
    assert (broken.number, broken.line, broken.row, broken.error_code) == (
        130,
        132,
        None,
        "invalid_json",
    )
    assert broken.raw == "{broken"


def test_csv_page_with_quoted_multiline_fields(tmp_path, seeks):
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["prompt", "completion"])
    for i in range(N):
        # Every seventh prompt spans lines, including around the index entries.
        prompt = f"line one {i}\nline two\n" if i % 7 == 0 or i % EVERY == EVERY - 1 else f"p{i}"
        writer.writerow([prompt, f"c{i}"])
    path = tmp_path / "d.csv"
    path.write_text(out.getvalue(), newline="")
    options = ValidationOptions(index_every=EVERY)
    report, page = check_page_matches_full_read(path, FileFormat.CSV, options, 148, 5, seeks)
    assert report.valid_rows == N
    assert seeks[-1] == report.index["entries"][2][0]
    assert [p.row["completion"] for p in page] == ["c148", "c149", "c150", "c151", "c152"]
    assert page[1].row["prompt"] == "line one 149\nline two\n"
    assert page[0].line == 150  # the spreadsheet row: header is 1, row 0 is 2


def test_parquet_page_reads_only_the_row_group_it_needs(tmp_path, monkeypatch):
    path = tmp_path / "d.parquet"
    table = pa.table({"prompt": [f"p{i}" for i in range(N)], "completion": ["c"] * N})
    pq.write_table(table, path, row_group_size=EVERY)
    options = ValidationOptions()
    report = validate(path, FileFormat.PARQUET, options)
    assert report.index["starts"] == [0, 50, 100, 150]
    everything = read_page(path, FileFormat.PARQUET, options, report.index, 0, N)
    groups = []
    original = pq.ParquetFile.iter_batches

    def spy(self, *args, row_groups=None, **kwargs):
        groups.append(list(row_groups))
        return original(self, *args, row_groups=row_groups, **kwargs)

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", spy)
    page = read_page(path, FileFormat.PARQUET, options, report.index, 160, 5)
    assert page == everything[160:165]
    assert groups == [[3]]
    assert [p.line for p in page] == [161, 162, 163, 164, 165]


def test_page_past_the_end_and_empty_pages(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(row(i)) + "\n" for i in range(10)))
    options = ValidationOptions(index_every=4)
    report = validate(path, FileFormat.JSONL, options)
    assert [p.number for p in read_page(path, FileFormat.JSONL, options, report.index, 8, 5)] == [
        8,
        9,
    ]
    assert read_page(path, FileFormat.JSONL, options, report.index, 50, 5) == []
    assert read_page(path, FileFormat.JSONL, options, report.index, 0, 0) == []


def test_preview_judges_rows_as_validate_did(tmp_path):
    # The first row is invalid chat; the second sets the shape; the third is mixed.
    lines = [
        {"messages": [{"role": "user", "content": "no answer"}]},
        {"text": "hello, write to ann@example.com"},
        row(0),
    ]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    options = ValidationOptions()
    report = validate(path, FileFormat.JSONL, options)
    page = read_page(path, FileFormat.JSONL, options, report.index, 0, 3)
    assert [p.error_code for p in page] == [e.code for e in report.errors[:1]] + [
        None,
        "mixed_shape",
    ]
    assert page[2].error == report.errors[1].message
    assert page[1].pii == ["email"]


def test_raw_of_an_invalid_row_is_cut_short(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(row(0)) + "\n" + '{"messages": "' + "x" * 10000 + "\n")
    page = read_page(path, FileFormat.JSONL, ValidationOptions(), None, 1, 1)
    assert page[0].error_code == "invalid_json"
    assert len(page[0].raw) <= 2049 and page[0].raw.endswith("…")
