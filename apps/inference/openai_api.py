"""OpenAI's wire format: parsing request bodies and shaping responses and errors.

Only what AIBox serves is accepted; anything it cannot honour (``n`` > 1, images,
tools) is refused with a 400 that names the parameter, rather than silently ignored.
"""

from __future__ import annotations

import base64
import json
import struct
from dataclasses import dataclass, field
from typing import Any, ClassVar

from django.http import JsonResponse


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


def _messages(data: dict[str, Any]) -> list[dict[str, str]]:
    messages = data.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad_request("'messages' must be a non-empty list.", param="messages")
    parsed = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise bad_request(
                f"messages[{i}] must have a role: one of {', '.join(ROLES)}.",
                param=f"messages[{i}].role",
            )
        parsed.append({"role": ROLES[message["role"]], "content": _content(message, i)})
    return parsed


def _common(data: dict[str, Any], kind: str) -> Generation:
    if data.get("n", 1) != 1:
        raise bad_request("Only n=1 is supported.", param="n")
    for unsupported in ("tools", "functions", "logit_bias"):
        if data.get(unsupported):
            raise bad_request(f"'{unsupported}' is not supported.", param=unsupported)
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
    )


def parse_chat(data: dict[str, Any]) -> Generation:
    generation = _common(data, "chat")
    generation.messages = _messages(data)
    return generation


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
