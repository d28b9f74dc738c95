import csv
import hashlib
import io
import json

import pytest

from workers.datasets import (
    DatasetError,
    FileFormat,
    ValidationOptions,
    csv_safe_cell,
    export_csv,
    transform,
    validate,
)


def chat(i: int) -> dict:
    return {
        "messages": [
            {"role": "user", "content": f"q{i}"},
            {"role": "assistant", "content": f"a{i}"},
        ]
    }


def write_jsonl(path, lines):
    path.write_text(
        "".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines)
    )
    return path


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture
def source(tmp_path):
    lines = [chat(i) for i in range(200)]
    lines[10] = "{bad"
    lines[20] = {"messages": [{"role": "user", "content": "no answer"}]}
    return write_jsonl(tmp_path / "d.jsonl", lines)


def split(path, out_dir, **params):
    params = {"validation_fraction": 0.1, "seed": 42, **params}
    return transform(path, FileFormat.JSONL, ValidationOptions(), "split", params, out_dir)


def test_split_is_deterministic_and_exact(tmp_path, source):
    first = split(source, tmp_path / "a")
    again = split(source, tmp_path / "b")
    other = split(source, tmp_path / "c", seed=7)
    names = [d.name for d in first]
    assert names == ["train", "validation"]
    train, validation = first
    # 198 valid rows; round(19.8) = 20 of them go to validation.
    assert (train.rows, validation.rows) == (178, 20)
    assert train.details["dropped_invalid"] == 2
    assert train.details["dropped_invalid_by_code"] == {"invalid_json": 1, "no_assistant_turn": 1}
    for a, b in zip(first, again, strict=True):
        assert a.path.read_bytes() == b.path.read_bytes()
        assert a.sha256 == b.sha256 == hashlib.sha256(a.path.read_bytes()).hexdigest()
        assert a.size == a.path.stat().st_size
    assert validation.path.read_bytes() != other[1].path.read_bytes()
    assert other[1].rows == 20
    # Together the parts are exactly the valid rows, in their original order.
    together = read_jsonl(train.path) + read_jsonl(validation.path)
    valid = [chat(i) for i in range(200) if i not in (10, 20)]
    assert sorted(together, key=valid.index) == valid
    assert read_jsonl(train.path) == [r for r in valid if r in read_jsonl(train.path)]


def test_split_with_the_valid_row_count_reads_once(tmp_path, source):
    report = validate(source, FileFormat.JSONL, ValidationOptions())
    once = split(source, tmp_path / "a", valid_rows=report.valid_rows)
    twice = split(source, tmp_path / "b")
    assert [d.sha256 for d in once] == [d.sha256 for d in twice]
    with pytest.raises(DatasetError, match="more valid rows"):
        split(source, tmp_path / "c", valid_rows=report.valid_rows - 5)
    assert list((tmp_path / "c").iterdir()) == []  # nothing half-written is left


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.5, "x"])
def test_split_rejects_bad_fractions(tmp_path, source, fraction):
    with pytest.raises(DatasetError, match="fraction"):
        split(source, tmp_path / "o", validation_fraction=fraction)


def test_split_needs_two_rows(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [chat(0)])
    with pytest.raises(DatasetError, match="at least 2 valid rows"):
        split(path, tmp_path / "o")


def test_dedupe_keeps_first_occurrences(tmp_path):
    order = [0, 1, 0, 2, 1, 1, 3, "{", 0]
    path = write_jsonl(tmp_path / "d.jsonl", [chat(i) if i != "{" else "{" for i in order])
    (out,) = transform(path, FileFormat.JSONL, ValidationOptions(), "dedupe", {}, tmp_path / "o")
    assert out.name == "deduplicated"
    assert read_jsonl(out.path) == [chat(0), chat(1), chat(2), chat(3)]
    assert out.details == {
        "op": "dedupe",
        "kept": 4,
        "dropped_duplicates": 4,
        "dropped_invalid": 1,
        "dropped_invalid_by_code": {"invalid_json": 1},
    }
    assert validate(path, FileFormat.JSONL, ValidationOptions()).duplicate_rows == 4


def test_dedupe_with_spilled_digests(tmp_path, monkeypatch):
    from workers.datasets import stats

    monkeypatch.setattr(stats, "SPILL_BUFFER_BYTES", 256)
    order = [i % 37 for i in range(500)]
    path = write_jsonl(tmp_path / "d.jsonl", [chat(i) for i in order])
    (out,) = transform(path, FileFormat.JSONL, ValidationOptions(), "dedupe", {}, tmp_path / "o")
    assert read_jsonl(out.path) == [chat(i) for i in range(37)]
    assert out.details["dropped_duplicates"] == 463


def test_filter_drops_invalid_and_personal_data(tmp_path):
    lines = [
        {"prompt": "hi", "completion": "there"},
        {"prompt": "mail", "completion": "me at bob@example.com"},
        {"prompt": "", "completion": "x"},
        {"prompt": "card", "completion": "4242 4242 4242 4242 or +44 20 7946 0958"},
        {"prompt": "ok", "completion": "fine"},
    ]
    path = write_jsonl(tmp_path / "d.jsonl", lines)
    options = ValidationOptions()
    (kept,) = transform(
        path, FileFormat.JSONL, options, "filter", {"drop_pii": True}, tmp_path / "a"
    )
    assert kept.name == "filtered"
    assert read_jsonl(kept.path) == [lines[0], lines[4]]
    assert kept.details == {
        "op": "filter",
        "drop_pii": True,
        "kept": 2,
        "dropped_invalid": 1,
        "dropped_invalid_by_code": {"empty_content": 1},
        "dropped_pii": 2,
        "dropped_pii_by_kind": {"email": 1, "payment_card": 1, "phone": 1},
    }
    (all_valid,) = transform(
        path, FileFormat.JSONL, options, "filter", {"drop_pii": False}, tmp_path / "b"
    )
    assert all_valid.rows == 4 and all_valid.details["dropped_pii"] == 0


def test_outputs_are_canonical_json_lines(tmp_path):
    csv_path = tmp_path / "d.csv"
    csv_path.write_text("question,answer,extra\nWhat?,That.,x\n", newline="")
    options = ValidationOptions(column_mapping={"instruction": "question", "output": "answer"})
    (out,) = transform(csv_path, FileFormat.CSV, options, "filter", {}, tmp_path / "o")
    assert out.path.read_text() == '{"instruction":"What?","input":"","output":"That."}\n'


def test_unknown_operation(tmp_path, source):
    with pytest.raises(DatasetError, match="Unknown transformation"):
        transform(source, FileFormat.JSONL, ValidationOptions(), "shuffle", {}, tmp_path)


# CSV export ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cell", "safe"),
    [
        ("=1+2", "'=1+2"),
        ("+SUM(A1)", "'+SUM(A1)"),
        ("-2+3", "'-2+3"),
        ("@cmd", "'@cmd"),
        ("\tx", "'\tx"),
        ("\rx", "'\rx"),
        ("plain", "plain"),
        ("a=b", "a=b"),
        ("", ""),
    ],
)
def test_csv_safe_cell(cell, safe):
    assert csv_safe_cell(cell) == safe


def test_export_escapes_formulas(tmp_path):
    src = tmp_path / "d.csv"
    rows = [
        ["instruction", "input", "output"],
        ['=HYPERLINK("http://evil.example","click")', "", "+1"],
        ["@SUM(1)", "-x", "fine"],
        ["", "", "invalid: no instruction"],
    ]
    with open(src, "w", newline="") as f:
        csv.writer(f).writerows(rows)
    out = io.BytesIO()
    n = export_csv(src, FileFormat.CSV, ValidationOptions(), out)
    assert n == 2
    exported = list(csv.reader(io.StringIO(out.getvalue().decode())))
    assert exported == [
        ["instruction", "input", "output"],
        ['\'=HYPERLINK("http://evil.example","click")', "", "'+1"],
        ["'@SUM(1)", "'-x", "fine"],
    ]


def test_export_chat_to_a_text_stream(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [chat(0), "{", chat(1)])
    out = io.StringIO()
    assert export_csv(path, FileFormat.JSONL, ValidationOptions(), out) == 2
    exported = list(csv.reader(io.StringIO(out.getvalue())))
    assert exported[0] == ["messages"]
    assert json.loads(exported[1][0]) == chat(0)["messages"]


def test_export_without_valid_rows(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": ""}])
    with pytest.raises(DatasetError, match="no valid rows"):
        export_csv(path, FileFormat.JSONL, ValidationOptions(), io.BytesIO())


def test_dedupe_counts_tokens_in_one_pass_only(tmp_path):
    lines = [
        {"text": "short"},
        {"text": "much too long"},
        {"text": "short"},
        {"text": "much too long"},
        {"text": "also short"},
    ]
    path = write_jsonl(tmp_path / "d.jsonl", lines)
    calls = []

    def tokenize(text):
        calls.append(text)
        return len(text.split())

    options = ValidationOptions(tokenize=tokenize, max_tokens=2)
    (out,) = transform(path, FileFormat.JSONL, options, "dedupe", {}, tmp_path / "o")
    assert read_jsonl(out.path) == [{"text": "short"}, {"text": "also short"}]
    assert out.details["dropped_duplicates"] == 1
    assert out.details["dropped_invalid_by_code"] == {"too_long": 2}
    assert len(calls) == len(lines)
