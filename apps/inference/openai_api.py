"""OpenAI's wire format: parsing request bodies and shaping responses and errors.

Only what AIBox serves is accepted; anything it cannot honour (``n`` > 1, images, a
field it does not know) is refused with a 400 that names the parameter, rather than
silently ignored: an app that relies on a field must not get a 200 without its effect.

Over 400 lines on purpose: one parser per endpoint, each next to the checks it shares
with the others.
"""

from __future__ import annotations

import base64
import json
import struct
from dataclasses import dataclass, field
from typing import Any, ClassVar

from django.http import JsonResponse

from workers.inference import json_schema


class ApiError(Exception):
    """An error to send in OpenAI's shape: ``{"error": {message, type, param, code}}``."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self) -> JsonResponse:
        response = JsonResponse(self.body(), status=self.status)
        for name, value in self.headers.items():
            response[name] = value
        return response


def bad_request(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


@dataclass
class Generation:
    """A parsed chat or completion request (the knobs AIBox honours)."""

    model: str
    kind: str  # "chat" or "completion"
    messages: list[dict[str, str]] = field(default_factory=list)
    prompt: str = ""
    stream: bool = False
    include_usage: bool = False
    max_tokens: int | None = None
    sampling: dict[str, float] = field(default_factory=dict)
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    # Structured output: the JSON schema the answer must follow (None: free text).
    json_schema: dict[str, Any] | None = None
    # Log-probabilities: None (not asked), else how many alternatives per token.
    top_logprobs: int | None = None
    # The request's raw messages (chat), for tool calls (``tools.convert_messages``).
    raw_messages: list[Any] = field(default_factory=list)
    # The request's tools (``tools.ToolRequest``), None without any.
    tools: Any = None

    @property
    def logged_input(self) -> list[dict[str, str]] | str:
        """What a usage record may log of the input (as the deployment's level says)."""
        return self.messages if self.kind == "chat" else self.prompt


@dataclass
class Embedding:
    model: str
    inputs: list[str]
    base64: bool
    kind: ClassVar[str] = "embedding"
    stream: ClassVar[bool] = False

    @property
    def logged_input(self) -> list[str]:
        return self.inputs


def parse_json(body: bytes) -> dict[str, Any]:
    try:
        data = json.loads(body or b"")
    except (ValueError, UnicodeDecodeError) as exc:
        raise bad_request(f"The request body is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise bad_request("The request body must be a JSON object.")
    return data


def _model(data: dict[str, Any]) -> str:
    model = data.get("model")
    if not isinstance(model, str) or not model:
        raise bad_request("You must provide a model parameter.", param="model")
    return model


def _number(data: dict[str, Any], name: str, low: float, high: float) -> float | None:
    value = data.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise bad_request(f"'{name}' must be a number from {low} to {high}.", param=name)
    return float(value)


def _integer(data: dict[str, Any], name: str, low: int, high: int) -> int | None:
    value = data.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise bad_request(f"'{name}' must be an integer from {low} to {high}.", param=name)
    return value


def _stop(data: dict[str, Any]) -> list[str]:
    stop = data.get("stop")
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    if (
        not isinstance(stop, list)
        or len(stop) > 4
        or not all(isinstance(s, str) and s for s in stop)
    ):
        raise bad_request("'stop' must be a string or a list of up to 4 strings.", param="stop")
    return stop


def _content(message: dict[str, Any], index: int) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text":
                raise bad_request(
                    "Only text content parts are supported.", param=f"messages[{index}].content"
                )
            texts.append(str(part.get("text", "")))
        return "".join(texts)
    raise bad_request("Each message needs a 'content' string.", param=f"messages[{index}].content")


ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


# The fields each endpoint honours; any other is refused by name.
COMMON_FIELDS = {
    "model",
    "stream",
    "stream_options",
    "max_tokens",
    "temperature",
    "top_p",
    "presence_penalty",
    "frequency_penalty",
    "seed",
    "stop",
    "n",
    "response_format",
    "logprobs",
    # An end-user id for the app's own abuse tracking; it changes no output.
    "user",
}
CHAT_FIELDS = COMMON_FIELDS | {
    "messages",
    "max_completion_tokens",
    "top_logprobs",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
}
COMPLETION_FIELDS = COMMON_FIELDS | {"prompt"}
# Fields OpenAI has that AIBox knows and does not serve, with why.
UNSUPPORTED = {
    "functions": "the legacy 'functions' are not supported; use 'tools'",
    "function_call": "the legacy 'function_call' is not supported; use 'tool_choice'",
    "logit_bias": "'logit_bias' is not supported",
    "echo": "'echo' is not supported",
    "suffix": "'suffix' (insertion) is not supported",
    "best_of": "'best_of' is not supported",
    "modalities": "only text output is supported",
    "audio": "audio output is not supported",
    "prediction": "predicted outputs are not supported",
    "reasoning_effort": "'reasoning_effort' is not supported",
    "web_search_options": "web search is not supported",
    "store": "AIBox does not store completions for later retrieval ('store')",
    "metadata": "'metadata' is for stored completions, which AIBox does not keep",
    "service_tier": "'service_tier' is not supported",
}
MAX_MESSAGES = 2048
MAX_SCHEMA_BYTES = 64 * 1024
# OpenAI's limits on alternatives per token: 20 in chat, 5 in completions.
MAX_TOP_LOGPROBS = {"chat": 20, "completion": 5}


def _known_fields(data: dict[str, Any], kind: str) -> None:
    allowed = CHAT_FIELDS if kind == "chat" else COMPLETION_FIELDS
    for name in data:
        if name in allowed:
            continue
        reason = UNSUPPORTED.get(name)
        if reason is None:
            endpoint = "/v1/chat/completions" if kind == "chat" else "/v1/completions"
            reason = f"Unrecognized request argument supplied: {name} (not supported by {endpoint})"
        else:
            reason = reason[0].upper() + reason[1:] + "."
        raise bad_request(reason, param=name, code="unsupported_parameter")


def _response_format(data: dict[str, Any]) -> dict[str, Any] | None:
    """The JSON schema the answer must follow, from ``response_format`` (None: text)."""
    fmt = data.get("response_format")
    if fmt is None:
        return None
    if not isinstance(fmt, dict) or fmt.get("type") not in ("text", "json_object", "json_schema"):
        raise bad_request(
            "'response_format' must be an object whose 'type' is 'text', 'json_object' or "
            "'json_schema'.",
            param="response_format",
        )
    if fmt["type"] == "text":
        return None
    if fmt["type"] == "json_object":
        return {"type": "object"}
    spec = fmt.get("json_schema")
    param = "response_format.json_schema"
    if not isinstance(spec, dict):
        raise bad_request("'json_schema' must be an object with 'name' and 'schema'.", param=param)
    unknown = spec.keys() - {"name", "schema", "strict", "description"}
    if unknown:
        raise bad_request(f"Unrecognized field in json_schema: {sorted(unknown)[0]}.", param=param)
    name = spec.get("name")
    if (
        not isinstance(name, str)
        or not name
        or len(name) > 64
        or not all(c.isascii() and (c.isalnum() or c in "_-") for c in name)
    ):
        raise bad_request(
            "'json_schema.name' must be 1-64 letters, digits, '_' or '-'.", param=f"{param}.name"
        )
    if not isinstance(spec.get("strict", False), bool):
        raise bad_request("'json_schema.strict' must be true or false.", param=f"{param}.strict")
    schema = spec.get("schema", {})
    if not isinstance(schema, dict):
        raise bad_request("'json_schema.schema' must be an object.", param=f"{param}.schema")
    if len(json.dumps(schema)) > MAX_SCHEMA_BYTES:
        raise bad_request(
            f"'json_schema.schema' is larger than {MAX_SCHEMA_BYTES:,} bytes.",
            param=f"{param}.schema",
        )
    return checked_schema(schema, f"{param}.schema")


def checked_schema(schema: dict[str, Any], param: str) -> dict[str, Any]:
    """``schema``, if structured output can enforce all of it; else a 400 naming the part."""
    try:
        json_schema.check(schema)
    except json_schema.UnsupportedSchema as exc:
        raise bad_request(
            f"Invalid schema for structured output: {exc}.",
            param=param,
            code="unsupported_schema",
        ) from exc
    return schema


def _logprobs(data: dict[str, Any], kind: str) -> int | None:
    """How many alternatives per token to return (None: no log-probabilities)."""
    most = MAX_TOP_LOGPROBS[kind]
    if kind == "completion":
        # Completions take one integer: the number of alternatives (0: the chosen only).
        return _integer(data, "logprobs", 0, most)
    wanted = data.get("logprobs")
    if wanted is not None and not isinstance(wanted, bool):
        raise bad_request("'logprobs' must be true or false.", param="logprobs")
    top = _integer(data, "top_logprobs", 0, most)
    if top is not None and not wanted:
        raise bad_request("'top_logprobs' needs 'logprobs' set to true.", param="top_logprobs")
    return (top or 0) if wanted else None


def _common(data: dict[str, Any], kind: str) -> Generation:
    _known_fields(data, kind)
    if data.get("n", 1) != 1:
        raise bad_request("Only n=1 is supported.", param="n")
    user = data.get("user")
    if user is not None and not isinstance(user, str):
        raise bad_request("'user' must be a string.", param="user")
    stream = data.get("stream", False)
    if not isinstance(stream, bool):
        raise bad_request("'stream' must be true or false.", param="stream")
    options = data.get("stream_options") or {}
    if not isinstance(options, dict):
        raise bad_request("'stream_options' must be an object.", param="stream_options")
    max_tokens = _integer(data, "max_completion_tokens", 1, 1_000_000)
    if max_tokens is None:
        max_tokens = _integer(data, "max_tokens", 1, 1_000_000)
    sampling = {
        name: value
        for name, value in (
            ("temperature", _number(data, "temperature", 0, 2)),
            ("top_p", _number(data, "top_p", 0, 1)),
            ("presence_penalty", _number(data, "presence_penalty", -2, 2)),
            ("frequency_penalty", _number(data, "frequency_penalty", -2, 2)),
        )
        if value is not None
    }
    return Generation(
        model=_model(data),
        kind=kind,
        stream=stream,
        include_usage=bool(options.get("include_usage")),
        max_tokens=max_tokens,
        sampling=sampling,
        seed=_integer(data, "seed", -(2**63), 2**63 - 1),
        stop=_stop(data),
        json_schema=_response_format(data),
        top_logprobs=_logprobs(data, kind),
    )


def parse_chat(data: dict[str, Any]) -> Generation:
    """A chat request. Messages with tool calls or tool results are converted by the
    caller (``tools.convert_messages``), which knows the request's tools."""
    generation = _common(data, "chat")
    messages = data.get("messages")
    if isinstance(messages, list) and len(messages) > MAX_MESSAGES:
        raise bad_request(
            f"'messages' holds {len(messages)} messages; at most {MAX_MESSAGES} are accepted.",
            param="messages",
        )
    generation.raw_messages = messages if isinstance(messages, list) else []
    return generation


def check_size(generation: Generation, *, context_length: int) -> None:
    """Refuse, before any worker sees it, a request that cannot fit the model's context.

    ``max_tokens`` beyond the context is a 400. A prompt is tokenised on the worker; one
    with more bytes than ``MAX_PROMPT_BYTES_PER_TOKEN`` per token of context cannot fit
    with any real text (English averages about 4 bytes a token), and reading it would
    cost the worker seconds, so it is refused here with a 413.
    """
    if generation.max_tokens is not None and generation.max_tokens > context_length:
        raise bad_request(
            f"max_tokens is too large: {generation.max_tokens}. This model supports at most "
            f"{context_length} completion tokens (its context length).",
            param="max_completion_tokens" if generation.kind == "chat" else "max_tokens",
        )
    size = (
        sum(len(m["content"].encode("utf-8")) for m in generation.messages)
        if generation.kind == "chat"
        else len(generation.prompt.encode("utf-8"))
    )
    most = context_length * MAX_PROMPT_BYTES_PER_TOKEN
    if size > most:
        what = "messages" if generation.kind == "chat" else "prompt"
        raise ApiError(
            413,
            f"The {what} {'are' if what == 'messages' else 'is'} {size:,} bytes; this model's "
            f"context of {context_length} tokens "
            f"takes at most {most:,} bytes ({MAX_PROMPT_BYTES_PER_TOKEN} a token). Please "
            f"reduce the length of the {what}.",
            param=what,
            code="context_length_exceeded",
        )


# More bytes per token than any tokenizer's text averages (about 4 for English, at most
# a dozen or so for scripts with long characters).
MAX_PROMPT_BYTES_PER_TOKEN = 32


def parse_completion(data: dict[str, Any]) -> Generation:
    generation = _common(data, "completion")
    prompt = data.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise bad_request("'prompt' must be a string (one prompt per request).", param="prompt")
    generation.prompt = prompt
    if generation.max_tokens is None:
        generation.max_tokens = 16  # OpenAI's default for completions
    return generation


def parse_embedding(data: dict[str, Any]) -> Embedding:
    inputs = data.get("input")
    if isinstance(inputs, str):
        inputs = [inputs]
    if (
        not isinstance(inputs, list)
        or not inputs
        or len(inputs) > 256
        or not all(isinstance(s, str) and s for s in inputs)
    ):
        raise bad_request(
            "'input' must be a non-empty string or a list of up to 256 non-empty strings.",
            param="input",
        )
    encoding = data.get("encoding_format", "float")
    if encoding not in ("float", "base64"):
        raise bad_request("'encoding_format' must be 'float' or 'base64'.", param="encoding_format")
    return Embedding(model=_model(data), inputs=inputs, base64=encoding == "base64")


def encode_embedding(vector: list[float], as_base64: bool) -> list[float] | str:
    if not as_base64:
        return vector
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")


def sse(data: dict[str, Any] | str) -> bytes:
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {payload}\n\n".encode()
