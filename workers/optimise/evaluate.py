"""Evaluating a model on a worker: perplexity, KL divergence against a reference, task score.

- ``perplexity`` follows llama.cpp's ``llama-perplexity`` protocol, so its figure can be
  compared with published ones: the text is tokenized once, cut into chunks of
  ``n_ctx`` tokens, each chunk read from an empty KV cache with its first token replaced
  by BOS, and only the second half of each chunk is scored (the model always has at
  least ``n_ctx / 2`` tokens of context). On the same llama.cpp build the perplexity
  and uncertainty are those llama-perplexity prints, to the last printed digit (checked
  with ``-c 128`` and ``-c 256``). With a reference model it adds what
  ``--kl-divergence`` prints: how far the model's next-token distribution is from the
  reference's (KL(P_ref || P_model)) and how often both pick the same top token. Both
  models read the same chunk one after the other, so no more than one chunk's logits of
  either is ever held.
- ``task_score`` renders each prompt as serving renders a chat request (the same
  template choice and renderer), generates greedily through the serving scheduler and
  compares the answer with the expected one.

Plain Python like the rest of ``workers/``: paths and parameters in, a frozen result
dataclass out; progress goes to a callback and ``should_stop`` is polled between chunks
and items.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import llama_cpp
import numpy as np
from llama_cpp import _internals

from workers.finetune.data import row_messages
from workers.inference import batching, templates
from workers.inference.batching import BatchError, Sampling, Scheduler
from workers.inference.engine import default_threads

Progress = Callable[[int, int, str], None]
ShouldStop = Callable[[], bool]

# Tokens decoded per llama_decode call. A chunk longer than this is read in pieces (as
# llama-perplexity does with its n_batch): the logits llama.cpp keeps for a piece are
# pieces × n_vocab floats, 256 MiB for 512 rows of a 128k vocabulary.
MAX_BATCH = 512
# Rows of logits turned into log-probabilities at a time: bounds numpy's temporaries
# to a few rows × n_vocab floats whatever the chunk size.
ROWS_PER_BLOCK = 32
# The smallest context that scores more than a couple of tokens per chunk.
MIN_N_CTX = 8
# Items generated side by side in task_score: decoding is bound by memory bandwidth, so
# a few streams cost little more per step than one, and the scheduler's batch invariance
# makes each answer the same as it would be alone.
TASK_SLOTS = 4
# Tokens allowed beyond the expected answer's length when max_tokens is not given: room
# for a model that says a little more than asked (a full stop, a short preamble).
EXTRA_ANSWER_TOKENS = 16
# Characters of a prompt kept in a result's examples.
EXAMPLE_PROMPT_CHARS = 500


class EvaluationError(Exception):
    """An evaluation cannot run on these inputs; the message says why."""


class EvaluationStopped(Exception):
    """``should_stop`` returned True; the evaluation ended early without a result."""


# -- results -------------------------------------------------------------------------


def _plain(value: Any) -> Any:
    """A JSON-friendly copy: NaN and infinities become None (JSON has neither)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


@dataclass(frozen=True)
class PerplexityResult:
    perplexity: float
    # As llama-perplexity prints it (``PPL = X +/- Y``): the standard error of the mean
    # negative log-likelihood, carried through exp().
    uncertainty: float
    tokens_scored: int
    chunks: int
    n_ctx: int
    # Time spent reading chunks (loading excluded), and chunk tokens read per second;
    # with a reference model both models' reading is in the time.
    seconds: float
    tokens_per_s: float
    # Against a reference model (None without one), as llama-perplexity --kl-divergence.
    kl_divergence: float | None = None
    kl_divergence_uncertainty: float | None = None
    same_top: float | None = None
    same_top_uncertainty: float | None = None
    reference_perplexity: float | None = None
    reference_uncertainty: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return _plain(asdict(self))


@dataclass(frozen=True)
class TaskItem:
    """A conversation up to the answer, and the answer expected."""

    messages: list[dict[str, str]]
    expected: str


@dataclass(frozen=True)
class TaskScoreResult:
    n: int
    exact: float
    exact_count: int
    contains: float
    contains_count: int
    # The first items: {prompt, expected, output, exact, contains}.
    examples: list[dict[str, Any]]
    generated_tokens: int
    seconds: float
    # Which chat template rendered the prompts (templates.ChatTemplate.source).
    chat_template: str = ""

    def as_dict(self) -> dict[str, Any]:
        return _plain(asdict(self))


# -- loading -------------------------------------------------------------------------


@contextlib.contextmanager
def _loaded_model(
    path: Path, params: llama_cpp.llama_model_params
) -> Iterator[_internals.LlamaModel]:
    """A model loaded with ``params``, freed on exit."""
    # llama.cpp logs through llama-cpp-python's logger: errors only, as serving does.
    logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)
    try:
        model = _internals.LlamaModel(path_model=str(path), params=params, verbose=False)
    except ValueError as exc:
        raise EvaluationError(f"llama.cpp could not load {path.name}: {exc}") from exc
    try:
        yield model
    finally:
        model.close()


@contextlib.contextmanager
def _loaded_context(
    model: _internals.LlamaModel,
    params: llama_cpp.llama_context_params,
    *,
    adapter_path: Path | None,
    adapter_scale: float,
) -> Iterator[_internals.LlamaContext]:
    """A context on ``model`` with a LoRA adapter applied or none; all freed on exit.

    The adapter belongs to the context, so one model can serve a context with an
    adapter and one without (a fine-tune compared against its own base).
    """
    try:
        ctx = _internals.LlamaContext(model=model, params=params, verbose=False)
    except ValueError as exc:
        raise EvaluationError(f"llama.cpp could not create a context: {exc}") from exc
    adapter = None
    try:
        if adapter_path is not None:
            adapter = llama_cpp.llama_adapter_lora_init(
                model.model, str(adapter_path).encode("utf-8")
            )
            # A NULL pointer comes back as a falsy ctypes pointer, not as None.
            if not adapter:
                raise EvaluationError(
                    f"The LoRA adapter {adapter_path.name} does not fit this model "
                    "(another architecture or shape, or not a LoRA GGUF)."
                )
            adapters = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(adapter)
            scales = (ctypes.c_float * 1)(adapter_scale)
            if llama_cpp.llama_set_adapters_lora(ctx.ctx, adapters, 1, scales):
                raise EvaluationError(f"The LoRA adapter {adapter_path.name} could not be applied.")
        yield ctx
    finally:
        ctx.close()
        if adapter:
            llama_cpp.llama_adapter_lora_free(adapter)


@dataclass
class _Loaded:
    model: _internals.LlamaModel
    ctx: _internals.LlamaContext


def _load(
    stack: contextlib.ExitStack,
    model_path: Path,
    params: llama_cpp.llama_context_params,
    *,
    adapter_path: Path | None,
    adapter_scale: float,
    model_params: llama_cpp.llama_model_params,
    models: dict[Path, _internals.LlamaModel],
) -> _Loaded:
    """A model and a context on it, freed when ``stack`` closes.

    ``models`` holds the models loaded so far by path: a reference that is the model's
    own file (a fine-tune against its base) shares its weights instead of loading them
    twice.
    """
    key = model_path.resolve()
    if key not in models:
        models[key] = stack.enter_context(_loaded_model(model_path, model_params))
    model = models[key]
    ctx = stack.enter_context(
        _loaded_context(model, params, adapter_path=adapter_path, adapter_scale=adapter_scale)
    )
    return _Loaded(model, ctx)


def _threads(threads: int | None) -> int:
    return threads or default_threads(len(os.sched_getaffinity(0)))


def _tokenize(
    model: _internals.LlamaModel, text: str, *, add_bos: bool, special: bool
) -> list[int]:
    return model.tokenize(text.encode("utf-8"), add_bos=add_bos, special=special)


def _token_text(model: _internals.LlamaModel, token: int) -> str:
    if token < 0:
        return ""
    return batching.token_bytes(model.vocab, token, special=True).decode("utf-8", errors="ignore")


def _shown(text: bytes) -> str:
    return repr(text.decode("utf-8", errors="replace"))


def _check_same_vocabulary(model: _internals.LlamaModel, reference: _internals.LlamaModel) -> None:
    """Refuse a reference whose tokens are not the model's: the same token ids must mean
    the same text, or comparing their distributions means nothing."""
    n_vocab, n_ref = model.n_vocab(), reference.n_vocab()
    if n_vocab != n_ref:
        raise EvaluationError(
            f"The reference model's vocabulary has {n_ref} tokens and the model's {n_vocab}: "
            "a KL divergence needs models with the same tokenizer."
        )
    if (model.token_bos(), model.add_bos_token()) != (
        reference.token_bos(),
        reference.add_bos_token(),
    ):
        raise EvaluationError(
            "The reference model marks the beginning of a text differently from the model: "
            "a KL divergence needs models with the same tokenizer."
        )
    for token in range(n_vocab):
        # Every token's text: a quarter of a second for a 256k vocabulary, and a
        # tokenizer that differs in one merged token would skew every chunk it occurs in.
        a = llama_cpp.llama_vocab_get_text(model.vocab, token)
        b = llama_cpp.llama_vocab_get_text(reference.vocab, token)
        if a != b:
            raise EvaluationError(
                f"The reference model's token {token} is {_shown(b)} where the model's is "
                f"{_shown(a)}: a KL divergence needs models with the same tokenizer."
            )


# -- perplexity ----------------------------------------------------------------------


@dataclass
class _Sums:
    """Sums over scored tokens, in double as llama.cpp keeps them."""

    count: int = 0
    nll: float = 0.0
    nll2: float = 0.0
    ref_nll: float = 0.0
    ref_nll2: float = 0.0
    kld: float = 0.0
    kld2: float = 0.0
    same_top: int = 0


def _mean_and_error(total: float, total2: float, count: int) -> tuple[float, float]:
    """Mean and standard error of the mean from a sum and a sum of squares.

    llama.cpp's formula: sqrt((mean(x²) - mean(x)²) / (count - 1)); NaN for one value.
    """
    mean = total / count
    if count < 2:
        return mean, math.nan
    variance = total2 / count - mean * mean
    # Rounding can leave equal values a tiny negative variance: no spread at all.
    return mean, math.sqrt(max(variance, 0.0) / (count - 1))


def _log_probs(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each row's shifted logits and log-sum-exp: log p = shifted - lse.

    exp in float32 and the sum in float64, as llama.cpp's log_softmax (expf, double sum).
    """
    shifted = logits - logits.max(axis=1, keepdims=True)
    lse = np.log(np.exp(shifted).sum(axis=1, dtype=np.float64))
    return shifted, lse


def _score_rows(
    sums: _Sums, logits: np.ndarray, targets: np.ndarray, ref_logits: np.ndarray | None
) -> None:
    """Add the rows of one decode's logits to ``sums``: row i predicts ``targets[i]``."""
    for begin in range(0, len(targets), ROWS_PER_BLOCK):
        rows = slice(begin, begin + ROWS_PER_BLOCK)
        block_targets = targets[rows]
        picked = np.arange(len(block_targets))
        shifted, lse = _log_probs(logits[rows])
        nll = lse - shifted[picked, block_targets].astype(np.float64)
        sums.count += len(nll)
        sums.nll += float(nll.sum())
        sums.nll2 += float((nll * nll).sum())
        if ref_logits is None:
            continue
        ref_shifted, ref_lse = _log_probs(ref_logits[rows])
        ref_nll = ref_lse - ref_shifted[picked, block_targets].astype(np.float64)
        sums.ref_nll += float(ref_nll.sum())
        sums.ref_nll2 += float((ref_nll * ref_nll).sum())
        # KL(P_ref || P) = sum p_ref (log p_ref - log p), over the whole vocabulary.
        # llama.cpp stores the reference's log-probabilities in 16 bits and skips those
        # below -16; this is exact, so its mean can differ in the fourth digit. The
        # float32 difference of shifted logits is 0 for identical models.
        ref_log_p = ref_shifted - ref_lse[:, None].astype(np.float32)
        diff = (ref_shifted - shifted).astype(np.float64) - (ref_lse - lse)[:, None]
        kld = (np.exp(ref_log_p, dtype=np.float64) * diff).sum(axis=1)
        sums.kld += float(kld.sum())
        sums.kld2 += float((kld * kld).sum())
        sums.same_top += int((logits[rows].argmax(axis=1) == ref_logits[rows].argmax(axis=1)).sum())


def _decode_piece(
    loaded: _Loaded, batch: llama_cpp.llama_batch, tokens: Sequence[int], start: int, first: int
) -> np.ndarray:
    """Decode ``tokens`` at positions start.. of sequence 0; return the logits of the
    positions from ``first`` on, a view valid until the next decode on this context."""
    batch.n_tokens = len(tokens)
    outputs = 0
    for k, token in enumerate(tokens):
        pos = start + k
        batch.token[k] = token
        batch.pos[k] = pos
        batch.n_seq_id[k] = 1
        batch.seq_id[k][0] = 0
        batch.logits[k] = pos >= first
        outputs += pos >= first
    rc = llama_cpp.llama_decode(loaded.ctx.ctx, batch)
    if rc != 0:
        raise EvaluationError(
            f"llama.cpp could not evaluate the text (llama_decode returned {rc})."
        )
    if not outputs:
        return np.empty((0, loaded.model.n_vocab()), dtype=np.float32)
    pointer = llama_cpp.llama_get_logits(loaded.ctx.ctx)
    return np.ctypeslib.as_array(pointer, shape=(outputs, loaded.model.n_vocab()))


def perplexity(
    model_path: Path,
    text: str,
    *,
    n_ctx: int = 512,
    adapter_path: Path | None = None,
    adapter_scale: float = 1.0,
    reference_path: Path | None = None,
    reference_adapter_path: Path | None = None,
    threads: int | None = None,
    max_chunks: int | None = None,
    gpu_layers: int = 0,
    progress: Progress | None = None,
    should_stop: ShouldStop | None = None,
) -> PerplexityResult:
    """Perplexity of a model (with a LoRA adapter or not) on ``text``, as llama-perplexity
    computes it with ``-c n_ctx``; with ``reference_path``, also the KL divergence from
    the reference model (itself with ``reference_adapter_path`` or not) and how often both
    pick the same top token.

    The text is tokenized once (with BOS where the vocabulary adds one) and cut into
    ``len(tokens) // n_ctx`` chunks, at most ``max_chunks``; the last partial chunk is
    not read. Each chunk is read from an empty KV cache with its first token replaced by
    BOS, and tokens ``n_ctx/2 + 1 .. n_ctx - 1`` are scored from the logits of the
    tokens before them. Raises EvaluationError for inputs that cannot be evaluated
    (a text shorter than two chunks, tokenizers that differ, an adapter that does not
    fit) and EvaluationStopped when ``should_stop()`` says so between chunks.
    """
    if n_ctx < MIN_N_CTX:
        raise EvaluationError(f"The context must be at least {MIN_N_CTX} tokens, not {n_ctx}.")
    if max_chunks is not None and max_chunks < 1:
        raise EvaluationError("At least one chunk must be evaluated.")
    threads = _threads(threads)
    n_batch = min(n_ctx, MAX_BATCH)
    params = llama_cpp.llama_context_default_params()
    params.n_ctx = n_ctx
    params.n_batch = params.n_ubatch = n_batch
    params.n_seq_max = 1
    params.n_threads = params.n_threads_batch = threads
    # llama-perplexity's own weight layout (repacked where the CPU has kernels for it),
    # not serving's: on the same llama.cpp build the figure is the one it prints, to the
    # last digit. Serving's layout moves it by a few tenths of a percent.
    model_params = llama_cpp.llama_model_default_params()
    model_params.n_gpu_layers = gpu_layers

    with contextlib.ExitStack() as stack:
        models: dict[Path, _internals.LlamaModel] = {}
        main = _load(
            stack,
            model_path,
            params,
            adapter_path=adapter_path,
            adapter_scale=adapter_scale,
            model_params=model_params,
            models=models,
        )
        model = main.model
        if n_ctx > model.n_ctx_train():
            raise EvaluationError(
                f"A context of {n_ctx} tokens is longer than the model was trained on "
                f"({model.n_ctx_train()})."
            )
        if model.add_eos_token():
            # llama-perplexity refuses these too: an EOS after every text would be scored.
            raise EvaluationError("This model's tokenizer appends EOS to every text.")
        reference = None
        if reference_path is not None:
            reference = _load(
                stack,
                reference_path,
                params,
                adapter_path=reference_adapter_path,
                adapter_scale=1.0,
                model_params=model_params,
                models=models,
            )
            if reference.model is not model:
                _check_same_vocabulary(model, reference.model)

        tokens = _tokenize(model, text, add_bos=True, special=False)
        if len(tokens) < 2 * n_ctx:
            raise EvaluationError(
                f"The text is {len(tokens)} tokens long; perplexity with a context of "
                f"{n_ctx} needs at least {2 * n_ctx} tokens (two chunks)."
            )
        n_chunks = len(tokens) // n_ctx
        if max_chunks is not None:
            n_chunks = min(n_chunks, max_chunks)
        bos = model.token_bos() if model.add_bos_token() else None
        first = n_ctx // 2

        batch = llama_cpp.llama_batch_init(n_batch, 0, 1)
        stack.callback(llama_cpp.llama_batch_free, batch)
        sums = _Sums()
        if progress:
            progress(0, n_chunks, f"Evaluating {n_chunks} chunks of {n_ctx} tokens.")
        started = time.perf_counter()
        for chunk in range(n_chunks):
            if should_stop and should_stop():
                raise EvaluationStopped()
            chunk_tokens = tokens[chunk * n_ctx : (chunk + 1) * n_ctx]
            if bos is not None:
                chunk_tokens[0] = bos
            for loaded in (main, reference):
                if loaded is not None:
                    llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(loaded.ctx.ctx), True)
            for start in range(0, n_ctx, n_batch):
                piece = chunk_tokens[start : start + n_batch]
                logits = _decode_piece(main, batch, piece, start, first)
                ref_logits = None
                if reference is not None:
                    ref_logits = _decode_piece(reference, batch, piece, start, first)
                # Rows are the positions max(start, first).. of this piece; row i predicts
                # the next token. The chunk's last position predicts nothing in it.
                low = max(start, first)
                targets = np.asarray(chunk_tokens[low + 1 : start + len(piece) + 1], np.int64)
                rows = len(targets)
                if rows:
                    _score_rows(
                        sums,
                        logits[:rows],
                        targets,
                        ref_logits[:rows] if ref_logits is not None else None,
                    )
            if progress:
                running = math.exp(sums.nll / sums.count)
                progress(
                    chunk + 1, n_chunks, f"Chunk {chunk + 1}/{n_chunks}: perplexity {running:.4f}"
                )
        seconds = time.perf_counter() - started

    mean_nll, nll_error = _mean_and_error(sums.nll, sums.nll2, sums.count)
    ppl = math.exp(mean_nll)
    figures: dict[str, float] = {}
    if reference_path is not None:
        kld, kld_error = _mean_and_error(sums.kld, sums.kld2, sums.count)
        same_top = sums.same_top / sums.count
        ref_mean, ref_error = _mean_and_error(sums.ref_nll, sums.ref_nll2, sums.count)
        figures = {
            "kl_divergence": kld,
            "kl_divergence_uncertainty": kld_error,
            "same_top": same_top,
            "same_top_uncertainty": math.sqrt(same_top * (1 - same_top) / (sums.count - 1)),
            "reference_perplexity": math.exp(ref_mean),
            "reference_uncertainty": math.exp(ref_mean) * ref_error,
        }
    return PerplexityResult(
        perplexity=ppl,
        uncertainty=ppl * nll_error,
        tokens_scored=sums.count,
        chunks=n_chunks,
        n_ctx=n_ctx,
        seconds=seconds,
        tokens_per_s=n_chunks * n_ctx / seconds if seconds > 0 else math.nan,
        **figures,
    )


# -- task score ----------------------------------------------------------------------


def normalise(text: str) -> str:
    """What an answer is compared by: no surrounding or repeated whitespace, no case."""
    return " ".join(text.split()).casefold()


def _prompt_tokens(
    model: _internals.LlamaModel, template: templates.ChatTemplate, messages: list[dict[str, str]]
) -> tuple[list[int], list[str]]:
    """The prompt's tokens and stop strings, as serving builds them for a chat request."""
    rendered = templates.render(
        template,
        messages,
        bos_token=_token_text(model, model.token_bos()),
        eos_token=_token_text(model, model.token_eos()),
    )

    def tokenize(text: str, special: bool) -> list[int]:
        return _tokenize(model, text, add_bos=False, special=special)

    tokens = templates.prompt_tokens(tokenize, rendered, messages)
    if not rendered.added_bos:
        # The BOS token, where the model's vocabulary asks for one.
        tokens = _tokenize(model, "", add_bos=True, special=False) + tokens
    return tokens, rendered.stop


def _last_user_message(messages: list[dict[str, str]]) -> str:
    for message in reversed(messages):
        if message.get("role") == "user":
            return message.get("content", "")
    return ""


def task_score(
    model_path: Path,
    items: Sequence[TaskItem],
    *,
    template: str | None,
    architecture: str,
    adapter_path: Path | None = None,
    adapter_scale: float = 1.0,
    max_tokens: int | None = None,
    n_ctx: int = 2048,
    threads: int | None = None,
    gpu_layers: int = 0,
    progress: Progress | None = None,
    should_stop: ShouldStop | None = None,
    keep_examples: int = 20,
) -> TaskScoreResult:
    """How often a model (with a LoRA adapter or not) answers ``items`` as expected.

    Each prompt is rendered as serving renders a chat request: the ``template``
    override, else the GGUF's own template, else the architecture's default. The answer
    is generated greedily (temperature 0) by the serving scheduler until an end of
    generation, a stop string of the template, ``max_tokens`` (default: the expected
    answer's tokens + 16) or the context's end. It scores as exact when it equals the
    expected answer and as contains when it includes it, both compared normalised
    (``normalise``). Raises EvaluationError for items that cannot be rendered or do not
    fit the context, EvaluationStopped when ``should_stop()`` says so between items.
    """
    if not items:
        raise EvaluationError("There are no items to score.")
    threads = _threads(threads)
    slots = min(TASK_SLOTS, len(items))
    params = batching.context_params(slots, n_ctx, threads)
    started = time.perf_counter()
    outputs = [""] * len(items)
    generated = 0

    with contextlib.ExitStack() as stack:
        loaded = _load(
            stack,
            model_path,
            params,
            adapter_path=adapter_path,
            adapter_scale=adapter_scale,
            model_params=batching.model_params(gpu_layers),
            models={},
        )
        model = loaded.model
        chat_template = templates.choose(
            override=template or "",
            gguf_template=model.metadata().get("tokenizer.chat_template"),
            architecture=architecture,
        )
        if chat_template is None:
            raise EvaluationError(
                "This model has no chat template and its architecture has no default: "
                "set a chat template to score it on prompts."
            )

        sequences: list[batching.Sequence] = []
        for index, item in enumerate(items):
            try:
                prompt, stop = _prompt_tokens(model, chat_template, item.messages)
            except templates.TemplateError as exc:
                raise EvaluationError(f"Item {index + 1}: {exc}") from exc
            if len(prompt) >= n_ctx:
                raise EvaluationError(
                    f"Item {index + 1}: the prompt is {len(prompt)} tokens, which leaves no "
                    f"room for an answer in a context of {n_ctx}."
                )
            limit = max_tokens or (
                len(_tokenize(model, item.expected, add_bos=False, special=False))
                + EXTRA_ANSWER_TOKENS
            )
            sequences.append(
                batching.Sequence(
                    key=str(index),
                    prompt=prompt,
                    max_tokens=limit,
                    sampling=Sampling(temperature=0.0),
                    stop=stop,
                )
            )

        scheduler = Scheduler(model, loaded.ctx, n_ctx)
        stack.callback(scheduler.close)
        waiting = list(reversed(sequences))
        done = 0
        if progress:
            progress(0, len(items), f"Generating answers to {len(items)} prompts.")
        while waiting or scheduler.active:
            while waiting and scheduler.free_slots:
                if should_stop and should_stop():
                    raise EvaluationStopped()
                scheduler.admit(waiting.pop())
            try:
                step = scheduler.step()
            except BatchError as exc:
                raise EvaluationError(f"llama.cpp could not generate an answer: {exc}") from exc
            for output in step:
                index = int(output.sequence.key)
                outputs[index] += output.text
                if output.finished:
                    generated += output.sequence.produced
                    done += 1
                    if progress:
                        progress(done, len(items), f"Answered {done}/{len(items)} prompts.")

    exact = [
        normalise(out) == normalise(item.expected) for out, item in zip(outputs, items, strict=True)
    ]
    contains = [
        normalise(item.expected) in normalise(out) for out, item in zip(outputs, items, strict=True)
    ]
    examples = [
        {
            "prompt": _last_user_message(item.messages)[:EXAMPLE_PROMPT_CHARS],
            "expected": item.expected,
            "output": outputs[i],
            "exact": exact[i],
            "contains": contains[i],
        }
        for i, item in enumerate(items[:keep_examples])
    ]
    n = len(items)
    return TaskScoreResult(
        n=n,
        exact=sum(exact) / n,
        exact_count=sum(exact),
        contains=sum(contains) / n,
        contains_count=sum(contains),
        examples=examples,
        generated_tokens=generated,
        seconds=time.perf_counter() - started,
        chat_template=chat_template.source,
    )


# -- dataset rows --------------------------------------------------------------------


def task_items(rows: Iterable[dict[str, Any]], shape: str) -> list[TaskItem]:
    """Items from canonical dataset rows, one row a line: the conversation before the
    answer, and the answer (instruction's output, prompt_completion's completion, a chat's
    last assistant message). Raises EvaluationError naming the line of a bad row."""
    if shape == "text":
        raise EvaluationError(
            "Text rows have no expected answers to score; evaluate their perplexity instead."
        )
    items = []
    for line, row in enumerate(rows, start=1):
        try:
            messages = row_messages(row, shape)
        except ValueError as exc:
            raise EvaluationError(f"Line {line}: {exc}.") from exc
        answers = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        if not answers:
            raise EvaluationError(f"Line {line}: the conversation has no assistant answer.")
        expected = messages[answers[-1]]["content"]
        if not expected.strip():
            raise EvaluationError(f"Line {line}: the expected answer is empty.")
        items.append(TaskItem(messages=messages[: answers[-1]], expected=expected))
    return items


def text_of(rows: Iterable[dict[str, Any]]) -> str:
    """The text of text-shape rows for ``perplexity``, rows joined by a blank line.

    Perplexity reads one stream of tokens cut into fixed chunks, as llama-perplexity reads
    one file, so rows are joined rather than scored alone (a row shorter than a chunk
    could not be scored at all). A blank line between rows is how such corpora separate
    documents (wikitext's raw files do), so the model sees ordinary paragraph breaks.
    """
    texts = []
    for line, row in enumerate(rows, start=1):
        value = row.get("text") if isinstance(row, dict) else None
        if not isinstance(value, str):
            raise EvaluationError(f'Line {line}: the row needs a text "text".')
        texts.append(value)
    return "\n\n".join(texts)
