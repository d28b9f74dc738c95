"""Continuous batching: many requests decoded together on one resident llama.cpp context.

A replica's context has ``parallel_slots`` sequences, each in its own KV-cache stream,
so one request never sees another's tokens. Every step the scheduler decodes the next
token of every generating sequence in one ``llama_decode`` call, samples each with its
own sampler chain (its own temperature, top-p, penalties and seed), then reads prompt
chunks of newly admitted requests. A sequence that ends (end of generation, a stop
sequence, max_tokens, cancellation) has its KV cache removed at once and its slot goes
to the next waiting request.

Decoding is bound by memory bandwidth: a step reads the weights once whether it holds
one token or sixteen, so N streams cost little more per step than one.

Batch invariance: a request's computation is the same, bit for bit, whatever else runs
beside it, so greedy decoding gives the same text alone or in a batch. Three things
make it so (docs/serving.md has the measurements):

- Weights are not repacked (``use_extra_bufts = False``, engine.py). llama.cpp's
  repacked CPU kernels round a row differently with the number of rows in the batch;
  the plain kernels compute every row the same way.
- Each sequence has its own KV stream (``kv_unified = False``) that it fills from cell 0
  in position order. In a shared cache, cells freed by a finished request are reused
  by running ones, which changes the order attention sums in.
- A long lone decode row is not sent alone: llama.cpp splits one query row's attention
  over threads once it covers 512 cells (it covers at least 256, in steps of 256) and
  combines the parts in another order, so past ``LONE_ROW_POSITIONS`` the scheduler
  adds a row of a neighbouring slot (a pad, erased after the step). Rows of idle slots
  between generating ones are padded the same way, so every step is one micro-batch of
  consecutive streams, which llama.cpp requires.

Prompts are read in chunks of ``PROMPT_CHUNK`` tokens at fixed offsets, so how a prompt
is cut never depends on the traffic either.

Prompt caching: a slot's KV stream keeps the cells of its last request's prompt when the
request ends. A new request goes to the free slot whose cells begin with the longest run
of its own prompt's tokens (a chat resending its history finds its previous turn there),
keeps those cells and reads only the rest. Only whole chunks are kept and reused: llama.cpp
computes a batch of a few rows with other kernels than a batch of many (measured: cells
read 1-4 at a time differ from the same cells read in a chunk of 64, while 22 or more
agree), so cells of a short last chunk, or of generated tokens (decoded a row at a time),
are not what a fresh read computes. Whole chunks at fixed offsets are, bit for bit, and
the rest of the prompt is then cut where a fresh read cuts it, so a greedy answer is the
same with or without a hit. The cache costs no memory of its own: each slot's stream is
allocated for a whole context at start.

Structured output: a request with a grammar (a JSON schema, converted by
``grammar.py``) samples as llama.cpp's own server does: the usual chain picks a token,
the grammar checks that one token, and only if it is refused are the candidates
filtered through the grammar and the chain run again. Filtering all 262,144 of Gemma's
tokens costs about 50 ms, so the second run looks first at the ``GRAMMAR_CANDIDATES``
most likely tokens: when at least as many of them pass as the chain picks among (one
for greedy, top-k otherwise), the chain's choice is the one it would make over the
whole vocabulary, and only otherwise is the whole vocabulary filtered.

This module is only llama.cpp and plain Python; ``engine.Replica`` feeds it requests
from its queue and turns what it yields into events.
"""

from __future__ import annotations

import codecs
import ctypes
import itertools
import math
from collections import Counter
from dataclasses import dataclass, field, fields

import llama_cpp
import numpy as np
from llama_cpp import _internals

from workers.inference import protocol

# llama.cpp's "pick a random seed" value.
RANDOM_SEED = 0xFFFFFFFF
# How many recent tokens repetition penalties look at (llama-cpp-python's default).
PENALTY_LAST_N = 64
# min_p that llama-cpp-python's create_completion applies unless told otherwise.
MIN_P = 0.05
# Prompts are read in chunks of this many tokens, at multiples of it.
PROMPT_CHUNK = 64
# A lone row at a position below this attends over fewer than 257 cells, which llama.cpp
# never splits over threads (module docstring); from it on, the row gets a neighbour.
LONE_ROW_POSITIONS = 248
# OpenAI's cap on top_logprobs.
MAX_TOP_LOGPROBS = 20
# How many of the likeliest tokens a refused grammar sample is first retried among.
GRAMMAR_CANDIDATES = 512


def model_params(gpu_layers: int, *, invariant: bool = True) -> llama_cpp.llama_model_params:
    """Model parameters for batched serving: weights in their file's layout, unless
    ``invariant`` is off (a deployment's "fastest" mode)."""
    params = llama_cpp.llama_model_default_params()
    params.n_gpu_layers = gpu_layers
    # No repacked weights: their kernels round a row differently with the number of rows
    # in a batch (module docstring). The plain kernels decode a lone stream as fast here.
    params.use_extra_bufts = not invariant
    return params


# A replica's split mode (protocol.SPLIT_*) as llama.cpp names it.
SPLIT_MODES = {
    protocol.SPLIT_NONE: llama_cpp.LLAMA_SPLIT_MODE_NONE,
    protocol.SPLIT_LAYER: llama_cpp.LLAMA_SPLIT_MODE_LAYER,
    protocol.SPLIT_ROW: llama_cpp.LLAMA_SPLIT_MODE_ROW,
}


def gpu_split(
    params: llama_cpp.llama_model_params,
    *,
    split_mode: str,
    gpu_index: int,
    tensor_split: list[float] | tuple[float, ...] = (),
) -> ctypes.Array | None:
    """Set how ``params`` spreads the offloaded layers over the GPUs: all on GPU
    ``gpu_index`` (split mode "none"), or over every GPU in ``tensor_split``'s
    proportions (by index; empty: llama.cpp shares them by free memory).

    Returns the proportions as the C array ``params`` points to, or None. llama.cpp
    reads it while the model loads, through a pointer ctypes does not own: the caller
    keeps it (as long as the model, to be safe) or the load reads freed memory.
    """
    if split_mode not in SPLIT_MODES:
        raise ValueError(f"unknown split mode {split_mode!r}")
    params.split_mode = SPLIT_MODES[split_mode]
    if split_mode == protocol.SPLIT_NONE:
        params.main_gpu = gpu_index
        return None
    if not tensor_split:
        return None
    if len(tensor_split) > llama_cpp.LLAMA_MAX_DEVICES:
        raise ValueError(
            f"a tensor split of {len(tensor_split)} GPUs is more than llama.cpp's "
            f"{llama_cpp.LLAMA_MAX_DEVICES}"
        )
    proportions = (ctypes.c_float * llama_cpp.LLAMA_MAX_DEVICES)(*tensor_split)
    params.tensor_split = proportions
    return proportions


KV_CACHE_TYPES = {
    "f16": llama_cpp.GGML_TYPE_F16,
    "q8_0": llama_cpp.GGML_TYPE_Q8_0,
    "q4_0": llama_cpp.GGML_TYPE_Q4_0,
}


def context_params(
    slots: int,
    context_length: int,
    threads: int,
    *,
    kv_cache_type: str = "f16",
    flash_attention: bool = True,
    invariant: bool = True,
    prompt_budget: int = PROMPT_CHUNK,
) -> llama_cpp.llama_context_params:
    """Context parameters for a ``Scheduler``: one KV stream per slot.

    Each stream holds one request's context plus a cell for a pad row; a micro-batch
    holds a prompt chunk or a row from every slot. Without ``invariant`` (a deployment's
    "fastest" mode) the streams share one cache and a batch holds a row from every
    generating slot and up to ``prompt_budget`` prompt tokens (``Scheduler.step``).
    """
    params = llama_cpp.llama_context_default_params()
    params.n_seq_max = slots
    params.n_ctx = (context_length + 1) * slots
    params.kv_unified = not invariant
    # llama.cpp's "auto" leaves flash attention off on the CPU; on, a batch of streams
    # decodes about 20 % faster, and each query row's attention is still computed alone.
    params.flash_attn_type = (
        llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
        if flash_attention
        else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
    )
    params.type_k = params.type_v = KV_CACHE_TYPES[kv_cache_type]
    together = 0 if invariant else max(PROMPT_CHUNK, prompt_budget) + slots
    params.n_batch = params.n_ubatch = max(PROMPT_CHUNK, slots, together)
    params.n_threads = params.n_threads_batch = threads
    return params


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.8
    top_p: float = 0.95
    top_k: int = 40
    repeat_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None

    @property
    def penalised(self) -> bool:
        """Whether repetition penalties change the logits (they depend on past tokens)."""
        return bool(self.repeat_penalty != 1 or self.presence_penalty or self.frequency_penalty)

    @property
    def candidates_needed(self) -> int | None:
        """How many allowed tokens the chain picks among (greedy: 1, else top-k; None:
        all of them, as with top-k off, or penalties that may raise a logit)."""
        if self.repeat_penalty < 1 or self.presence_penalty < 0 or self.frequency_penalty < 0:
            return None
        if self.temperature == 0:
            return 1
        return self.top_k if self.top_k > 0 else None

    def penalise(self, logits: np.ndarray, ids: np.ndarray, counts: Counter[int]) -> None:
        """Apply the repetition penalties to ``logits`` (of tokens ``ids``) in place, as
        llama.cpp's penalties sampler does, given how often each token was recent."""
        for i, token in enumerate(ids.tolist()):
            count = counts.get(token, 0)
            if count and np.isfinite(logits[i]):
                value = float(logits[i])
                value = value * self.repeat_penalty if value <= 0 else value / self.repeat_penalty
                logits[i] = value - count * self.frequency_penalty - self.presence_penalty

    @classmethod
    def of(cls, settings: object) -> Sampling:
        """The sampling settings of anything that carries them (a RequestSpec)."""
        return cls(**{f.name: getattr(settings, f.name) for f in fields(cls)})


def sampler_chain(
    sampling: Sampling, n_vocab: int, history: list[int], *, penalties: bool = True
) -> int:
    """A llama.cpp sampler chain for one request, in llama-cpp-python's order.

    ``history`` (the end of the prompt) is fed to the chain so repetition penalties see
    the prompt, as llama.cpp's server does. Without ``penalties`` the chain leaves them
    out: the caller applies them to the logits (``Scheduler._sample_plain``). Returns the
    chain's pointer; free it with ``llama_sampler_free``.
    """
    chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())

    def add(sampler) -> None:
        llama_cpp.llama_sampler_chain_add(chain, sampler)

    if penalties:
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
    # A GBNF grammar the output must follow ("" for none).
    grammar: str = ""
    # Log-probabilities of the chosen tokens, with this many alternatives (None: none).
    top_logprobs: int | None = None
    slot: int = -1
    fed: int = 0  # prompt tokens already in the KV cache
    cached: int = 0  # of those, found in the slot's cache at admission (not read again)
    generated: list[int] = field(default_factory=list)  # completion tokens sampled
    finish_reason: str = ""
    # A step this sequence was in failed: its cells are not trusted for the cache.
    tainted: bool = False
    admitted: int = 0  # admission order: earlier prompts are fed first
    _sampler: int | None = None
    _grammar: int | None = None
    _text: TextStream | None = None
    _output: int = -1  # this step's batch index whose logits belong to this sequence

    @property
    def prefilling(self) -> bool:
        return self.fed < len(self.prompt)

    @property
    def produced(self) -> int:
        return len(self.generated)

    @property
    def reusable(self) -> list[int]:
        """The prompt tokens whose cells a later request may reuse: whole chunks only
        (module docstring)."""
        return self.prompt[: self.fed // PROMPT_CHUNK * PROMPT_CHUNK]


@dataclass(frozen=True)
class Output:
    """What one step produced for one sequence: text to send and whether it ended."""

    sequence: Sequence
    text: str
    finished: bool
    # The chosen token's log-probability entry in OpenAI's shape, when asked for.
    logprob: dict | None = None


class GrammarError(Exception):
    """A request's grammar cannot be used (it does not parse, or it admits no token)."""


class BatchError(Exception):
    """llama_decode failed for a whole batch; its sequences cannot go on."""


class Scheduler:
    """The sequences of one context and the step that advances all of them at once.

    The context must have one KV stream per slot (``kv_unified = False``) and micro-
    batches of at least ``max(PROMPT_CHUNK, n_slots)`` tokens. Not thread-safe: one
    thread (the replica's) owns the scheduler and its context.
    """

    def __init__(
        self,
        model: _internals.LlamaModel,
        ctx: _internals.LlamaContext,
        context_length: int,
        prompt_budget: int = PROMPT_CHUNK,
        *,
        prompt_cache: bool = True,
        invariant: bool = True,
    ) -> None:
        self.model = model
        self.ctx = ctx
        self.n_slots = llama_cpp.llama_n_seq_max(ctx.ctx)
        # Prompt tokens read per step, in whole chunks (at least one).
        self.prompt_budget = max(PROMPT_CHUNK, prompt_budget)
        # Context per request; each slot's stream holds one.
        self.n_ctx_seq = context_length
        self.n_vocab = model.n_vocab()
        self.prompt_cache = prompt_cache
        # Pad a long lone row (module docstring); off, a lone stream decodes alone.
        self.invariant = invariant
        self._memory = llama_cpp.llama_get_memory(ctx.ctx)
        # As many rows as one llama_decode of this context takes (context_params).
        self._capacity = max(PROMPT_CHUNK, self.n_slots, llama_cpp.llama_n_batch(ctx.ctx))
        self._batch = llama_cpp.llama_batch_init(self._capacity, 0, 1)
        self._pad_token = max(0, model.token_bos())
        self._slots: list[Sequence | None] = [None] * self.n_slots
        # The tokens whose cells each idle slot's stream still holds, and when it was last
        # used (the least recently used slot is the one a request without a hit takes).
        self._cached: list[list[int]] = [[] for _ in range(self.n_slots)]
        self._last_used = [0] * self.n_slots
        self._piece = ctypes.create_string_buffer(256)
        self._admissions = itertools.count(1)
        self._candidates: _Candidates | None = None

    # -- slots -----------------------------------------------------------------

    @property
    def active(self) -> list[Sequence]:
        return [s for s in self._slots if s is not None]

    @property
    def free_slots(self) -> int:
        return self._slots.count(None)

    def admit(self, sequence: Sequence) -> None:
        """Give a sequence a free slot; it prefills from the first token not cached there.

        The slot whose cache shares the longest prefix with the prompt; without a hit,
        the lowest empty slot (running slots stay together, so steps need few pad rows),
        else the least recently used. Raises ``GrammarError`` for a grammar that does not
        parse (the sequence is not admitted).
        """
        grammar = self._grammar_sampler(sequence.grammar) if sequence.grammar else None
        free = [i for i, s in enumerate(self._slots) if s is None]
        shared = {i: self._shared(i, sequence.prompt) for i in free}
        slot = max(free, key=lambda i: (shared[i], not self._cached[i], -self._last_used[i]))
        reuse = shared[slot]
        if not reuse or not llama_cpp.llama_memory_seq_rm(self._memory, slot, reuse, -1):
            llama_cpp.llama_memory_seq_rm(self._memory, slot, -1, -1)
            reuse = 0
        self._cached[slot] = []
        sequence.slot = slot
        sequence.fed = sequence.cached = reuse
        sequence.admitted = next(self._admissions)
        # A grammar's sampling needs the chain's own penalties (``_Candidates``); without
        # one the scheduler applies them (``_sample_plain``).
        sequence._sampler = sampler_chain(
            sequence.sampling, self.n_vocab, sequence.prompt, penalties=grammar is not None
        )
        sequence._grammar = grammar
        sequence._text = TextStream(sequence.stop)
        self._slots[slot] = sequence
        self._last_used[slot] = sequence.admitted

    def _shared(self, slot: int, prompt: list[int]) -> int:
        """How many of the prompt's first tokens to take from the slot's cache: the tokens
        they share, in whole chunks, leaving at least the last token to read (its logits
        are needed)."""
        if not self.prompt_cache:
            return 0
        cached = self._cached[slot]
        n = min(len(cached), len(prompt) - 1)
        if n <= 0 or cached[0] != prompt[0]:
            return 0
        if cached[:n] != prompt[:n]:
            n = next(i for i in range(n) if cached[i] != prompt[i])
        return n // PROMPT_CHUNK * PROMPT_CHUNK

    def release(self, sequence: Sequence) -> None:
        """Free a sequence's slot (it ended, failed or was cancelled); its cells stay for
        the next request that begins the same way."""
        if sequence.slot < 0 or self._slots[sequence.slot] is not sequence:
            return
        kept = sequence.reusable if self.prompt_cache and not sequence.tainted else []
        self._cached[sequence.slot] = kept
        llama_cpp.llama_memory_seq_rm(self._memory, sequence.slot, len(kept) if kept else -1, -1)
        for sampler in (sequence._sampler, sequence._grammar):
            if sampler is not None:
                llama_cpp.llama_sampler_free(sampler)
        sequence._sampler = sequence._grammar = None
        self._slots[sequence.slot] = None
        sequence.slot = -1

    def forget(self) -> None:
        """Drop every idle slot's cache (after a failed step, its cells are not trusted)."""
        for slot, sequence in enumerate(self._slots):
            if sequence is None:
                llama_cpp.llama_memory_seq_rm(self._memory, slot, -1, -1)
                self._cached[slot] = []

    def close(self) -> None:
        for sequence in self.active:
            self.release(sequence)
        if self._batch is not None:
            llama_cpp.llama_batch_free(self._batch)
            self._batch = None

    # -- the step --------------------------------------------------------------

    def step(self) -> list[Output]:
        """Decode one token of every generating sequence, then read prompt chunks.

        Generating sequences go first so new prompts delay running streams by at most
        ``prompt_budget`` tokens per step; prompts are read in admission order.
        """
        if not self.invariant:
            return self._step_together()
        outputs = []
        generating = [s for s in self.active if not s.prefilling]
        if generating:
            self._decode_next_tokens(generating)
            # Sample before the next llama_decode overwrites the logits.
            outputs += [self._sample(sequence) for sequence in generating]
        budget = self.prompt_budget
        for sequence in sorted((s for s in self.active if s.prefilling), key=lambda s: s.admitted):
            while budget > 0 and sequence.prefilling:
                budget -= self._decode_prompt_chunk(sequence)
            if not sequence.prefilling:
                outputs.append(self._sample(sequence))
            if budget <= 0:
                break
        return outputs

    def _step_together(self) -> list[Output]:
        """One ``llama_decode`` for the whole step, as llama.cpp's own server does ("fastest"
        mode): the next token of every generating sequence, then prompt tokens of the
        prefilling ones in admission order, up to ``prompt_budget`` (and what the
        context's batch holds).

        The weights are read once for all of them: a burst of new requests is read in
        the step it arrives in, beside the running streams, instead of one
        ``llama_decode`` per prompt chunk after them. Which rows share a batch changes
        how llama.cpp's kernels round, which this mode allows; the streams share one
        cache (``context_params``), so any slots can share a batch and no pad rows are
        needed.
        """
        generating = [s for s in self.active if not s.prefilling]
        self._batch.n_tokens = 0
        for sequence in generating:
            pos = len(sequence.prompt) + sequence.produced - 1
            sequence._output = self._add(sequence.generated[-1], pos, sequence.slot, True)
        budget = min(self.prompt_budget, self._capacity - len(generating))
        read = []
        for sequence in sorted((s for s in self.active if s.prefilling), key=lambda s: s.admitted):
            if budget <= 0:
                break
            start = sequence.fed
            end = min(len(sequence.prompt), start + budget)
            for pos in range(start, end):
                last = pos == len(sequence.prompt) - 1
                index = self._add(sequence.prompt[pos], pos, sequence.slot, last)
                if last:
                    sequence._output = index
                    read.append(sequence)
            sequence.fed = end
            budget -= end - start
        if not self._batch.n_tokens:
            return []
        self._decode([])
        # Sampled in batch order: every row's logits are there until the next decode.
        return [self._sample(sequence) for sequence in generating + read]

    def _decode_next_tokens(self, generating: list[Sequence]) -> None:
        """One micro-batch: a row per slot from the first generating one to the last."""
        first = min(s.slot for s in generating)
        last = max(s.slot for s in generating)
        lone = generating[0] if len(generating) == 1 else None
        if (
            self.invariant
            and lone
            and self.n_slots > 1
            and lone.fed + lone.produced > LONE_ROW_POSITIONS
        ):
            last = first + 1 if first + 1 < self.n_slots else first
            first = last - 1
        self._batch.n_tokens = 0
        pads = []
        for slot in range(first, last + 1):
            sequence = self._slots[slot]
            if sequence is not None and not sequence.prefilling:
                pos = len(sequence.prompt) + sequence.produced - 1
                sequence._output = self._add(sequence.generated[-1], pos, slot, True)
            else:
                # The next position of a prefilling slot, or past an idle slot's cache:
                # its cells stay as they were once the pad is erased.
                pos = sequence.fed if sequence is not None else len(self._cached[slot])
                self._add(self._pad_token, pos, slot, False)
                pads.append((slot, pos))
        self._decode(pads)

    def _decode_prompt_chunk(self, sequence: Sequence) -> int:
        """Read the next chunk of a prompt; return its length."""
        start = sequence.fed
        end = min(len(sequence.prompt), (start // PROMPT_CHUNK + 1) * PROMPT_CHUNK)
        self._batch.n_tokens = 0
        for pos in range(start, end):
            last = pos == len(sequence.prompt) - 1
            index = self._add(sequence.prompt[pos], pos, sequence.slot, last)
            if last:
                sequence._output = index
        self._decode([])
        sequence.fed = end
        return end - start

    def _decode(self, pads: list[tuple[int, int]]) -> None:
        rc = llama_cpp.llama_decode(self.ctx.ctx, self._batch)
        for slot, pos in pads:
            llama_cpp.llama_memory_seq_rm(self._memory, slot, pos, -1)
        if rc != 0:
            for sequence in self.active:
                sequence.tainted = True
            self.forget()
            raise BatchError(f"llama_decode returned {rc}")

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
        try:
            token = self._choose(sequence)
        except GrammarError:
            return self._finish(sequence, "stop", sequence._text.flush())
        if llama_cpp.llama_vocab_is_eog(self.model.vocab, token):
            return self._finish(sequence, "stop", sequence._text.flush())
        logprob = self._logprob(sequence, token) if sequence.top_logprobs is not None else None
        sequence.generated.append(token)
        text, stopped = sequence._text.feed(self._token_bytes(token))
        if stopped:
            return self._finish(sequence, "stop", text, logprob)
        position = len(sequence.prompt) + sequence.produced
        if sequence.produced >= sequence.max_tokens or position >= self.n_ctx_seq:
            return self._finish(sequence, "length", text + sequence._text.flush(), logprob)
        return Output(sequence, text, False, logprob)

    def _choose(self, sequence: Sequence) -> int:
        """The next token: the sampler chain's choice, within the grammar if there is one."""
        chain, grammar = sequence._sampler, sequence._grammar
        if grammar is None:
            return self._sample_plain(sequence)
        if self._candidates is None:
            self._candidates = _Candidates(self.n_vocab)
        candidates = self._candidates
        logits = self._logits(sequence)
        sampling = sequence.sampling
        if sampling.penalised:
            # Penalties remember accepted tokens: choose without accepting, and accept the
            # final choice once.
            recent = Counter((sequence.prompt + sequence.generated)[-PENALTY_LAST_N:])
            token = candidates.choose(logits, chain, sampling, recent)
            if not candidates.allows(grammar, token):
                token = candidates.choose(logits, chain, sampling, recent, grammar)
        else:
            # Without penalties accepting changes nothing, so llama.cpp's own sample (and
            # accept) is the first try, as fast as unconstrained decoding.
            token = llama_cpp.llama_sampler_sample(chain, self.ctx.ctx, sequence._output)
            if candidates.allows(grammar, token):
                self._accept(grammar, token)
                return token
            token = candidates.choose(logits, chain, sampling, Counter(), grammar)
        if not candidates.allows(grammar, token):
            # Nothing the grammar allows is left: end here rather than break it.
            raise GrammarError("no token satisfies the grammar")
        self._accept(grammar, token)
        llama_cpp.llama_sampler_accept(chain, token)
        return token

    def _sample_plain(self, sequence: Sequence) -> int:
        """The chain's choice for a sequence without a grammar, as llama.cpp makes it.

        llama.cpp's penalties sampler looks every token of the vocabulary up in its
        counts (262,144 for Gemma: about 0.7 ms a token on the 2-core box), and its
        greedy sampler first copies every logit into a candidate array (0.5 ms). Here
        the penalties change only the logits of the recent tokens, in place and with
        llama.cpp's float32 arithmetic, and greedy is the first largest logit, so the
        choice is the same token; the logits are put back afterwards (log-probabilities
        report the model's own).
        """
        sampling = sequence.sampling
        logits = self._logits(sequence)
        touched = original = None
        if sampling.penalised:
            generated = sequence.generated[-PENALTY_LAST_N:]
            earlier = PENALTY_LAST_N - len(generated)
            recent = Counter((sequence.prompt[-earlier:] if earlier else []) + generated)
            touched = np.fromiter(recent.keys(), dtype=np.int64, count=len(recent))
            counts = np.fromiter(recent.values(), dtype=np.float32, count=len(recent))
            original = logits[touched].copy()
            logits[touched] = _penalised(original, counts, sampling)
        try:
            if sampling.temperature == 0:
                return int(np.argmax(logits))
            return llama_cpp.llama_sampler_sample(sequence._sampler, self.ctx.ctx, sequence._output)
        finally:
            if touched is not None:
                logits[touched] = original

    def _accept(self, grammar: int, token: int) -> None:
        # The end of generation is allowed only where the grammar is complete, and ends it.
        if not llama_cpp.llama_vocab_is_eog(self.model.vocab, token):
            llama_cpp.llama_sampler_accept(grammar, token)

    def _grammar_sampler(self, grammar: str) -> int:
        sampler = llama_cpp.llama_sampler_init_grammar(
            self.model.vocab, grammar.encode("utf-8"), b"root"
        )
        if not sampler:
            raise GrammarError("llama.cpp could not parse the grammar")
        return sampler

    def _logits(self, sequence: Sequence) -> np.ndarray:
        pointer = llama_cpp.llama_get_logits_ith(self.ctx.ctx, sequence._output)
        return np.ctypeslib.as_array(pointer, shape=(self.n_vocab,))

    def _logprob(self, sequence: Sequence, token: int) -> dict:
        """The chosen token's log-probability under the model (before sampling settings),
        with the ``top_logprobs`` most likely tokens, in OpenAI's shape."""
        logits = self._logits(sequence).astype(np.float64)
        peak = logits.max()
        log_total = peak + math.log(np.exp(logits - peak).sum())
        entry = self._logprob_entry(token, logits[token] - log_total)
        n = min(sequence.top_logprobs, MAX_TOP_LOGPROBS)
        top: list[dict] = []
        if n:
            best = np.argpartition(-logits, n)[:n]
            best = best[np.argsort(-logits[best], kind="stable")]
            top = [self._logprob_entry(int(t), logits[t] - log_total) for t in best]
        entry["top_logprobs"] = top
        return entry

    def _logprob_entry(self, token: int, logprob: float) -> dict:
        piece = self._token_bytes(token)
        return {
            "token": piece.decode("utf-8", errors="replace"),
            "logprob": float(logprob),
            "bytes": list(piece),
        }

    def _finish(
        self, sequence: Sequence, reason: str, text: str = "", logprob: dict | None = None
    ) -> Output:
        sequence.finish_reason = reason
        self.release(sequence)
        return Output(sequence, text, True, logprob)

    def _token_bytes(self, token: int) -> bytes:
        return token_bytes(self.model.vocab, token, special=False, buffer=self._piece)


def _penalised(logits: np.ndarray, counts: np.ndarray, sampling: Sampling) -> np.ndarray:
    """Repetition penalties on float32 ``logits`` of tokens seen ``counts`` times, in the
    same float32 operations as llama.cpp's penalties sampler."""
    repeat = np.float32(sampling.repeat_penalty)
    scaled = np.where(logits <= 0, logits * repeat, logits / repeat)
    offset = counts * np.float32(sampling.frequency_penalty) + np.float32(sampling.presence_penalty)
    return (scaled - offset).astype(np.float32)


def _shortlist_is_exact(shortlisted: np.ndarray, floor: float, sampling: Sampling) -> bool:
    """Whether the chain picks the same token from the shortlist as from the whole
    vocabulary, given the shortlisted tokens' logits after the grammar (-inf: refused)
    and the penalties, and ``floor``: no token outside the shortlist has a logit above it
    (penalties only lower logits; ``Sampling.candidates_needed`` is None otherwise).

    The chain is top-k, top-p, min-p, temperature, then a draw. Tokens at or above the
    floor ("high") outrank every token outside. With top-k of them or more, top-k keeps
    the same tokens either way. With fewer, top-k also keeps lower tokens, different
    ones from the shortlist than from the whole vocabulary; but if the floor is under
    min-p's cut (the best logit plus ln 0.05), min-p drops all of those, and they only
    change top-p's sum by at most ``(k - high) * e^(floor - best)``: if top-p's cut keeps
    the same high tokens that pass min-p whatever that sum, the draw is among the same
    tokens with the same logits, so it is the same token.
    """
    allowed = np.sort(shortlisted[np.isfinite(shortlisted)])[::-1]
    if allowed.size == 0:
        return False
    if sampling.temperature == 0:
        return bool(allowed[0] >= floor)
    high = allowed[allowed >= floor]
    k = sampling.top_k
    if high.size >= k:
        return True
    best = allowed[0]
    if high.size == 0 or floor >= best + math.log(MIN_P):
        return False
    if sampling.top_p >= 1:
        return True  # top-p keeps everything; min-p drops all but high tokens
    weights = np.exp(high - best)
    total = weights.sum()
    spare = (k - high.size) * math.exp(floor - best)
    # Where top-p cuts among the high tokens with the least and the most mass outside.
    cumulative = np.cumsum(weights)
    first = int(np.searchsorted(cumulative, sampling.top_p * total))
    last = int(np.searchsorted(cumulative, sampling.top_p * (total + spare)))
    # The high tokens between the two cuts must all fall to min-p.
    between = high[first + 1 : last + 1]
    return bool(np.all(between < best + math.log(MIN_P)))


class _Candidates:
    """A reusable candidate array over the whole vocabulary, for grammar sampling."""

    def __init__(self, n_vocab: int) -> None:
        self.n_vocab = n_vocab
        self.data = (llama_cpp.llama_token_data * n_vocab)()
        self.view = np.ctypeslib.as_array(self.data)
        self.ids = np.arange(n_vocab, dtype=np.int32)
        self._one = (llama_cpp.llama_token_data * 1)()

    def choose(
        self,
        logits: np.ndarray,
        chain: int,
        sampling: Sampling,
        recent: Counter[int],
        grammar: int | None = None,
    ) -> int:
        """The chain's choice (among the tokens the grammar allows, if given).

        First among the ``GRAMMAR_CANDIDATES`` likeliest tokens, when that gives the
        choice the chain makes over the whole vocabulary (``_shortlist_is_exact``);
        otherwise over the whole vocabulary. ``recent`` counts the tokens the penalties
        look at.
        """
        samplers = [chain] if grammar is None else [grammar, chain]
        needed = sampling.candidates_needed
        if needed is not None and needed * 4 <= GRAMMAR_CANDIDATES:
            likeliest = np.argpartition(-logits, GRAMMAR_CANDIDATES)[:GRAMMAR_CANDIDATES]
            floor = float(logits[likeliest].min())
            array = self._fill(likeliest.astype(np.int32), logits[likeliest])
            if grammar is not None:
                llama_cpp.llama_sampler_apply(grammar, ctypes.byref(array))
            shortlisted = self.view["logit"][: array.size].astype(np.float64)
            if sampling.penalised:
                sampling.penalise(shortlisted, likeliest, recent)
            if _shortlist_is_exact(shortlisted, floor, sampling):
                llama_cpp.llama_sampler_apply(chain, ctypes.byref(array))
                return self._selected(array)
        array = self._fill(self.ids, logits)
        for sampler in samplers:
            llama_cpp.llama_sampler_apply(sampler, ctypes.byref(array))
        return self._selected(array)

    def _fill(self, ids: np.ndarray, logits: np.ndarray) -> llama_cpp.llama_token_data_array:
        n = len(ids)
        self.view["id"][:n] = ids
        self.view["logit"][:n] = logits
        self.view["p"][:n] = 0.0
        return llama_cpp.llama_token_data_array(data=self.data, size=n, selected=-1, sorted=False)

    def _selected(self, array: llama_cpp.llama_token_data_array) -> int:
        if array.selected < 0:
            raise GrammarError("the sampler chose no token")
        return int(self.data[array.selected].id)

    def allows(self, grammar: int, token: int) -> bool:
        """Whether the grammar accepts ``token`` next (it sets a refused token's logit to -inf)."""
        self._one[0].id, self._one[0].logit, self._one[0].p = token, 0.0, 0.0
        array = llama_cpp.llama_token_data_array(data=self._one, size=1, selected=-1, sorted=False)
        llama_cpp.llama_sampler_apply(grammar, ctypes.byref(array))
        return math.isfinite(self._one[0].logit)


def token_bytes(vocab, token: int, *, special: bool, buffer: ctypes.Array | None = None) -> bytes:
    """A token's text, exactly its bytes (``special``: control tokens as their text, such
    as ``<bos>``). ``buffer`` is reused when the piece fits in it."""
    buffer = buffer if buffer is not None else ctypes.create_string_buffer(64)
    n = llama_cpp.llama_token_to_piece(vocab, token, buffer, len(buffer), 0, special)
    if n < 0:  # a piece longer than the buffer: ask again with one that fits
        buffer = ctypes.create_string_buffer(-n)
        n = llama_cpp.llama_token_to_piece(vocab, token, buffer, len(buffer), 0, special)
    return buffer.raw[:n]
