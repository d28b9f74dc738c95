"""One resident replica of a deployment: a llama.cpp model and the thread that serves it.

The Celery task that receives a request only hands it to ``Replica.submit`` and
returns, so a worker's task threads never wait on generation. Each replica owns one
thread that takes requests from a bounded queue in order, runs them on its model and
writes every event (start, text deltas, end or error) to the request's Redis stream,
which the HTTP endpoint reads. Between tokens the thread checks whether the client went
away or the replica is stopping, so neither leaves a generation running.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from workers.inference import protocol, templates
from workers.inference.protocol import ReplicaSpec, RequestSpec

log = logging.getLogger(__name__)


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
    busy: bool = False


def default_threads(cores: int) -> int:
    # llama.cpp decodes fastest with one thread per physical core; leave none idle
    # on small machines, one spare for the web process on larger ones.
    return max(1, cores if cores <= 4 else cores - 1)


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
        self._queue: queue.Queue[RequestSpec | None] = queue.Queue(maxsize=spec.queue_size)
        self._stopping = threading.Event()
        self._stop_reason = ""
        self._counters = _Counters()
        self._thread: threading.Thread | None = None
        self.llm = None
        self.template: templates.ChatTemplate | None = None

    # -- lifecycle -------------------------------------------------------------

    def load(self) -> None:
        """Load the model (in the caller's thread) and start serving."""
        from llama_cpp import LLAMA_POOLING_TYPE_MEAN, LLAMA_SPLIT_MODE_NONE, Llama

        spec = self.spec
        kwargs: dict[str, Any] = {
            "model_path": str(self._model_path),
            "n_ctx": spec.context_length,
            "n_threads": self._threads,
            "n_threads_batch": self._threads,
            "n_batch": spec.batch_size,
            "n_gpu_layers": spec.gpu_layers,
            "embedding": spec.embeddings,
            "verbose": False,
        }
        if spec.embeddings:
            # One vector per input (mean of its tokens), as OpenAI's endpoint returns;
            # generative GGUFs name no pooling of their own.
            kwargs["pooling_type"] = LLAMA_POOLING_TYPE_MEAN
        if spec.gpu_index is not None and spec.gpu_layers != 0:
            kwargs.update(main_gpu=spec.gpu_index, split_mode=LLAMA_SPLIT_MODE_NONE)
        if self._adapter_path is not None:
            kwargs.update(lora_path=str(self._adapter_path), lora_scale=spec.adapter_scale)
        try:
            self.llm = Llama(**kwargs)
        except Exception as exc:  # noqa: BLE001 - llama.cpp reports load failures as ValueError etc.
            raise LoadError(f"llama.cpp could not load the model: {exc}") from exc
        self.template = templates.choose(
            override=spec.chat_template,
            gguf_template=self.llm.metadata.get("tokenizer.chat_template"),
            architecture=spec.architecture,
        )
        self._thread = threading.Thread(
            target=self._run, name=f"replica-{spec.replica_id}", daemon=True
        )
        self._thread.start()

    def stop(self, reason: str = "The deployment was stopped.") -> None:
        """Stop serving: queued requests get a clean error, a running one ends at its next token."""
        self._stopping.set()
        self._stop_reason = reason
        while True:
            try:
                request = self._queue.get_nowait()
            except queue.Empty:
                break
            if request is not None:
                self._fail(request, protocol.REPLICA_UNAVAILABLE, reason)
        with contextlib.suppress(queue.Full):
            self._queue.put_nowait(None)  # wake the thread
        if self._thread is not None:
            self._thread.join(timeout=30)
        if self.llm is not None:
            self.llm.close()
            self.llm = None

    # -- requests --------------------------------------------------------------

    def submit(self, request: RequestSpec) -> None:
        if self._stopping.is_set():
            self._fail(request, protocol.REPLICA_UNAVAILABLE, "The deployment is stopping.")
            return
        try:
            self._queue.put_nowait(request)
        except queue.Full:
            self._fail(request, protocol.QUEUE_FULL, "The deployment's queue is full.")

    def snapshot(self) -> dict[str, Any]:
        return {
            "replica_id": self.spec.replica_id,
            "generation": self.spec.generation,
            "deployment_id": self.spec.deployment_id,
            "deployment": self.spec.deployment_name,
            "sha256": self.spec.sha256,
            "queue_depth": self._queue.qsize() + (1 if self._counters.busy else 0),
            "served": self._counters.served,
            "failed": self._counters.failed,
            "cancelled": self._counters.cancelled,
            "cancelled_at_tokens": self._counters.cancelled_at_tokens,
            "threads": self._threads,
            "chat_template": self.template.source if self.template else "",
        }

    def _fail(self, request: RequestSpec, code: str, message: str) -> None:
        self._counters.failed += 1
        self.sink.send(
            request.request_id, {"type": protocol.ERROR, "code": code, "message": message}
        )

    def _run(self) -> None:
        while not self._stopping.is_set():
            request = self._queue.get()
            if request is None:
                continue
            if time.time() > request.deadline:
                self._fail(
                    request,
                    protocol.QUEUE_TIMEOUT,
                    "The request waited too long in the deployment's queue.",
                )
                continue
            if self.sink.cancelled(request.request_id):
                self._counters.cancelled += 1
                continue
            self._counters.busy = True
            try:
                self._serve(request)
                self._counters.served += 1
            except RequestError as exc:
                self._fail(request, exc.code, str(exc))
            except Exception as exc:
                log.exception("request %s failed", request.request_id)
                self._fail(request, protocol.INTERNAL, f"Inference failed: {exc}")
            finally:
                self._counters.busy = False

    def _serve(self, request: RequestSpec) -> None:
        if request.kind == "embedding":
            self._embed(request)
            return
        tokens, stop = self._prompt_tokens(request)
        n_ctx = self.spec.context_length
        if len(tokens) >= n_ctx:
            raise RequestError(
                protocol.CONTEXT_LENGTH_EXCEEDED,
                f"This model's maximum context length is {n_ctx} tokens. However, your "
                f"{'messages' if request.kind == 'chat' else 'prompt'} resulted in "
                f"{len(tokens)} tokens. Please reduce the length of the "
                f"{'messages' if request.kind == 'chat' else 'prompt'}.",
            )
        room = n_ctx - len(tokens)
        max_tokens = min(request.max_tokens or room, room)
        started = time.time()
        cancelled = self.sink.send(
            request.request_id,
            {
                "type": protocol.START,
                "prompt_tokens": len(tokens),
                "queue_ms": round(max(0.0, started - request.sent_at) * 1000, 1),
                "sha256": self.spec.sha256,
                "chat_template": self.template.source if self.template else "",
            },
        )
        if cancelled:
            return
        completion_tokens, finish_reason = self._generate(request, tokens, stop, max_tokens)
        if finish_reason == protocol.CANCELLED:
            self._counters.cancelled += 1
            self._counters.cancelled_at_tokens = completion_tokens
            return
        self.sink.send(
            request.request_id,
            {
                "type": protocol.END,
                "finish_reason": finish_reason,
                "prompt_tokens": len(tokens),
                "completion_tokens": completion_tokens,
                "generation_ms": round((time.time() - started) * 1000, 1),
            },
        )

    def _prompt_tokens(self, request: RequestSpec) -> tuple[list[int], list[str]]:
        llm = self.llm
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
                    bos_token=_token_text(llm, llm.token_bos()),
                    eos_token=_token_text(llm, llm.token_eos()),
                )
            except templates.TemplateError as exc:
                raise RequestError(protocol.INVALID_REQUEST, str(exc)) from exc
            tokens = llm.tokenize(
                rendered.text.encode("utf-8"), add_bos=not rendered.added_bos, special=True
            )
            stop.extend(s for s in rendered.stop if s not in stop)
            return tokens, stop
        return llm.tokenize(request.prompt.encode("utf-8"), add_bos=True, special=False), stop

    def _generate(
        self, request: RequestSpec, tokens: list[int], stop: list[str], max_tokens: int
    ) -> tuple[int, str]:
        """Stream the completion; return (completion tokens, finish reason)."""
        # Start from an empty KV cache. llama-cpp-python would reuse the previous
        # request's matching prefix, but on Gemma 3 (sliding-window cache) a short
        # reused prefix changes even greedy output; an answer must not depend on
        # which request ran before it.
        self.llm.reset()
        stream = self.llm.create_completion(
            prompt=tokens,
            max_tokens=max_tokens,
            temperature=request.temperature,
            top_p=request.top_p,
            top_k=request.top_k,
            repeat_penalty=request.repeat_penalty,
            presence_penalty=request.presence_penalty,
            frequency_penalty=request.frequency_penalty,
            seed=request.seed,
            stop=stop or None,
            stream=True,
        )
        count = 0
        finish_reason = "length"
        try:
            for chunk in stream:
                choice = chunk["choices"][0]
                count += 1
                text = choice.get("text") or ""
                if text and self.sink.send(
                    request.request_id, {"type": protocol.DELTA, "text": text}
                ):
                    return count, protocol.CANCELLED
                if self._stopping.is_set():
                    raise RequestError(protocol.REPLICA_UNAVAILABLE, self._stop_reason)
                if choice.get("finish_reason"):
                    finish_reason = choice["finish_reason"]
        finally:
            stream.close()
        # The generator yields one chunk per sampled token, plus a final chunk that
        # only carries the finish reason.
        return max(0, count - 1), finish_reason

    def _embed(self, request: RequestSpec) -> None:
        if not self.spec.embeddings:
            raise RequestError(
                protocol.INVALID_REQUEST, "This deployment does not serve embeddings."
            )
        n_ctx = self.spec.context_length
        for i, text in enumerate(request.inputs):
            n = len(self.llm.tokenize(text.encode("utf-8"), add_bos=True, special=False))
            if n > n_ctx:
                raise RequestError(
                    protocol.CONTEXT_LENGTH_EXCEEDED,
                    f"This model's maximum context length is {n_ctx} tokens; input {i} "
                    f"resulted in {n} tokens.",
                )
        self.sink.send(
            request.request_id,
            {"type": protocol.START, "prompt_tokens": 0, "queue_ms": 0, "sha256": self.spec.sha256},
        )
        # One input at a time: batched inputs came out different from the same input
        # alone (llama-cpp-python 0.3.36, causal model), and an input's vector must not
        # depend on its neighbours.
        vectors, prompt_tokens = [], 0
        for text in request.inputs:
            if self.sink.cancelled(request.request_id):
                return
            result = self.llm.create_embedding(text)
            vectors.append(result["data"][0]["embedding"])
            prompt_tokens += result["usage"]["prompt_tokens"]
        self.sink.send(request.request_id, {"type": protocol.EMBEDDING, "data": vectors})
        self.sink.send(
            request.request_id,
            {
                "type": protocol.END,
                "finish_reason": "stop",
                "prompt_tokens": prompt_tokens,
                "completion_tokens": 0,
            },
        )


class RequestError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def _token_text(llm, token: int) -> str:
    if token < 0:
        return ""
    return llm.detokenize([token], special=True).decode("utf-8", errors="ignore")
