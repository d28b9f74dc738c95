"""One resident replica of a deployment: a llama.cpp model, its context and the thread
that serves it.

The Celery task that receives a request only hands it to ``Replica.submit`` and
returns, so a worker's task threads never wait on generation. Each replica owns one
thread that admits requests from a bounded queue into the context's parallel slots
and advances every admitted request together, one ``llama_decode`` per step
(``batching.Scheduler``: continuous batching). It writes every event (start, text
deltas, end or error) to the request's Redis stream, which the HTTP endpoint reads; a
request whose client went away, or a replica that is stopping, ends at the next step.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import llama_cpp
from llama_cpp import _internals

from workers.inference import batching, grammar, protocol, templates
from workers.inference.batching import (
    BatchError,
    GrammarError,
    Output,
    Sampling,
    Scheduler,
    Sequence,
)
from workers.inference.protocol import ReplicaSpec, RequestSpec

log = logging.getLogger(__name__)

# A replica's GPU index and tensor split name GPUs as the worker's heartbeat does
# (nvidia-smi, in PCI bus order); CUDA numbers them fastest first unless told so before
# it starts, which is at the first model load (importing llama_cpp does not start it).
os.environ.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")

# How long an idle replica waits on its queue before looking at its stop flag again.
IDLE_POLL_SECONDS = 0.5
# A request that waited in the replica's queue longer than this is checked for a cancel
# before it starts. One taken sooner is not (a Redis round trip on every request's path):
# had its client left already, the first event's write reads the flag and ends it.
CANCEL_CHECK_AFTER_SECONDS = 0.1


class EventSink(Protocol):
    """Where a replica sends a request's events (Redis in production)."""

    def send(self, request_id: str, event: dict[str, Any]) -> bool:
        """Send one event; return True if the client has asked to cancel the request."""

    def cancelled(self, request_id: str) -> bool: ...


class LoadError(Exception):
    pass


@dataclass
class _Counters:
    served: int = 0
    failed: int = 0
    cancelled: int = 0
    # Tokens a cancelled generation had produced when it stopped (the latest one).
    cancelled_at_tokens: int | None = None


def default_threads(cores: int) -> int:
    # llama.cpp decodes fastest with one thread per physical core; leave none idle
    # on small machines, one spare for the web process on larger ones.
    return max(1, cores if cores <= 4 else cores - 1)


@dataclass
class _Prepared:
    """A request made ready off the serving thread: its prompt's tokens, its stop strings
    and its grammar. Tokenising a long prompt takes seconds; on the serving thread it
    would stall every stream beside it."""

    tokens: list[int]
    stop: list[str]
    grammar: str = ""


@dataclass
class _Running:
    """What the replica remembers about a request while its sequence is in a slot."""

    request: RequestSpec
    sequence: Sequence
    started: float
    # Text generated since the last delta was sent, and when the next one may go.
    unsent: list[str] = field(default_factory=list)
    # Log-probability entries of the tokens in ``unsent`` (when the request asked).
    logprobs: list[dict] = field(default_factory=list)
    send_after: float = 0.0


class Replica:
    def __init__(
        self,
        spec: ReplicaSpec,
        model_path: Path,
        sink: EventSink,
        cpu_cores: int,
        *,
        adapter_path: Path | None = None,
    ):
        self.spec = spec
        self._adapter_path = adapter_path
        self.sink = sink
        self._model_path = model_path
        self._threads = spec.threads or default_threads(cpu_cores)
        # Requests, prepared, with the time they arrived (monotonic); None wakes an idle
        # thread.
        self._queue: queue.Queue[tuple[RequestSpec, _Prepared | None, float] | None] = queue.Queue(
            maxsize=spec.queue_size
        )
        self._stopping = threading.Event()
        self._stop_reason = ""
        self._counters = _Counters()
        self._thread: threading.Thread | None = None
        self._running: dict[str, _Running] = {}
        self.model: _internals.LlamaModel | None = None
        self.scheduler: Scheduler | None = None
        self._ctx: _internals.LlamaContext | None = None
        self._embed_ctx: _internals.LlamaContext | None = None
        self._adapter = None
        # The tensor split's C array: llama.cpp holds a pointer to it (batching.gpu_split).
        self._tensor_split = None
        self.template: templates.ChatTemplate | None = None

    # -- lifecycle -------------------------------------------------------------

    def load(self) -> None:
        """Load the model (in the caller's thread) and start serving."""
        spec = self.spec
        try:
            self._load_native()
        except Exception as exc:  # noqa: BLE001 - llama.cpp reports load failures as ValueError etc.
            self._close_native()
            raise LoadError(f"llama.cpp could not load the model: {exc}") from exc
        self.template = templates.choose(
            override=spec.chat_template,
            gguf_template=self.model.metadata().get("tokenizer.chat_template"),
            architecture=spec.architecture,
        )
        self._thread = threading.Thread(
            target=self._run, name=f"replica-{spec.replica_id}", daemon=True
        )
        self._thread.start()

    def _load_native(self) -> None:
        spec = self.spec
        # llama.cpp logs through llama-cpp-python's logger; errors only, as Llama(verbose=False).
        logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)
        invariant = spec.serving_mode != protocol.FASTEST
        model_params = batching.model_params(spec.gpu_layers, invariant=invariant)
        if spec.gpu_index is not None and spec.gpu_layers != 0:
            self._tensor_split = batching.gpu_split(
                model_params,
                split_mode=spec.split_mode,
                gpu_index=spec.gpu_index,
                tensor_split=spec.tensor_split,
            )
        self.model = _internals.LlamaModel(
            path_model=str(self._model_path), params=model_params, verbose=False
        )
        params = batching.context_params(
            spec.parallel_slots,
            spec.context_length,
            self._threads,
            kv_cache_type=spec.kv_cache_type,
            flash_attention=spec.flash_attention,
            invariant=invariant,
            prompt_budget=spec.batch_size,
        )
        self._ctx = _internals.LlamaContext(model=self.model, params=params, verbose=False)
        if self._adapter_path is not None:
            self._adapter = llama_cpp.llama_adapter_lora_init(
                self.model.model, str(self._adapter_path).encode("utf-8")
            )
            # ctypes gives a NULL pointer back as a falsy object, not None.
            if not self._adapter:
                self._adapter = None
                raise ValueError("the LoRA adapter does not fit this model")
            adapters = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(self._adapter)
            scales = (llama_cpp.ctypes.c_float * 1)(spec.adapter_scale)
            if llama_cpp.llama_set_adapters_lora(self._ctx.ctx, adapters, 1, scales):
                raise ValueError("the LoRA adapter could not be applied")
        if spec.embeddings:
            # A second, small context on the same weights: one input at a time, all its
            # tokens in one batch, mean-pooled into one vector as OpenAI's endpoint returns.
            params = llama_cpp.llama_context_default_params()
            params.n_ctx = params.n_batch = params.n_ubatch = spec.context_length
            params.n_seq_max = 1
            params.embeddings = True
            params.pooling_type = llama_cpp.LLAMA_POOLING_TYPE_MEAN
            params.n_threads = params.n_threads_batch = self._threads
            self._embed_ctx = _internals.LlamaContext(
                model=self.model, params=params, verbose=False
            )
        self.scheduler = Scheduler(
            self.model,
            self._ctx,
            spec.context_length,
            spec.batch_size,
            prompt_cache=spec.prompt_cache,
            invariant=invariant,
        )

    def _close_native(self) -> None:
        if self.scheduler is not None:
            self.scheduler.close()
            self.scheduler = None
        for ctx in (self._embed_ctx, self._ctx):
            if ctx is not None:
                ctx.close()
        self._embed_ctx = self._ctx = None
        if self._adapter is not None:
            llama_cpp.llama_adapter_lora_free(self._adapter)
            self._adapter = None
        if self.model is not None:
            self.model.close()
            self.model = None
        self._tensor_split = None

    def stop(self, reason: str = "The deployment was stopped.") -> None:
        """Stop serving: queued and running requests get a clean error at the next step."""
        self._stop_reason = reason
        self._stopping.set()
        with contextlib.suppress(queue.Full):
            self._queue.put_nowait(None)  # wake an idle thread
        if self._thread is not None:
            self._thread.join(timeout=30)
        self._drain_queue(reason)
        self._close_native()

    # -- requests --------------------------------------------------------------

    def submit(self, request: RequestSpec) -> None:
        """Prepare a request (in the caller's thread, not the serving one) and queue it."""
        if self._stopping.is_set():
            self._fail(request, protocol.REPLICA_UNAVAILABLE, "The deployment is stopping.")
            return
        if self._queue.full():
            self._fail(request, protocol.QUEUE_FULL, "The deployment's queue is full.")
            return
        arrived = time.monotonic()
        try:
            prepared = None if request.kind == "embedding" else self._prepare(request)
        except RequestError as exc:
            self._fail(request, exc.code, str(exc))
            return
        try:
            self._queue.put_nowait((request, prepared, arrived))
        except queue.Full:
            self._fail(request, protocol.QUEUE_FULL, "The deployment's queue is full.")

    def busy(self) -> bool:
        """Whether a request is queued or generating (read from another thread: a lag of
        one step does not matter to a caller that waits for quiet)."""
        return self._queue.qsize() > 0 or bool(self._running)

    def snapshot(self) -> dict[str, Any]:
        running = len(self._running)
        return {
            "replica_id": self.spec.replica_id,
            "generation": self.spec.generation,
            "deployment_id": self.spec.deployment_id,
            "deployment": self.spec.deployment_name,
            "sha256": self.spec.sha256,
            "queue_depth": self._queue.qsize() + running,
            "running": running,
            "slots": self.spec.parallel_slots,
            "served": self._counters.served,
            "failed": self._counters.failed,
            "cancelled": self._counters.cancelled,
            "cancelled_at_tokens": self._counters.cancelled_at_tokens,
            "threads": self._threads,
            "serving_mode": self.spec.serving_mode,
            "chat_template": self.template.source if self.template else "",
        }

    def _fail(self, request: RequestSpec, code: str, message: str) -> None:
        self._counters.failed += 1
        self.sink.send(
            request.request_id, {"type": protocol.ERROR, "code": code, "message": message}
        )

    def _drain_queue(self, reason: str) -> None:
        while True:
            try:
                queued = self._queue.get_nowait()
            except queue.Empty:
                return
            if queued is not None:
                self._fail(queued[0], protocol.REPLICA_UNAVAILABLE, reason)

    # -- the serving thread ----------------------------------------------------

    def _run(self) -> None:
        scheduler = self.scheduler
        while not self._stopping.is_set():
            self._admit(scheduler)
            if not self._running:
                continue
            try:
                outputs = scheduler.step()
            except BatchError as exc:
                log.error("replica %s: %s", self.spec.replica_id, exc)
                self._end_all(protocol.INTERNAL, f"Inference failed: {exc}")
                scheduler.forget()
                continue
            for output in outputs:
                self._emit(output)
        self._end_all(protocol.REPLICA_UNAVAILABLE, self._stop_reason)
        self._drain_queue(self._stop_reason)

    def _admit(self, scheduler: Scheduler) -> None:
        """Move waiting requests into free slots; wait for one when nothing runs."""
        while scheduler.free_slots and not self._stopping.is_set():
            try:
                if self._running:
                    queued = self._queue.get_nowait()
                else:
                    queued = self._queue.get(timeout=IDLE_POLL_SECONDS)
            except queue.Empty:
                return
            if queued is None:
                continue
            request, prepared, arrived = queued
            if time.time() > request.deadline:
                self._fail(
                    request,
                    protocol.QUEUE_TIMEOUT,
                    "The request waited too long in the deployment's queue.",
                )
                continue
            waited = time.monotonic() - arrived
            if waited > CANCEL_CHECK_AFTER_SECONDS and self.sink.cancelled(request.request_id):
                self._counters.cancelled += 1
                continue
            try:
                if request.kind == "embedding":
                    self._embed(request)  # short, and done before the next step
                    self._counters.served += 1
                else:
                    self._start(request, prepared, scheduler)
            except RequestError as exc:
                self._fail(request, exc.code, str(exc))
            except Exception as exc:
                log.exception("request %s failed", request.request_id)
                self._fail(request, protocol.INTERNAL, f"Inference failed: {exc}")

    def _prepare(self, request: RequestSpec) -> _Prepared:
        """The request's tokens, stop strings and grammar, checked against the context."""
        tokens, stop = self._prompt_tokens(request)
        n_ctx = self.spec.context_length
        if len(tokens) >= n_ctx:
            what = "messages" if request.kind == "chat" else "prompt"
            raise RequestError(
                protocol.CONTEXT_LENGTH_EXCEEDED,
                f"This model's maximum context length is {n_ctx} tokens. However, your "
                f"{what} resulted in {len(tokens)} tokens. Please reduce the length of the "
                f"{what}.",
            )
        gbnf = ""
        if request.json_schema is not None:
            try:
                gbnf = grammar.grammar(request.json_schema)
            except (ValueError, AssertionError, KeyError, TypeError, RecursionError) as exc:
                raise RequestError(
                    protocol.INVALID_REQUEST,
                    f"The JSON schema cannot be turned into a grammar: {exc}",
                ) from exc
        return _Prepared(tokens, stop, gbnf)

    def _start(self, request: RequestSpec, prepared: _Prepared, scheduler: Scheduler) -> None:
        tokens = prepared.tokens
        room = scheduler.n_ctx_seq - len(tokens)
        sequence = Sequence(
            key=request.request_id,
            prompt=tokens,
            max_tokens=max(1, min(request.max_tokens or room, room)),
            sampling=Sampling.of(request),
            stop=prepared.stop,
            grammar=prepared.grammar,
            top_logprobs=request.top_logprobs,
        )
        try:
            scheduler.admit(sequence)
        except GrammarError as exc:
            raise RequestError(
                protocol.INVALID_REQUEST, f"The JSON schema's grammar is not usable: {exc}"
            ) from exc
        started = time.time()
        cancelled = self.sink.send(
            request.request_id,
            {
                "type": protocol.START,
                "prompt_tokens": len(tokens),
                "cached_tokens": sequence.cached,
                "queue_ms": round(max(0.0, started - request.sent_at) * 1000, 1),
                "sha256": self.spec.sha256,
                "chat_template": self.template.source if self.template else "",
            },
        )
        if cancelled:
            scheduler.release(sequence)
            self._counters.cancelled += 1
            return
        self._running[request.request_id] = _Running(request, sequence, started)

    def _emit(self, output: Output) -> None:
        sequence = output.sequence
        running = self._running.get(sequence.key)
        if running is None:
            return
        if output.text:
            running.unsent.append(output.text)
        if output.logprob is not None:
            running.logprobs.append(output.logprob)
        if (running.unsent or running.logprobs) and self._send_text(running, output.finished):
            # The client went away: free the slot for the next request now.
            self.scheduler.release(sequence)
            del self._running[sequence.key]
            self._counters.cancelled += 1
            self._counters.cancelled_at_tokens = sequence.produced
            return
        if not output.finished:
            return
        del self._running[sequence.key]
        self._counters.served += 1
        self.sink.send(
            sequence.key,
            {
                "type": protocol.END,
                "finish_reason": sequence.finish_reason,
                "prompt_tokens": len(sequence.prompt),
                "cached_tokens": sequence.cached,
                "completion_tokens": sequence.produced,
                "generation_ms": round((time.time() - running.started) * 1000, 1),
            },
        )

    def _send_text(self, running: _Running, finished: bool) -> bool:
        """Send the text not yet sent, unless the deployment's stream interval holds it.

        The first text goes at once (time to first token); later text waits until the
        interval since the last delta has passed, or the sequence finishes. Each delta
        costs the worker, Redis, the web process and the client a wake-up: on a small
        CPU box those take cores from the model. Returns True if the client cancelled.
        """
        now = time.monotonic()
        if not finished and now < running.send_after:
            return False
        text = "".join(running.unsent)
        running.unsent.clear()
        running.send_after = now + self.spec.stream_interval_ms / 1000
        # "tokens": generated so far, all of them in text sent by now, so a stream cut
        # off before its end event is still billed for what it delivered.
        delta = {"type": protocol.DELTA, "text": text, "tokens": running.sequence.produced}
        if running.logprobs:
            delta["logprobs"] = running.logprobs
            running.logprobs = []
        return self.sink.send(running.sequence.key, delta)

    def _end_all(self, code: str, message: str) -> None:
        for running in list(self._running.values()):
            self.scheduler.release(running.sequence)
            self._fail(running.request, code, message)
        self._running.clear()

    def _prompt_tokens(self, request: RequestSpec) -> tuple[list[int], list[str]]:
        model = self.model
        stop = list(request.stop)
        if request.kind == "chat":
            if self.template is None:
                raise RequestError(
                    protocol.INVALID_REQUEST,
                    "This model has no chat template: use /v1/completions, or set a chat "
                    "template on the deployment.",
                )
            try:
                rendered = templates.render(
                    self.template,
                    request.messages,
                    bos_token=_token_text(model, model.token_bos()),
                    eos_token=_token_text(model, model.token_eos()),
                )
                tokens = templates.prompt_tokens(
                    functools.partial(_tokenize, model), rendered, request.messages
                )
            except templates.TemplateError as exc:
                raise RequestError(protocol.INVALID_REQUEST, str(exc)) from exc
            if not rendered.added_bos:
                # The BOS token, where the model's vocabulary asks for one.
                tokens = model.tokenize(b"", add_bos=True, special=False) + tokens
            stop.extend(s for s in rendered.stop if s not in stop)
            return tokens, stop
        return model.tokenize(request.prompt.encode("utf-8"), add_bos=True, special=False), stop

    def _embed(self, request: RequestSpec) -> None:
        if self._embed_ctx is None:
            raise RequestError(
                protocol.INVALID_REQUEST, "This deployment does not serve embeddings."
            )
        n_ctx = self.spec.context_length
        inputs = [
            self.model.tokenize(text.encode("utf-8"), add_bos=True, special=False)
            for text in request.inputs
        ]
        for i, tokens in enumerate(inputs):
            if len(tokens) > n_ctx:
                raise RequestError(
                    protocol.CONTEXT_LENGTH_EXCEEDED,
                    f"This model's maximum context length is {n_ctx} tokens; input {i} "
                    f"resulted in {len(tokens)} tokens.",
                )
            if not tokens:
                raise RequestError(protocol.INVALID_REQUEST, f"Input {i} is empty.")
        self.sink.send(
            request.request_id,
            {"type": protocol.START, "prompt_tokens": 0, "queue_ms": 0, "sha256": self.spec.sha256},
        )
        # One input at a time, each from an empty cache: an input's vector must not
        # depend on the inputs next to it.
        ctx = self._embed_ctx
        n_embd = self.model.n_embd()
        batch = _internals.LlamaBatch(n_tokens=n_ctx, embd=0, n_seq_max=1, verbose=False)
        vectors = []
        try:
            for tokens in inputs:
                if self.sink.cancelled(request.request_id):
                    return
                ctx.kv_cache_clear()
                batch.reset()
                batch.add_sequence(tokens, 0, logits_all=True)
                ctx.decode(batch)
                vectors.append(list(llama_cpp.llama_get_embeddings_seq(ctx.ctx, 0)[:n_embd]))
        finally:
            batch.close()
        self.sink.send(request.request_id, {"type": protocol.EMBEDDING, "data": vectors})
        self.sink.send(
            request.request_id,
            {
                "type": protocol.END,
                "finish_reason": "stop",
                "prompt_tokens": sum(len(tokens) for tokens in inputs),
                "completion_tokens": 0,
            },
        )


class RequestError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def _tokenize(model: _internals.LlamaModel, text: str, special: bool) -> list[int]:
    return model.tokenize(text.encode("utf-8"), add_bos=False, special=special)


def _token_text(model: _internals.LlamaModel, token: int) -> str:
    if token < 0:
        return ""
    # Not LlamaModel.token_to_piece: it returns its whole 32-byte buffer, NULs included,
    # which put 27 NUL tokens after <bos> in every templated prompt.
    return batching.token_bytes(model.vocab, token, special=True).decode("utf-8", errors="ignore")
