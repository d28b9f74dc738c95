"""OpenAI's answers to a generation or an embedding request: whole, or streamed as
server-sent events, with the late errors a stream can only report as an event."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

from django.http import HttpRequest, HttpResponse, JsonResponse, StreamingHttpResponse

from apps.inference import gateway, openai_api, tools
from apps.inference.exchange import Authorize, Exchange, dispatch, worker_error
from apps.inference.openai_api import ApiError
from workers.inference import protocol


async def generation_response(
    request: HttpRequest, authorize: Authorize, kind: str
) -> HttpResponse:
    try:
        exchange = await dispatch(authorize, kind, request.body)
        # A stream goes on in ``_stream``, which finishes the request itself.
        async with exchange.accounted(keep_open=exchange.parsed.stream):
            events = await exchange.start()
            if not exchange.parsed.stream:
                finish_reason = await _drain(exchange, events)
    except ApiError as exc:
        return exc.response()
    shape = _Shape(kind, exchange.call.route, exchange.call.request_id)
    if exchange.parsed.stream:
        response = StreamingHttpResponse(
            _stream(exchange, events, shape, exchange.parsed.include_usage),
            content_type="text/event-stream",
        )
        response["Cache-Control"] = "no-cache"
        response["X-Accel-Buffering"] = "no"
    else:
        response = JsonResponse(shape.whole(exchange, finish_reason))
    for name, value in exchange.headers.items():
        response[name] = value
    return response


async def _drain(exchange: Exchange, events: AsyncIterator[dict[str, Any]]) -> str:
    async for event in events:
        if event["type"] == protocol.DELTA:
            exchange.on_delta(event)
        elif event["type"] == protocol.END:
            exchange.completion_tokens = event["completion_tokens"]
            return event["finish_reason"]
        elif event["type"] == protocol.ERROR:
            raise worker_error(event, exchange.call.kind)
    raise ApiError(500, "The worker ended the request without an answer.", type="server_error")


async def _stream(
    exchange: Exchange,
    events: AsyncIterator[dict[str, Any]],
    shape: _Shape,
    include_usage: bool,
) -> AsyncIterator[bytes]:
    # With tools, content is streamed through a filter that takes the calls out of it.
    calls = tools.ToolStream(exchange.parsed.tools) if exchange.parsed.tools else None
    try:
        async with exchange.accounted():
            if exchange.call.kind == "chat":
                yield openai_api.sse(shape.chunk(role=True))
            async for event in events:
                if event["type"] == protocol.DELTA:
                    exchange.on_delta(event)
                    text = calls.feed(event["text"]) if calls else event["text"]
                    logprobs = event.get("logprobs")
                    if text or logprobs:
                        yield openai_api.sse(shape.chunk(text=text, logprobs=logprobs))
                elif event["type"] == protocol.END:
                    exchange.completion_tokens = event["completion_tokens"]
                    finish_reason = event["finish_reason"]
                    if calls:
                        text, found = calls.finish()
                        if text:
                            yield openai_api.sse(shape.chunk(text=text))
                        if found:
                            yield openai_api.sse(shape.chunk(tool_calls=tools.stream_deltas(found)))
                            finish_reason = "tool_calls"
                    yield openai_api.sse(shape.chunk(finish_reason=finish_reason))
                    if include_usage:
                        yield openai_api.sse(shape.usage_chunk(exchange))
                elif event["type"] == protocol.ERROR:
                    raise worker_error(event, exchange.call.kind)
            # The record is started before the client can leave (it closes the stream at
            # [DONE]) and written while [DONE] travels; ``accounted`` waits for it.
            exchange.finish_soon()
            yield openai_api.sse("[DONE]")
    except ApiError as exc:
        # The status line is sent; OpenAI's streams report a late error as an event.
        yield openai_api.sse(exc.body())


class _Shape:
    """OpenAI's response objects for chat and text completions."""

    def __init__(self, kind: str, route: gateway.Route, request_id: str) -> None:
        self.kind = kind
        self.model = route.deployment_name
        # Names the model file and the deployment's revision that answered.
        self.fingerprint = f"aibox-{route.sha256[:12]}-r{route.revision}"
        self.created = int(time.time())
        prefix = "chatcmpl" if kind == "chat" else "cmpl"
        self.id = f"{prefix}-{request_id}"
        # Where the next token starts in the completion's text (completions' logprobs).
        self._text_offset = 0

    def _base(self, chunk: bool) -> dict[str, Any]:
        if self.kind == "chat":
            obj = "chat.completion.chunk" if chunk else "chat.completion"
        else:
            obj = "text_completion"
        return {
            "id": self.id,
            "object": obj,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": self.fingerprint,
        }

    def chunk(
        self,
        *,
        text: str = "",
        role: bool = False,
        finish_reason: str | None = None,
        logprobs: list[dict[str, Any]] | None = None,
        tool_calls: list[dict[str, Any]] | None = None,
    ) -> dict[str, Any]:
        if self.kind == "chat":
            delta: dict[str, Any] = {}
            if role:
                delta = {"role": "assistant", "content": ""}
            elif tool_calls:
                delta = {"tool_calls": tool_calls}
            elif text:
                delta = {"content": text}
            choice = {
                "index": 0,
                "delta": delta,
                "logprobs": self._logprobs(logprobs),
                "finish_reason": finish_reason,
            }
        else:
            choice = {
                "index": 0,
                "text": text,
                "logprobs": self._logprobs(logprobs),
                "finish_reason": finish_reason,
            }
        return {**self._base(True), "choices": [choice]}

    def _logprobs(self, entries: list[dict[str, Any]] | None) -> dict[str, Any] | None:
        """Log-probabilities in the endpoint's shape: chat's list of token entries, or the
        legacy completions object of parallel lists."""
        if entries is None:
            return None
        if self.kind == "chat":
            return {"content": entries, "refusal": None}
        offsets = []
        for entry in entries:
            offsets.append(self._text_offset)
            self._text_offset += len(entry["token"])
        return {
            "tokens": [e["token"] for e in entries],
            "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [
                {t["token"]: t["logprob"] for t in e["top_logprobs"]} for e in entries
            ],
            "text_offset": offsets,
        }

    @staticmethod
    def _usage(exchange: Exchange) -> dict[str, Any]:
        return {
            "prompt_tokens": exchange.prompt_tokens,
            "completion_tokens": exchange.completion_tokens,
            "total_tokens": exchange.prompt_tokens + exchange.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": exchange.cached_tokens},
        }

    def usage_chunk(self, exchange: Exchange) -> dict[str, Any]:
        return {**self._base(True), "choices": [], "usage": self._usage(exchange)}

    def whole(self, exchange: Exchange, finish_reason: str) -> dict[str, Any]:
        text = "".join(exchange.output)
        asked = exchange.parsed.top_logprobs is not None
        logprobs = self._logprobs(exchange.logprobs if asked else None)
        if self.kind == "chat":
            message: dict[str, Any] = {"role": "assistant", "content": text}
            if exchange.parsed.tools:
                content, calls = tools.parse_output(text, exchange.parsed.tools)
                message = {"role": "assistant", "content": content}
                if calls:
                    message["tool_calls"] = calls
                    finish_reason = "tool_calls"
            choice = {
                "index": 0,
                "message": message,
                "logprobs": logprobs,
                "finish_reason": finish_reason,
            }
        else:
            choice = {
                "index": 0,
                "text": text,
                "logprobs": logprobs,
                "finish_reason": finish_reason,
            }
        return {**self._base(False), "choices": [choice], "usage": self._usage(exchange)}


async def embedding_response(request: HttpRequest, authorize: Authorize) -> HttpResponse:
    vectors: list[list[float]] = []
    try:
        exchange = await dispatch(authorize, "embedding", request.body)
        async with exchange.accounted():
            events = await exchange.start()
            async for event in events:
                if event["type"] == protocol.EMBEDDING:
                    vectors = event["data"]
                elif event["type"] == protocol.END:
                    exchange.prompt_tokens = event["prompt_tokens"]
                elif event["type"] == protocol.ERROR:
                    raise worker_error(event, "embedding")
    except ApiError as exc:
        return exc.response()
    return JsonResponse(
        {
            "object": "list",
            "data": [
                {
                    "object": "embedding",
                    "index": i,
                    "embedding": openai_api.encode_embedding(vector, exchange.parsed.base64),
                }
                for i, vector in enumerate(vectors)
            ],
            "model": exchange.call.route.deployment_name,
            "usage": {
                "prompt_tokens": exchange.prompt_tokens,
                "total_tokens": exchange.prompt_tokens,
            },
        }
    )
