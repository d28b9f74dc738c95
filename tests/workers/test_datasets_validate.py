import csv
import io
import json
import os
import tracemalloc
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from workers.datasets import (
    DatasetError,
    FileFormat,
    Report,
    Shape,
    ValidationOptions,
    sniff_format,
    validate,
)

CHAT = {
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
    ]
}
INSTRUCTION = {"instruction": "Translate to French", "input": "cat", "output": "chat"}
PROMPT = {"prompt": "The capital of France is", "completion": " Paris."}
TEXT = {"text": "Once upon a time."}
ROWS = {
    Shape.CHAT: CHAT,
    Shape.INSTRUCTION: INSTRUCTION,
    Shape.PROMPT_COMPLETION: PROMPT,
    Shape.TEXT: TEXT,
}


def write_jsonl(path: Path, lines: list) -> Path:
    with open(path, "wb") as f:
        for line in lines:
            if isinstance(line, bytes):
                f.write(line + b"\n")
            elif isinstance(line, str):
                f.write(line.encode() + b"\n")
            else:
                f.write(json.dumps(line).encode() + b"\n")
    return path


def write_csv(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8", newline="")
    return path


def write_parquet(path: Path, columns: dict, row_group_size: int | None = None) -> Path:
    pq.write_table(pa.table(columns), path, row_group_size=row_group_size)
    return path


def run(path: Path, fmt: FileFormat | None = None, **options) -> Report:
    fmt = fmt or sniff_format(path, path.name)
    return validate(path, fmt, ValidationOptions(**options))


def lines_of(report: Report) -> list[tuple[int, str]]:
    return [(e.line, e.code) for e in report.errors]


# Each format × each shape -------------------------------------------------------------


@pytest.mark.parametrize("shape", list(Shape))
def test_jsonl_each_shape(tmp_path, shape):
    report = run(write_jsonl(tmp_path / "d.jsonl", [ROWS[shape]] * 3))
    assert (report.format, report.shape) == ("jsonl", shape.value)
    assert (report.rows, report.valid_rows, report.error_count) == (3, 3, 0)
    assert report.duplicate_rows == 2
    assert report.columns == list(ROWS[shape])


@pytest.mark.parametrize("shape", list(Shape))
def test_csv_each_shape(tmp_path, shape):
    row = ROWS[shape]
    cells = [v if isinstance(v, str) else json.dumps(v) for v in row.values()]
    out = io.StringIO()
    csv.writer(out).writerows([list(row), cells, cells])
    report = run(write_csv(tmp_path / "d.csv", out.getvalue()))
    assert (report.format, report.shape, report.rows, report.valid_rows) == (
        "csv",
        shape.value,
        2,
        2,
    )
    assert report.columns == list(row)
    assert report.duplicate_rows == 1


@pytest.mark.parametrize("shape", list(Shape))
def test_parquet_each_shape(tmp_path, shape):
    row = ROWS[shape]
    path = write_parquet(tmp_path / "d.parquet", {k: [v, v] for k, v in row.items()})
    report = run(path)
    assert (report.format, report.shape, report.rows, report.valid_rows) == (
        "parquet",
        shape.value,
        2,
        2,
    )
    assert report.duplicate_rows == 1
    assert report.index["kind"] == "row_groups"


def test_parquet_chat_as_json_text_column(tmp_path):
    path = write_parquet(tmp_path / "d.parquet", {"messages": [json.dumps(CHAT["messages"])]})
    report = run(path)
    assert (report.shape, report.valid_rows) == ("chat", 1)


def test_csv_chat_column_must_hold_json(tmp_path):
    path = write_csv(tmp_path / "d.csv", 'messages\n"[{""role"": ""user""}"\n')
    report = run(path)
    assert lines_of(report) == [(2, "invalid_json")]
    assert report.errors[0].field == "messages"


def test_parquet_null_and_wrong_types(tmp_path):
    path = write_parquet(
        tmp_path / "d.parquet",
        {"prompt": ["a", None, "c", "d"], "completion": ["b", "x", "", "e"]},
    )
    report = run(path)
    assert lines_of(report) == [(2, "wrong_type"), (3, "empty_content")]
    assert report.errors[0].message == "prompt must be a string, not null"


# Column mapping -----------------------------------------------------------------------


def test_csv_column_mapping(tmp_path):
    path = write_csv(tmp_path / "d.csv", "question,context,answer\nWhat?,,That.\nWho?,x,Me.\n")
    report = run(
        path, column_mapping={"instruction": "question", "input": "context", "output": "answer"}
    )
    assert (report.shape, report.valid_rows) == ("instruction", 2)


def test_mapping_to_a_missing_column_is_a_whole_file_error(tmp_path):
    path = write_csv(tmp_path / "d.csv", "question,reply\nWhat?,That.\n")
    with pytest.raises(DatasetError, match="Column 'answer' .*its columns are: question, reply"):
        run(path, column_mapping={"instruction": "question", "output": "answer"})
    parquet = write_parquet(tmp_path / "d.parquet", {"q": ["a"], "a": ["b"]})
    with pytest.raises(DatasetError, match="'answer'"):
        run(parquet, column_mapping={"instruction": "q", "output": "answer"})


def test_jsonl_column_mapping_and_a_row_without_the_mapped_key(tmp_path):
    path = write_jsonl(
        tmp_path / "d.jsonl",
        [{"q": "Hi", "a": "Hello"}, {"q": "Bye"}, {"q": "Yo", "a": "Hey"}],
    )
    report = run(path, column_mapping={"prompt": "q", "completion": "a"})
    assert (report.shape, report.valid_rows) == ("prompt_completion", 2)
    assert lines_of(report) == [(2, "missing_field")]
    assert report.errors[0].message == "completion (column 'a') is missing"


def test_mapping_names_an_unknown_field():
    with pytest.raises(DatasetError, match="'answer', which is not a dataset field"):
        ValidationOptions(column_mapping={"answer": "a"})


def test_parquet_column_mapping_with_list_of_structs(tmp_path):
    path = write_parquet(tmp_path / "d.parquet", {"conversation": [CHAT["messages"]] * 2})
    report = run(path, column_mapping={"messages": "conversation"})
    assert (report.shape, report.valid_rows, report.duplicate_rows) == ("chat", 2, 1)


# Every error kind, with its line -------------------------------------------------------


def test_bad_lines_3_and_7_are_reported_as_lines_3_and_7(tmp_path):
    lines = [CHAT] * 9
    lines[2] = "{not json"
    lines[6] = '{"messages": []}'
    report = run(write_jsonl(tmp_path / "d.jsonl", lines))
    assert lines_of(report) == [(3, "invalid_json"), (7, "empty_content")]
    assert (report.rows, report.valid_rows, report.error_count) == (9, 7, 2)
    assert report.errors_by_code == {"invalid_json": 1, "empty_content": 1}


def test_blank_lines_are_skipped_but_lines_stay_physical(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [CHAT, "", "[1]", "   ", "\t", CHAT, "5"])
    report = run(path)
    assert report.rows == 4
    assert lines_of(report) == [(3, "not_object"), (7, "not_object")]
    assert report.errors[0].message == "the row is a JSON list, not an object"


def chat(*turns, **extra):
    return {"messages": [dict(zip(("role", "content"), t, strict=True)) for t in turns], **extra}


@pytest.mark.parametrize(
    ("row", "code", "message"),
    [
        ({"messages": "hi"}, "wrong_type", "messages must be a list of {role, content} objects"),
        ({"messages": ["hi"]}, "wrong_type", "messages[0] must be an object, not string"),
        ({"messages": [{"content": "x"}]}, "missing_field", "messages[0].role is missing"),
        ({"messages": [{"role": 1, "content": "x"}]}, "wrong_type", "messages[0].role must be"),
        (
            chat(("user", "a"), ("assistant", "b"), ("bot", "c")),
            "unknown_role",
            "messages[2].role 'bot' is not one of assistant, system, tool, user",
        ),
        ({"messages": [{"role": "user"}]}, "missing_field", "messages[0].content is missing"),
        (
            {"messages": [{"role": "user", "content": None}]},
            "wrong_type",
            "messages[0].content must be a string, not null",
        ),
        (chat(("user", "a"), ("assistant", "  \n")), "empty_content", "messages[1].content is"),
        (chat(("system", "a"), ("user", "b")), "no_assistant_turn", "no assistant turn"),
        ({"instruction": "a"}, "missing_field", "output is missing"),
        ({"instruction": "a", "output": 5}, "wrong_type", "output must be a string, not number"),
        ({"instruction": "a", "input": [], "output": "b"}, "wrong_type", "input must be"),
        ({"prompt": "", "completion": "b"}, "empty_content", "prompt is empty"),
        ({"completion": "b"}, "missing_field", "prompt is missing"),
        ({"text": True}, "wrong_type", "text must be a string, not boolean"),
        ({"title": "a", "body": "b"}, "unknown_shape", "matches no dataset shape"),
        ("[]", "not_object", "not an object"),
        ("{]", "invalid_json", "not valid JSON"),
    ],
)
def test_row_errors(tmp_path, row, code, message):
    # Each bad row first, then a good one, so that the file's shape comes from the row.
    good = TEXT if "messages" in str(row) else CHAT
    report = run(write_jsonl(tmp_path / "d.jsonl", [row, good]))
    assert [(e.line, e.code) for e in report.errors] == [(1, code)]
    assert message in report.errors[0].message


def test_custom_roles(tmp_path):
    row = chat(("human", "a"), ("assistant", "b"))
    report = run(write_jsonl(tmp_path / "d.jsonl", [row]), roles=frozenset({"human", "assistant"}))
    assert report.valid_rows == 1


def test_mixed_shapes(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"foo": 1}, PROMPT, CHAT, PROMPT, TEXT])
    report = run(path)
    assert report.shape == "prompt_completion"
    assert lines_of(report) == [(1, "unknown_shape"), (3, "mixed_shape"), (5, "mixed_shape")]
    assert report.errors[1].message == (
        "the row is chat (messages) but the dataset is prompt_completion (prompt, completion), "
        "set by line 2"
    )


def test_given_shape_makes_other_rows_errors(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [CHAT, TEXT, {"foo": "bar"}])
    report = run(path, shape=Shape.TEXT)
    assert report.shape == "text"
    assert lines_of(report) == [(1, "mixed_shape"), (3, "missing_field")]


def test_not_utf8_line_is_an_error_for_that_line_only(tmp_path):
    latin1 = '{"text": "café"}'.encode("latin-1")
    report = run(write_jsonl(tmp_path / "d.jsonl", [TEXT, latin1, TEXT]))
    assert lines_of(report) == [(2, "not_utf8")]
    assert "byte 0xe9" in report.errors[0].message
    assert report.valid_rows == 2


def test_csv_not_utf8_row(tmp_path):
    path = tmp_path / "d.csv"
    path.write_bytes(b"text\nfine\ncaf\xe9\nalso fine\n")
    report = run(path)
    assert lines_of(report) == [(3, "not_utf8")]


def test_csv_ragged_rows_and_spreadsheet_line_numbers(tmp_path):
    text = 'prompt,completion\na,b\n"multi\nline",c\nonly one cell\nd,e,f\n,\ng,h\n'
    report = run(write_csv(tmp_path / "d.csv", text))
    # Spreadsheet rows: header 1, a 2, multi-line 3, "only one" 4, d 5, empty 6, g 7.
    assert lines_of(report) == [(4, "csv_error"), (5, "csv_error")]
    assert report.errors[0].message == "the row has 1 cells but the header has 2 columns"
    assert (report.rows, report.valid_rows) == (5, 3)


def test_csv_semicolon_delimiter_and_bom(tmp_path):
    path = tmp_path / "d.csv"
    path.write_bytes("\ufeffprompt;completion\nHallo;Welt\n".encode())
    report = run(path)
    assert (report.shape, report.valid_rows, report.columns) == (
        "prompt_completion",
        1,
        ["prompt", "completion"],
    )


def test_too_long_line_is_skipped_without_holding_it(tmp_path):
    path = tmp_path / "big.jsonl"
    size = 50 * 1024 * 1024
    with open(path, "wb") as f:
        f.write(json.dumps(TEXT).encode() + b"\n")
        f.write(b'{"text": "' + b"a" * size + b'"}\n')
        f.write(json.dumps(TEXT).encode() + b"\n")
    tracemalloc.start()
    try:
        report = run(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert lines_of(report) == [(2, "line_too_long")]
    assert "50.0 MB, longer than the limit of 8.0 MB" in report.errors[0].message
    assert report.valid_rows == 2
    assert peak < 16 * 1024 * 1024, f"peak {peak / 1048576:.1f} MiB"


def test_too_long_line_limit_is_an_option(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [TEXT, {"text": "x" * 5000}, TEXT])
    report = run(path, max_line_bytes=1000)
    assert lines_of(report) == [(2, "line_too_long")]
    csv_path = write_csv(tmp_path / "d.csv", f'text\na\n"{"x" * 5000}"\nb\n')
    report = run(csv_path, max_line_bytes=1000)
    assert lines_of(report) == [(3, "line_too_long")]
    assert report.valid_rows == 2


def test_too_long_in_tokens(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "one two"}, {"text": "one two three"}])
    report = run(path, tokenize=lambda text: len(text.split()), max_tokens=2)
    assert lines_of(report) == [(2, "too_long")]
    assert report.errors[0].message == "the row has 3 tokens; the model's context is 2"
    assert report.length_unit == "tokens"


def test_max_tokens_needs_a_tokenizer():
    with pytest.raises(ValueError, match="tokenize"):
        ValidationOptions(max_tokens=10)


def test_errors_kept_are_capped_but_all_counted(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", ["{"] * 30 + [TEXT])
    report = run(path, max_errors_kept=5)
    assert len(report.errors) == 5
    assert report.error_count == 30
    assert report.errors_by_code == {"invalid_json": 30}


# Whole-file problems -------------------------------------------------------------------


@pytest.mark.parametrize("content", [b"", b"\n\n  \n"])
def test_empty_file(tmp_path, content):
    path = tmp_path / "d.jsonl"
    path.write_bytes(content)
    with pytest.raises(DatasetError, match=r"^The file is empty\.$"):
        validate(path, FileFormat.JSONL, ValidationOptions())


def test_csv_with_only_a_header_is_empty(tmp_path):
    with pytest.raises(DatasetError, match="empty"):
        run(write_csv(tmp_path / "d.csv", "text\n"))


def test_csv_without_a_header(tmp_path):
    path = write_csv(tmp_path / "d.csv", "What is 2+2?,4\nWhat is 3+3?,6\n")
    with pytest.raises(DatasetError, match="must be a header naming its columns"):
        run(path)


def test_csv_missing_column_for_the_given_shape(tmp_path):
    path = write_csv(tmp_path / "d.csv", "instruction,answer\na,b\n")
    with pytest.raises(DatasetError, match="needs the column.* output"):
        run(path, shape=Shape.INSTRUCTION)


def test_no_row_of_any_shape(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", ["hello", "world"])
    with pytest.raises(DatasetError, match="No row is a dataset row.*Line 1"):
        run(path)


def test_rows_of_a_shape_that_are_all_invalid_still_report(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [chat(("user", "a"))] * 2)
    report = run(path)
    assert (report.shape, report.valid_rows, report.errors_by_code) == (
        "chat",
        0,
        {"no_assistant_turn": 2},
    )
    assert report.length_stats is None


def test_damaged_parquet(tmp_path):
    path = write_parquet(tmp_path / "d.parquet", {"text": ["a"] * 100})
    data = path.read_bytes()
    path.write_bytes(data[:4] + b"\x00" * 50 + data[54:])
    with pytest.raises(DatasetError, match="Parquet file"):
        validate(path, FileFormat.PARQUET, ValidationOptions())
    path.write_bytes(data[:-30])
    with pytest.raises(DatasetError, match="The Parquet file cannot be read"):
        validate(path, FileFormat.PARQUET, ValidationOptions())


# sniff_format ---------------------------------------------------------------------------


def test_sniff_format_by_suffix(tmp_path):
    jsonl = write_jsonl(tmp_path / "a.jsonl", [TEXT])
    assert sniff_format(jsonl, "Data.JSONL") is FileFormat.JSONL
    assert sniff_format(jsonl, "data.json") is FileFormat.JSONL
    assert sniff_format(write_csv(tmp_path / "a.csv", "text\na\n"), "a.csv") is FileFormat.CSV
    parquet = write_parquet(tmp_path / "a.parquet", {"text": ["a"]})
    assert sniff_format(parquet, "a.parquet") is FileFormat.PARQUET


def test_sniff_format_rejects(tmp_path):
    text = write_jsonl(tmp_path / "a.jsonl", [TEXT])
    with pytest.raises(DatasetError, match=r"\.jsonl.*\.csv.*\.parquet"):
        sniff_format(text, "data.xlsx")
    with pytest.raises(DatasetError, match="not a Parquet file"):
        sniff_format(text, "data.parquet")
    parquet = write_parquet(tmp_path / "a.parquet", {"text": ["a"]})
    with pytest.raises(DatasetError, match="is a Parquet file"):
        sniff_format(parquet, "data.csv")
    array = tmp_path / "a.json"
    array.write_text(json.dumps([TEXT, TEXT], indent=2))
    with pytest.raises(DatasetError, match="one JSON array.*Convert it"):
        sniff_format(array, "a.json")
    empty = tmp_path / "e.jsonl"
    empty.write_bytes(b"")
    with pytest.raises(DatasetError, match="empty"):
        sniff_format(empty, "e.jsonl")


@pytest.mark.parametrize(
    ("content", "what"),
    [
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + os.urandom(200), "PNG image"),
        (os.urandom(4096), "binary file"),
        ("text\nhi\n".encode("utf-16"), "UTF-16"),
        (b"PK\x03\x04" + os.urandom(100), "Excel workbook"),
    ],
)
def test_sniff_format_binary(tmp_path, content, what):
    path = tmp_path / "x"
    path.write_bytes(content)
    with pytest.raises(DatasetError, match="looks like a binary file") as exc:
        sniff_format(path, "data.jsonl")
    assert what in str(exc.value)


# Statistics -----------------------------------------------------------------------------


def test_length_statistics_and_histogram(tmp_path):
    lines = [{"text": "x" * n} for n in range(1, 101)]
    report = run(write_jsonl(tmp_path / "d.jsonl", lines))
    stats = report.length_stats
    assert report.length_unit == "characters"
    assert (stats["min"], stats["max"], stats["total"], stats["mean"]) == (1, 100, 5050, 50.5)
    assert (stats["p50"], stats["p95"]) == (50, 95)
    assert sum(b["count"] for b in report.histogram) == 100
    assert 8 <= len(report.histogram) <= 13
    assert report.histogram[0]["lo"] == 1 and report.histogram[-1]["hi"] == 100


def test_percentiles_of_long_rows_are_within_a_few_percent(tmp_path):
    from workers.datasets.stats import LengthHistogram

    hist = LengthHistogram()
    values = [1000 + i * 37 for i in range(10000)]
    for v in values:
        hist.add(v)
    exact_p95 = sorted(values)[9499]
    assert abs(hist.percentile(95) - exact_p95) / exact_p95 < 0.02
    assert len(hist.bins) < 500  # fixed-size bins, not one entry per row
    buckets = hist.buckets()
    assert sum(b["count"] for b in buckets) == 10000


def test_duplicates_after_canonicalisation(tmp_path):
    a = chat(("user", "a"), ("assistant", "b"))
    same_after_mapping = {"messages": a["messages"], "id": 7}
    reordered = {
        "messages": [{"content": "a", "role": "user"}, {"content": "b", "role": "assistant"}]
    }
    path = write_jsonl(tmp_path / "d.jsonl", [a, same_after_mapping, reordered, CHAT, "{", CHAT])
    report = run(path)
    assert report.duplicate_rows == 3


def test_duplicates_spilled_to_disk_count_the_same():
    from workers.datasets.stats import HashSpill

    with HashSpill(buffer_bytes=64) as spill:
        for i in range(5000):
            spill.add(hash(str(i % 1000)))
        assert spill.spilled
        assert spill.duplicates() == 4000


def test_progress_reports_bytes_and_ends_at_total(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [CHAT] * 100)
    calls = []
    validate(
        path, FileFormat.JSONL, ValidationOptions(), lambda done, total: calls.append((done, total))
    )
    size = path.stat().st_size
    assert calls[-1] == (size, size)
    assert all(done <= total for done, total in calls)


def test_report_round_trips_through_json(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [CHAT, "{", {"text": "mail a@b.example.com"}])
    report = run(path)
    data = json.loads(json.dumps(report.as_dict()))
    again = Report.from_dict(data)
    assert again == report
    assert data["errors"][0] == {
        "line": 2,
        "code": "invalid_json",
        "message": again.errors[0].message,
        "field": None,
    }


def test_index_records_every_nth_row(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [TEXT] * 25)
    report = run(path, index_every=10)
    line_bytes = len(json.dumps(TEXT)) + 1
    assert report.index["entries"] == [[0, 1], [10 * line_bytes, 11], [20 * line_bytes, 21]]
    assert report.index["shape"] == "text"


def test_index_stays_bounded_on_huge_files(tmp_path, monkeypatch):
    from workers.datasets import read_page, validation

    monkeypatch.setattr(validation, "MAX_INDEX_ENTRIES", 4)
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": f"row {i}"} for i in range(100)])
    options = ValidationOptions(index_every=5)
    report = validate(path, FileFormat.JSONL, options)
    assert report.index["every"] == 40
    assert [line for _, line in report.index["entries"]] == [1, 41, 81]
    page = read_page(path, FileFormat.JSONL, options, report.index, 90, 2)
    assert [p.row["text"] for p in page] == ["row 90", "row 91"]


def test_windows_line_endings(tmp_path):
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_bytes(b'{"text": "a"}\r\n\r\n{"text": "b"}\r\n{bad\r\n')
    report = run(jsonl)
    assert (report.valid_rows, lines_of(report)) == (2, [(4, "invalid_json")])
    path = tmp_path / "d.csv"
    path.write_bytes(b'prompt,completion\r\na,b\r\n"two\r\nlines",c\r\nd\r\n')
    report = run(path)
    assert (report.valid_rows, lines_of(report)) == (2, [(4, "csv_error")])
    from workers.datasets import read_page

    page = read_page(path, FileFormat.CSV, ValidationOptions(), report.index, 1, 1)
    assert page[0].row == {"prompt": "two\r\nlines", "completion": "c"}


@pytest.mark.parametrize("block", [1, 3, 7, 64])
@pytest.mark.parametrize("trailing_newline", [True, False])
def test_physical_lines_across_block_boundaries(monkeypatch, block, trailing_newline):
    import random

    from workers.datasets import readers

    monkeypatch.setattr(readers, "BLOCK", block)
    rng = random.Random(block)
    lines = [
        bytes(rng.choice(b"ab{}") for _ in range(rng.choice([0, 1, 5, 19, 20, 21, 45])))
        for _ in range(200)
    ]
    data = b"\n".join(lines) + (b"\n" if trailing_newline else b"")
    expected = []
    offset = 0
    for number, line in enumerate(lines, 1):
        if line or trailing_newline or number < len(lines):
            expected.append((number, offset, line if len(line) <= 20 else None, len(line)))
        offset += len(line) + 1
    got = [
        (n, off, None if d is None else bytes(d), size)
        for n, off, d, size in readers.physical_lines(io.BytesIO(data), 0, 1, 20, None)
    ]
    assert got == expected


@pytest.mark.parametrize("shape", list(Shape))
def test_character_lengths_are_the_length_of_row_text(tmp_path, shape):
    from workers.datasets import row_text

    row = ROWS[shape]
    canonical = {**{"input": ""}, **row} if shape is Shape.INSTRUCTION else row
    report = run(write_jsonl(tmp_path / "d.jsonl", [row]))
    assert report.length_stats["total"] == len(row_text(canonical, shape))


def test_personal_data_behind_json_escapes_is_found(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"text": "café\ncall\n+44 20 7946 0958"}) + "\n")
    assert "\\n+44" in path.read_text()
    assert run(path).pii["phone"]["count"] == 1
