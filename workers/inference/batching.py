"""Continuous batching: many requests decoded together on one resident llama.cpp context.

A replica's context holds ``parallel_slots`` sequences in one KV cache; each sequence
attends only to its own cells, so one request never sees another's tokens. Every
step the scheduler builds one ``llama_batch`` that holds the next token of each
generating sequence followed by prompt chunks of newly admitted ones, calls
``llama_decode`` once, and samples each sequence that produced logits with its own
sampler chain (its own temperature, top-p, penalties and seed). A sequence
that ends (end of generation, a stop sequence, max_tokens, cancellation) has its KV
cache removed at once and its slot goes to the next waiting request.

Decoding is bound by memory bandwidth: a step reads the weights once whether the batch
holds one token or sixteen, so N streams cost little more per step than one.

Batch invariance. llama.cpp's CPU matrix kernels round differently depending on how
many rows a micro-batch has (one row takes a vector path, groups of four a packed
path, larger tiles others), so on its own a request's greedy answer would change with
the number of requests it happens to share a step with. The scheduler therefore
decodes in micro-batches of exactly ``QUANTUM`` rows (``n_ubatch``) and pads every
batch to a multiple of ``QUANTUM`` with tokens of a scratch sequence that is erased
after the step: every row of every request goes through the same kernels, alone or
not, and greedy output is identical either way (tests/serving/test_batching.py). The
price is paid only below ``QUANTUM`` concurrent streams (a lone stream computes eight
rows to use one); see docs/serving.md for the figures.

This module is only llama.cpp and plain Python; ``engine.Replica`` feeds it requests
from its queue and turns what it yields into events.
"""

from __future__ import annotations

import codecs
import ctypes
import itertools
from dataclasses import dataclass, field

import llama_cpp
from llama_cpp import _internals

# llama.cpp's "pick a random seed" value.
RANDOM_SEED = 0xFFFFFFFF
# How many recent tokens repetition penalties look at (llama-cpp-python's default).
PENALTY_LAST_N = 64
# min_p that llama-cpp-python's create_completion applies unless told otherwise.
MIN_P = 0.05
# Rows per llama.cpp micro-batch; every batch is padded to a multiple of it.
QUANTUM = 8


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.8
    top_p: float = 0.95
    top_k: int = 40
    repeat_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None


def sampler_chain(sampling: Sampling, n_vocab: int, history: list[int]) -> int:
    """A llama.cpp sampler chain for one request, in llama-cpp-python's order.

    ``history`` (the end of the prompt) is fed to the chain so repetition penalties see
    the prompt, as llama.cpp's server does. Returns the chain's pointer; free it with
    ``llama_sampler_free``.
    """
    chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())

    def add(sampler) -> None:
        llama_cpp.llama_sampler_chain_add(chain, sampler)

    add(
        llama_cpp.llama_sampler_init_penalties(
            n_vocab,
            PENALTY_LAST_N,
            sampling.repeat_penalty,
            sampling.frequency_penalty,
            sampling.presence_penalty,
        )
    )
    seed = RANDOM_SEED if sampling.seed is None else sampling.seed & 0xFFFFFFFF
    if sampling.temperature == 0:
        add(llama_cpp.llama_sampler_init_greedy())
    else:
        add(llama_cpp.llama_sampler_init_top_k(sampling.top_k))
        add(llama_cpp.llama_sampler_init_top_p(sampling.top_p, 1))
        add(llama_cpp.llama_sampler_init_min_p(MIN_P, 1))
        add(llama_cpp.llama_sampler_init_temp(sampling.temperature))
        add(llama_cpp.llama_sampler_init_dist(seed))
    for token in history[-PENALTY_LAST_N:]:
        llama_cpp.llama_sampler_accept(chain, token)
    return chain


class TextStream:
    """Bytes of token pieces in, text out: whole UTF-8 characters, stop sequences cut.

    Text that could still turn into a stop sequence is held back until the next piece
    decides it, so a client never receives part of a stop sequence.
    """

    def __init__(self, stop: list[str]) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stop = [s for s in stop if s]
        self._held = ""

    def feed(self, piece: bytes) -> tuple[str, bool]:
        """Return (text that is safe to send, whether a stop sequence was reached)."""
        text = self._held + self._decoder.decode(piece)
        cut = min((i for i in (text.find(s) for s in self._stop) if i >= 0), default=-1)
        if cut >= 0:
            self._held = ""
            return text[:cut], True
        hold = 0
        for s in self._stop:
            for n in range(min(len(s) - 1, len(text)), hold, -1):
                if text.endswith(s[:n]):
                    hold = n
                    break
        self._held = text[len(text) - hold :]
        return text[: len(text) - hold], False

    def flush(self) -> str:
        text = self._held + self._decoder.decode(b"", final=True)
        self._held = ""
        return text


@dataclass
class Sequence:
    """One request's generation in one slot of the context."""

    key: str  # the request id
    prompt: list[int]
    max_tokens: int
    sampling: Sampling
    stop: list[str] = field(default_factory=list)
    slot: int = -1
    fed: int = 0  # prompt tokens already in the KV cache
    produced: int = 0  # completion tokens sampled
    last_token: int = -1
    finish_reason: str = ""
    admitted: int = 0  # admission order: earlier prompts are fed first
    _sampler: int | None = None
    _text: TextStream | None = None
    _output: int = -1  # this step's batch index whose logits belong to this sequence

    @property
    def prefilling(self) -> bool:
        return self.fed < len(self.prompt)


@dataclass(frozen=True)
class Output:
    """What one step produced for one sequence: text to send and whether it ended."""

    sequence: Sequence
    text: str
    finished: bool


class BatchError(Exception):
    """llama_decode failed for a whole batch; its sequences cannot go on."""


class Scheduler:
    """The sequences of one context and the step that advances all of them at once.

    Not thread-safe: one thread (the replica's) owns the scheduler and its context.
    """

    def __init__(
        self, model: _internals.LlamaModel, ctx: _internals.LlamaContext, context_length: int
    ) -> None:
        self.model = model
        self.ctx = ctx
        # The context's last sequence id is the scratch sequence that pads batches.
        self.n_slots = llama_cpp.llama_n_seq_max(ctx.ctx) - 1
        self._pad_seq = self.n_slots
        self.n_batch = llama_cpp.llama_n_batch(ctx.ctx)
        # Context per request; the KV cache holds n_slots of them.
        self.n_ctx_seq = context_length
        self.n_vocab = model.n_vocab()
        self._memory = llama_cpp.llama_get_memory(ctx.ctx)
        self._batch = llama_cpp.llama_batch_init(self.n_batch + QUANTUM, 0, 1)
        self._pad_token = max(0, model.token_bos())
        self._slots: list[Sequence | None] = [None] * self.n_slots
        self._piece = ctypes.create_string_buffer(256)
        self._admissions = itertools.count()

    # -- slots -----------------------------------------------------------------

    @property
    def active(self) -> list[Sequence]:
        return [s for s in self._slots if s is not None]

    @property
    def free_slots(self) -> int:
        return self._slots.count(None)

    def admit(self, sequence: Sequence) -> None:
        """Give a sequence a free slot with an empty KV cache; it prefills from the next step."""
        slot = self._slots.index(None)
        llama_cpp.llama_memory_seq_rm(self._memory, slot, -1, -1)
        sequence.slot = slot
        sequence.admitted = next(self._admissions)
        sequence._sampler = sampler_chain(sequence.sampling, self.n_vocab, sequence.prompt)
        sequence._text = TextStream(sequence.stop)
        self._slots[slot] = sequence

    def release(self, sequence: Sequence) -> None:
        """Free a sequence's slot and KV cache (it ended, failed or was cancelled)."""
        if sequence.slot < 0 or self._slots[sequence.slot] is not sequence:
            return
        llama_cpp.llama_memory_seq_rm(self._memory, sequence.slot, -1, -1)
        if sequence._sampler is not None:
            llama_cpp.llama_sampler_free(sequence._sampler)
            sequence._sampler = None
        self._slots[sequence.slot] = None
        sequence.slot = -1

    def close(self) -> None:
        for sequence in self.active:
            self.release(sequence)
        if self._batch is not None:
            llama_cpp.llama_batch_free(self._batch)
            self._batch = None

    # -- the step --------------------------------------------------------------

    def step(self) -> list[Output]:
        """Decode one batch for every active sequence; sample those that have logits.

        Generating sequences go first (one token each) so a long prompt never stalls
        running streams for more than one step; prompts fill the rest of the batch in
        admission order, and a prompt longer than what is left continues next step.
        """
        batch = self._batch
        batch.n_tokens = 0
        generating = [s for s in self.active if not s.prefilling]
        prefilling = sorted((s for s in self.active if s.prefilling), key=lambda s: s.admitted)
        for sequence in generating:
            sequence._output = self._add(
                sequence.last_token, sequence.fed + sequence.produced - 1, sequence.slot, True
            )
        for sequence in prefilling:
            room = self.n_batch - batch.n_tokens
            if room <= 0:
                sequence._output = -1
                continue
            start = sequence.fed
            end = min(len(sequence.prompt), start + room)
            for pos in range(start, end):
                self._add(sequence.prompt[pos], pos, sequence.slot, pos == len(sequence.prompt) - 1)
            sequence.fed = end
            sequence._output = batch.n_tokens - 1 if end == len(sequence.prompt) else -1
        if batch.n_tokens == 0:
            return []
        for pos in range(-batch.n_tokens % QUANTUM):
            self._add(self._pad_token, pos, self._pad_seq, False)
        rc = llama_cpp.llama_decode(self.ctx.ctx, batch)
        llama_cpp.llama_memory_seq_rm(self._memory, self._pad_seq, -1, -1)
        if rc != 0:
            raise BatchError(f"llama_decode returned {rc}")
        outputs = []
        for sequence in generating + prefilling:
            if sequence._output >= 0:
                outputs.append(self._sample(sequence))
        return outputs

    def _add(self, token: int, pos: int, seq: int, logits: bool) -> int:
        batch = self._batch
        i = batch.n_tokens
        batch.token[i] = token
        batch.pos[i] = pos
        batch.n_seq_id[i] = 1
        batch.seq_id[i][0] = seq
        batch.logits[i] = logits
        batch.n_tokens = i + 1
        return i

    def _sample(self, sequence: Sequence) -> Output:
        token = llama_cpp.llama_sampler_sample(sequence._sampler, self.ctx.ctx, sequence._output)
        if llama_cpp.llama_vocab_is_eog(self.model.vocab, token):
            return self._finish(sequence, "stop", sequence._text.flush())
        sequence.produced += 1
        sequence.last_token = token
        text, stopped = sequence._text.feed(self._token_bytes(token))
        if stopped:
            return self._finish(sequence, "stop", text)
        position = len(sequence.prompt) + sequence.produced
        if sequence.produced >= sequence.max_tokens or position >= self.n_ctx_seq:
            return self._finish(sequence, "length", text + sequence._text.flush())
        return Output(sequence, text, False)

    def _finish(self, sequence: Sequence, reason: str, text: str = "") -> Output:
        sequence.finish_reason = reason
        self.release(sequence)
        return Output(sequence, text, True)

    def _token_bytes(self, token: int) -> bytes:
        n = llama_cpp.llama_token_to_piece(
            self.model.vocab, token, self._piece, len(self._piece), 0, False
        )
        if n < 0:  # a piece longer than the buffer: grow it and ask again
            self._piece = ctypes.create_string_buffer(-n)
            n = llama_cpp.llama_token_to_piece(
                self.model.vocab, token, self._piece, len(self._piece), 0, False
            )
        return self._piece.raw[:n]
