"""One inference request's life, from the key to its usage record.

``exchange_open`` authenticates, parses, routes, admits and hands the request to its
worker, all in one thread switch; the ``Exchange`` it returns follows the worker's events
and, whatever happens to the view, releases the request and writes its usage record.
``views.py`` holds the HTTP side, ``responses.py`` OpenAI's response objects.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from asgiref.sync import sync_to_async
from django import db
from django.http import HttpRequest
from kombu.exceptions import OperationalError as KombuOperationalError
from redis.exceptions import RedisError

from aibox.redis_clients import async_client, sync_client
from apps.accounts.services import ApiKeyRejected, api_key_authenticate
from apps.deployments.placement import worker_task_send
from apps.inference import gateway, openai_api, services, tools
from apps.inference.gateway import Call, Caller
from apps.inference.limits import Admission, Limits, limits_admit, limits_for, limits_release
from apps.inference.models import Outcome
from apps.inference.openai_api import ApiError
from workers.inference import protocol

WORKER_ERRORS = {
    protocol.CONTEXT_LENGTH_EXCEEDED: (400, "invalid_request_error"),
    protocol.INVALID_REQUEST: (400, "invalid_request_error"),
    protocol.QUEUE_FULL: (429, "rate_limit_error"),
    protocol.QUEUE_TIMEOUT: (504, "server_error"),
    protocol.REPLICA_UNAVAILABLE: (503, "server_error"),
    protocol.INTERNAL: (500, "server_error"),
}


def worker_error(event: dict[str, Any], kind: str) -> ApiError:
    status, error_type = WORKER_ERRORS.get(event["code"], (500, "server_error"))
    param = None
    if event["code"] == protocol.CONTEXT_LENGTH_EXCEEDED:
        param = {"chat": "messages", "completion": "prompt", "embedding": "input"}[kind]
    headers = {"Retry-After": "2"} if status == 429 else None
    return ApiError(
        status, event["message"], type=error_type, code=event["code"], param=param, headers=headers
    )


def _outcome(status: int) -> str:
    if status < 400:
        return Outcome.OK
    if status == 429:
        return Outcome.REJECTED
    if status == 504:
        return Outcome.TIMEOUT
    if status == 503:
        return Outcome.UNAVAILABLE
    return Outcome.CLIENT_ERROR if status < 500 else Outcome.ERROR


# Who is calling: a sync callable, run on the thread that does the request's other
# database work (one thread switch per request, see ``_open``).
Authorize = Callable[[], Caller]


def bearer(request: HttpRequest) -> Authorize:
    """The request's API key, to be checked on the thread (a missing one is a 401 now)."""
    header = request.headers.get("Authorization", "")
    scheme, _, raw_key = header.partition(" ")
    if scheme.lower() != "bearer" or not raw_key.strip():
        raise ApiError(
            401,
            "You didn't provide an API key. Send it as 'Authorization: Bearer <key>'.",
            code="invalid_api_key",
        )
    return functools.partial(_key_caller, raw_key.strip())


def _key_caller(raw_key: str) -> Caller:
    try:
        key = api_key_authenticate(raw_key=raw_key)
    except ApiKeyRejected as exc:
        raise ApiError(401, str(exc), code="invalid_api_key") from exc
    return Caller(user=key.user, api_key=key)


def session_caller(request: HttpRequest) -> Caller:
    if not request.user.is_authenticated:
        raise ApiError(401, "Sign in to use the playground.", code="not_signed_in")
    return Caller(user=request.user)


def _write_usage_record(**fields: Any) -> None:
    """Write a usage record in a thread of its own and hand its connection back.

    The request may be over when it runs (see ``Exchange.finish``), so Django's
    end-of-request cleanup will not return this thread's connection to the pool.
    """
    try:
        services.usage_record(**fields)
    finally:
        db.connection.close()


# Usage records being written: referenced here so that a cancelled view's task does not
# take the writing task with it.
_unfinished: set[asyncio.Future] = set()


class Exchange:
    """One request: the call to a worker plus what its usage record needs."""

    def __init__(
        self,
        caller: Caller,
        route: gateway.Route,
        parsed: openai_api.Generation | openai_api.Embedding,
    ) -> None:
        self.caller = caller
        self.call = Call(route=route, kind=parsed.kind)
        self.parsed = parsed
        self.stream = parsed.stream
        self.prompt_tokens = 0
        self.cached_tokens = 0
        self.completion_tokens = 0
        self.queue_ms: float | None = None
        self.ttft_ms: float | None = None
        self.status = 200
        self.error = ""
        self.outcome = ""
        self.prompt_log = parsed.logged_input
        self.output: list[str] = []
        self.logprobs: list[dict[str, Any]] = []
        self.refused: ApiError | None = None  # admission said no: answer and record that
        # The caller's limits, and their admission (None: not admitted, nothing to release).
        self.limits: Limits | None = None
        self.admission: Admission | None = None
        self._finishing: asyncio.Future | None = None

    async def start(self) -> AsyncIterator[dict[str, Any]]:
        """The worker's events, once it has started the request (``dispatch`` sent it)."""
        if self.refused is not None:
            raise self.refused
        events = self.call.events()
        first = await anext(events)
        if first["type"] == protocol.ERROR:
            raise worker_error(first, self.call.kind)
        self.prompt_tokens = first.get("prompt_tokens", 0)
        self.cached_tokens = first.get("cached_tokens", 0)
        self.queue_ms = first.get("queue_ms")
        return events

    def on_delta(self, event: dict[str, Any]) -> None:
        if self.ttft_ms is None:
            self.ttft_ms = (time.perf_counter() - self.call.started) * 1000
        self.output.append(event["text"])
        self.logprobs += event.get("logprobs", ())
        # Tokens delivered so far: what the record says if the end event never comes.
        self.completion_tokens = event.get("tokens", self.completion_tokens)

    def fail(self, exc: ApiError) -> None:
        self.status, self.error = exc.status, exc.message

    @contextlib.asynccontextmanager
    async def accounted(self, *, keep_open: bool = False) -> AsyncIterator[None]:
        """Finish the request when the block ends: with the ApiError that ended it (which
        goes on to the caller), as cancelled when the client went away, or as served.
        With ``keep_open`` a block that ends well leaves it open, for a stream that goes
        on after the block."""
        cancelled = ended_well = False
        try:
            yield
            ended_well = True
        except ApiError as exc:
            self.fail(exc)
            raise
        except (asyncio.CancelledError, GeneratorExit):
            cancelled = True
            raise
        finally:
            if not (ended_well and keep_open):
                await self.finish(cancelled=cancelled)

    async def finish(self, *, cancelled: bool = False) -> None:
        """Release the call and write the usage record, once, even if the view is cancelled.

        A client that leaves (or closes the stream the moment it reads ``[DONE]``, as the
        openai package does) cancels the view's task; the record is written to the end
        regardless, in a task of its own that the cancellation does not reach.
        """
        await asyncio.shield(self.finish_soon(cancelled=cancelled))

    def finish_soon(self, *, cancelled: bool = False) -> asyncio.Future:
        """Start finishing without waiting (``finish`` waits for the same task)."""
        if self._finishing is None:
            self._finishing = asyncio.ensure_future(self._finish(cancelled))
            _unfinished.add(self._finishing)
            self._finishing.add_done_callback(_unfinished.discard)
        return self._finishing

    @property
    def headers(self) -> dict[str, str]:
        """Rate-limit headers for the response (OpenAI's ``x-ratelimit-*``)."""
        return self.admission.headers if self.admission is not None else {}

    async def _finish(self, cancelled: bool) -> None:
        await self.call.close()
        if self.admission is not None:
            await limits_release(
                redis=async_client(),
                limits=self.limits,
                request_id=self.call.request_id,
                tokens=self.prompt_tokens + self.completion_tokens,
            )
        outcome = Outcome.CANCELLED if cancelled else _outcome(self.status)
        await sync_to_async(_write_usage_record, thread_sensitive=False)(
            caller=self.caller,
            route=self.call.route,
            request_id=self.call.request_id,
            endpoint=self.call.kind,
            stream=self.stream,
            prompt_tokens=self.prompt_tokens,
            cached_tokens=self.cached_tokens,
            completion_tokens=self.completion_tokens,
            queue_ms=self.queue_ms,
            ttft_ms=self.ttft_ms,
            latency_ms=(time.perf_counter() - self.call.started) * 1000,
            outcome=outcome,
            status_code=499 if cancelled else self.status,
            error=self.error,
            prompt=self.prompt_log,
            output="".join(self.output),
        )


def parse_request(
    kind: str, body: bytes
) -> tuple[openai_api.Generation | openai_api.Embedding, dict[str, Any]]:
    """The request body, checked, and the fields of the worker's request spec."""
    data = openai_api.parse_json(body)
    if kind == "embedding":
        parsed = openai_api.parse_embedding(data)
        return parsed, {"inputs": parsed.inputs}
    if kind == "chat":
        parsed = openai_api.parse_chat(data)
        parsed.tools = tools.parse_tools(data)
        parsed.messages = tools.convert_messages(parsed.raw_messages, parsed.tools)
        call_schema = tools.call_schema(parsed.tools) if parsed.tools else None
        if call_schema is not None:
            if parsed.json_schema is not None:
                raise openai_api.bad_request(
                    "A required tool call and a 'response_format' schema cannot both hold "
                    "the answer; drop one.",
                    param="response_format",
                )
            parsed.json_schema = openai_api.checked_schema(call_schema, "tools")
    else:
        parsed = openai_api.parse_completion(data)
    fields = {
        "messages": parsed.messages,
        "prompt": parsed.prompt,
        "max_tokens": parsed.max_tokens,
        "seed": parsed.seed,
        "stop": parsed.stop,
        "json_schema": parsed.json_schema,
        "top_logprobs": parsed.top_logprobs,
        **parsed.sampling,
    }
    return parsed, fields


def exchange_open(authorize: Authorize, kind: str, body: bytes) -> Exchange:
    """Authenticate, parse, route, admit and hand the request to its worker.

    The database, Redis and Celery are sync: all of it runs in one thread switch (on a
    small box each switch costs a request about a millisecond). The key is checked
    before the body, so a bad key is a 401 whatever the body. An error before routing
    is done raises (no deployment was reached, nothing to record); a refused admission
    is kept on the exchange, which records it. A generation's sampling settings fall
    back to the deployment's preset.
    """
    caller = authorize()
    parsed, fields = parse_request(kind, body)
    try:
        route = gateway.route(caller, parsed.model)
    except gateway.LoadFailed as exc:
        # It waited for its deployment to load: recorded with the wait, like a refusal.
        exchange = Exchange(caller, exc.route, parsed)
        exchange.refused = exc
        return exchange
    if kind == "embedding":
        if not route.embeddings:
            raise openai_api.bad_request(
                f"The model '{parsed.model}' does not serve embeddings.", param="model"
            )
    else:
        openai_api.check_size(parsed, context_length=route.context_length)
        fields = {**route.sampling, **fields}
    exchange = Exchange(caller, route, parsed)
    try:
        # The caller's own limits first, then the deployment's queue: a key over its rate
        # must not take a place in the queue. Both are released when the exchange ends.
        exchange.limits = limits_for(user=caller.user, api_key=caller.api_key)
        exchange.admission = limits_admit(
            redis=sync_client(), limits=exchange.limits, request_id=exchange.call.request_id
        )
        exchange.call.admit()
        worker_task_send(
            protocol.INFERENCE_SUBMIT,
            exchange.call.route.worker,
            exchange.call.spec(**fields).as_dict(),
        )
    except ApiError as exc:
        exchange.refused = exc
    except (RedisError, KombuOperationalError):
        exchange.refused = gateway.broker_unavailable()
    return exchange


async def dispatch(*open_args: Any) -> Exchange:
    """``exchange_open(*open_args)`` on a thread; a client that leaves meanwhile still gets its
    request cancelled and its admission released once the thread is done."""
    opening = asyncio.ensure_future(sync_to_async(exchange_open)(*open_args))
    try:
        return await asyncio.shield(opening)
    except asyncio.CancelledError:
        opening.add_done_callback(_abandon)
        raise


def _abandon(opening: asyncio.Future) -> None:
    if not opening.cancelled() and opening.exception() is None:
        opening.result().finish_soon(cancelled=True)
