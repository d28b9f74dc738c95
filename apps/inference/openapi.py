"""How the OpenAPI schema (/api/schema/) describes the OpenAI-compatible endpoint (/v1/).

Its views are plain async Django views that drf-spectacular cannot inspect, so the paths
are written here and merged by a postprocessing hook (SPECTACULAR_SETTINGS). The request
bodies list the fields ``openai_api`` and ``tools`` honour, with their ranges; a field
they do not know is refused (``additionalProperties: false``), as the parser does. Some
rules span fields and are not in the schema: ``top_logprobs`` needs ``logprobs``, a
``tool`` message answers a call of the assistant message before it, a ``tool_choice``
names a function in ``tools``, and ``json_schema.schema`` must be one structured output
can enforce. A request that breaks one is a 400 naming the parameter.

Long because it is data: the schema of every /v1/ operation, field by field.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

from apps.deployments.models import DEPLOYMENT_NAME
from apps.inference import openai_api, tools

Schema = dict[str, Any]


def _ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def _nullable(schema: Schema) -> Schema:
    return {**schema, "nullable": True}


def _integer(low: int, high: int, description: str = "") -> Schema:
    schema: Schema = {"type": "integer", "minimum": low, "maximum": high, "nullable": True}
    return {**schema, "description": description} if description else schema


def _number(low: float, high: float) -> Schema:
    return {"type": "number", "minimum": low, "maximum": high, "nullable": True}


def _object(properties: dict[str, Schema], required: Sequence[str] = (), **extra: Any) -> Schema:
    schema: Schema = {"type": "object", "properties": properties, **extra}
    if required:
        schema["required"] = list(required)
    return schema


FUNCTION_NAME = {"type": "string", "pattern": f"^{tools.NAME.pattern}$"}

# The fields both generation endpoints honour (openai_api.COMMON_FIELDS).
COMMON_PROPERTIES: dict[str, Schema] = {
    "model": {
        "type": "string",
        "minLength": 1,
        "description": "The deployment's name (GET /v1/models lists those the key may use).",
    },
    "stream": {
        "type": "boolean",
        "default": False,
        "description": "Answer as server-sent events (text/event-stream).",
    },
    "stream_options": _nullable(
        _object(
            {"include_usage": {"type": "boolean", "description": "A last chunk with the usage."}}
        )
    ),
    "max_tokens": _integer(1, 1_000_000, "At most the model's context length."),
    "temperature": _number(0, 2),
    "top_p": _number(0, 1),
    "presence_penalty": _number(-2, 2),
    "frequency_penalty": _number(-2, 2),
    "seed": _integer(-(2**63), 2**63 - 1),
    "stop": {
        "oneOf": [
            {"type": "string", "minLength": 1},
            {
                "type": "array",
                "maxItems": 4,
                "items": {"type": "string", "minLength": 1},
            },
        ],
        "description": "Up to 4 sequences that end the answer.",
    },
    "n": {"type": "integer", "minimum": 1, "maximum": 1, "description": "Only 1."},
    "response_format": {
        "oneOf": [
            _object({"type": {"type": "string", "enum": ["text"]}}, ["type"]),
            _object({"type": {"type": "string", "enum": ["json_object"]}}, ["type"]),
            _object(
                {
                    "type": {"type": "string", "enum": ["json_schema"]},
                    "json_schema": _object(
                        {
                            "name": {"type": "string", "pattern": "^[a-zA-Z0-9_-]{1,64}$"},
                            "description": {"type": "string"},
                            "schema": {
                                "type": "object",
                                "description": "The JSON Schema the answer must follow "
                                f"(at most {openai_api.MAX_SCHEMA_BYTES:,} bytes).",
                            },
                            "strict": {"type": "boolean"},
                        },
                        ["name"],
                        additionalProperties=False,
                    ),
                },
                ["type", "json_schema"],
            ),
        ],
        "description": "Structured output: the answer follows the schema.",
    },
    "user": _nullable({"type": "string", "description": "The app's own id of its end user."}),
}

TEXT_PART = _object(
    {"type": {"type": "string", "enum": ["text"]}, "text": {"type": "string"}}, ["type", "text"]
)
TOOL_CALL = _object(
    {
        "id": {"type": "string", "minLength": 1},
        "type": {"type": "string", "enum": ["function"]},
        "function": _object(
            {
                "name": {"type": "string", "minLength": 1},
                "arguments": {"type": "string", "description": "The arguments as JSON."},
            },
            ["name", "arguments"],
        ),
    },
    ["id", "type", "function"],
)
CONTENT = {"oneOf": [{"type": "string"}, {"type": "array", "items": TEXT_PART}]}
# A message of each role; an assistant's content may be null when it makes tool calls.
MESSAGE = {
    "anyOf": [
        _object(
            {
                "role": {
                    "type": "string",
                    "enum": [r for r in openai_api.ROLES if r != "assistant"],
                },
                "content": CONTENT,
                "name": {"type": "string"},
            },
            ["role", "content"],
        ),
        _object(
            {"role": {"type": "string", "enum": ["assistant"]}, "content": CONTENT},
            ["role", "content"],
        ),
        _object(
            {
                "role": {"type": "string", "enum": ["assistant"]},
                "content": _nullable({"type": "string"}),
                "tool_calls": {"type": "array", "minItems": 1, "items": TOOL_CALL},
            },
            ["role", "tool_calls"],
        ),
        _object(
            {
                "role": {"type": "string", "enum": ["tool"]},
                "content": CONTENT,
                "tool_call_id": {
                    "type": "string",
                    "minLength": 1,
                    "description": "The id of a call in the assistant message before it.",
                },
            },
            ["role", "content", "tool_call_id"],
        ),
    ]
}
TOOL = _object(
    {
        "type": {"type": "string", "enum": ["function"]},
        "function": _object(
            {
                "name": FUNCTION_NAME,
                "description": _nullable({"type": "string"}),
                "parameters": _nullable(
                    _object(
                        {"type": {"type": "string", "enum": ["object"]}},
                        description="A JSON Schema of the arguments (an object).",
                    )
                ),
                "strict": _nullable({"type": "boolean"}),
            },
            ["name"],
        ),
    },
    ["type", "function"],
)

CHAT_REQUEST = _object(
    {
        **COMMON_PROPERTIES,
        "messages": {
            "type": "array",
            "minItems": 1,
            "maxItems": openai_api.MAX_MESSAGES,
            "items": MESSAGE,
        },
        "max_completion_tokens": _integer(1, 1_000_000, "As max_tokens, which it overrides."),
        "logprobs": _nullable({"type": "boolean"}),
        "top_logprobs": _integer(
            0, openai_api.MAX_TOP_LOGPROBS["chat"], "Alternatives per token; needs logprobs."
        ),
        "tools": {"type": "array", "maxItems": tools.MAX_TOOLS, "items": TOOL},
        "tool_choice": {
            "oneOf": [
                {"type": "string", "enum": list(tools.CHOICES)},
                _object(
                    {
                        "type": {"type": "string", "enum": ["function"]},
                        "function": _object({"name": FUNCTION_NAME}, ["name"]),
                    },
                    ["type", "function"],
                ),
            ]
        },
        "parallel_tool_calls": _nullable({"type": "boolean"}),
    },
    ["model", "messages"],
    additionalProperties=False,
)
COMPLETION_REQUEST = _object(
    {
        **COMMON_PROPERTIES,
        "prompt": {
            "oneOf": [
                {"type": "string"},
                {"type": "array", "minItems": 1, "maxItems": 1, "items": {"type": "string"}},
            ],
            "description": "One prompt per request.",
        },
        "logprobs": _integer(
            0, openai_api.MAX_TOP_LOGPROBS["completion"], "Alternatives per token (0: none)."
        ),
    },
    ["model", "prompt"],
    additionalProperties=False,
)
EMBEDDING_REQUEST = _object(
    {
        "model": COMMON_PROPERTIES["model"],
        "input": {
            "oneOf": [
                {"type": "string", "minLength": 1},
                {
                    "type": "array",
                    "minItems": 1,
                    "maxItems": 256,
                    "items": {"type": "string", "minLength": 1},
                },
            ]
        },
        "encoding_format": {"type": "string", "enum": ["float", "base64"], "default": "float"},
    },
    ["model", "input"],
)

_STRING = {"type": "string"}
_INTEGER = {"type": "integer"}
TOKEN_LOGPROB = _object(
    {
        "token": _STRING,
        "logprob": {"type": "number"},
        "bytes": {"type": "array", "items": _INTEGER},
    },
    ["token", "logprob"],
)
USAGE = _object(
    {
        "prompt_tokens": _INTEGER,
        "completion_tokens": _INTEGER,
        "total_tokens": _INTEGER,
        "prompt_tokens_details": _object({"cached_tokens": _INTEGER}),
    },
    ["prompt_tokens", "completion_tokens", "total_tokens"],
)
FINISH_REASON = {"type": "string", "enum": ["stop", "length", "tool_calls"]}


def _completion_object(kind: str, choice: dict[str, Schema], chunk: bool = False) -> Schema:
    properties = {
        "id": _STRING,
        "object": {"type": "string", "enum": [kind]},
        "created": _INTEGER,
        "model": _STRING,
        "system_fingerprint": _STRING,
        "choices": {
            "type": "array",
            "items": _object({"index": _INTEGER, **choice}, ["index", *choice]),
        },
    }
    if chunk:
        # Only the last chunk, with stream_options.include_usage, has the usage.
        properties["usage"] = _ref("OpenAIUsage")
        return _object(properties, ["id", "object", "created", "model", "choices"])
    properties["usage"] = _ref("OpenAIUsage")
    return _object(properties, ["id", "object", "created", "model", "choices", "usage"])


CHAT_LOGPROBS = _nullable(
    _object(
        {
            "content": {
                "type": "array",
                "items": _object(
                    {**TOKEN_LOGPROB["properties"], "top_logprobs": {"type": "array"}},
                    ["token", "logprob", "top_logprobs"],
                ),
            },
            "refusal": _nullable(_STRING),
        }
    )
)
COMPLETION_LOGPROBS = _nullable(
    _object(
        {
            "tokens": {"type": "array", "items": _STRING},
            "token_logprobs": {"type": "array", "items": {"type": "number"}},
            "top_logprobs": {"type": "array", "items": {"type": "object"}},
            "text_offset": {"type": "array", "items": _INTEGER},
        }
    )
)
CHAT_COMPLETION = _completion_object(
    "chat.completion",
    {
        "message": _object(
            {
                "role": {"type": "string", "enum": ["assistant"]},
                "content": _nullable(_STRING),
                "tool_calls": {"type": "array", "items": TOOL_CALL},
            },
            ["role", "content"],
        ),
        "logprobs": CHAT_LOGPROBS,
        "finish_reason": FINISH_REASON,
    },
)
CHAT_COMPLETION_CHUNK = _completion_object(
    "chat.completion.chunk",
    {
        "delta": _object(
            {
                "role": {"type": "string", "enum": ["assistant"]},
                "content": _STRING,
                "tool_calls": {"type": "array", "items": {"type": "object"}},
            }
        ),
        "logprobs": CHAT_LOGPROBS,
        "finish_reason": _nullable(FINISH_REASON),
    },
    chunk=True,
)
TEXT_CHOICE = {
    "text": _STRING,
    "logprobs": COMPLETION_LOGPROBS,
    "finish_reason": _nullable(FINISH_REASON),
}
TEXT_COMPLETION = _completion_object("text_completion", TEXT_CHOICE)
TEXT_COMPLETION_CHUNK = _completion_object("text_completion", TEXT_CHOICE, chunk=True)
EMBEDDINGS = _object(
    {
        "object": {"type": "string", "enum": ["list"]},
        "data": {
            "type": "array",
            "items": _object(
                {
                    "object": {"type": "string", "enum": ["embedding"]},
                    "index": _INTEGER,
                    "embedding": {
                        "oneOf": [
                            {"type": "array", "items": {"type": "number"}},
                            {"type": "string", "description": "base64 of float32s"},
                        ]
                    },
                },
                ["object", "index", "embedding"],
            ),
        },
        "model": _STRING,
        "usage": _object(
            {"prompt_tokens": _INTEGER, "total_tokens": _INTEGER},
            ["prompt_tokens", "total_tokens"],
        ),
    },
    ["object", "data", "model", "usage"],
)
MODEL = _object(
    {
        "id": {"type": "string", "description": "The deployment's name."},
        "object": {"type": "string", "enum": ["model"]},
        "created": _INTEGER,
        "owned_by": _STRING,
        "ready": {"type": "boolean", "description": "A replica is ready to answer."},
    },
    ["id", "object", "created", "owned_by", "ready"],
)
MODEL_LIST = _object(
    {
        "object": {"type": "string", "enum": ["list"]},
        "data": {"type": "array", "items": _ref("OpenAIModel")},
    },
    ["object", "data"],
)
ERROR = _object(
    {
        "error": _object(
            {
                "message": _STRING,
                "type": {
                    "type": "string",
                    "description": "invalid_request_error, permission_error, "
                    "rate_limit_error or server_error",
                },
                "param": _nullable({"type": "string", "description": "The field at fault."}),
                "code": _nullable(
                    {"type": "string", "description": "e.g. model_not_found, invalid_api_key"}
                ),
            },
            ["message", "type", "param", "code"],
        )
    },
    ["error"],
)

COMPONENTS = {
    "OpenAIChatCompletionRequest": CHAT_REQUEST,
    "OpenAICompletionRequest": COMPLETION_REQUEST,
    "OpenAIEmbeddingRequest": EMBEDDING_REQUEST,
    "OpenAIChatCompletion": CHAT_COMPLETION,
    "OpenAIChatCompletionChunk": CHAT_COMPLETION_CHUNK,
    "OpenAITextCompletion": TEXT_COMPLETION,
    "OpenAITextCompletionChunk": TEXT_COMPLETION_CHUNK,
    "OpenAIEmbeddings": EMBEDDINGS,
    "OpenAIUsage": USAGE,
    "OpenAIModel": MODEL,
    "OpenAIModelList": MODEL_LIST,
    "OpenAIError": ERROR,
}

ERRORS = {
    "400": "The body is not a JSON object, or a field is malformed or not supported "
    "(`param` names it; an unknown field is `unsupported_parameter`).",
    "401": "No API key, or not a valid one (`invalid_api_key`).",
    "403": "The role or the key may not call the inference API.",
    "404": "No deployment of that name that the key may use (`model_not_found`).",
    "413": "The body is over AIBOX_INFERENCE_MAX_BODY_BYTES (`request_too_large`), or the "
    "prompt cannot fit the model's context (`context_length_exceeded`).",
    "429": "Over the caller's limits or the deployment's queue: `Retry-After` says when to retry.",
    "500": "The worker failed the request.",
    "503": "The model is stopped, not ready, failed to load on demand, or the box lost "
    "its broker: `Retry-After` says when to retry.",
    "504": "The request waited in the deployment's queue past its timeout.",
}
RETRY_AFTER = {"Retry-After": {"schema": {"type": "integer"}, "description": "Seconds."}}


def _errors(*codes: str) -> dict[str, Schema]:
    responses = {}
    for code in codes:
        response: Schema = {
            "description": ERRORS[code],
            "content": {"application/json": {"schema": _ref("OpenAIError")}},
        }
        if code in ("429", "503"):
            response["headers"] = RETRY_AFTER
        responses[code] = response
    return responses


def _operation(
    operation_id: str, summary: str, responses: dict[str, Schema], body: str | None = None
) -> Schema:
    operation: Schema = {
        "operationId": operation_id,
        "summary": summary,
        "tags": ["openai"],
        "security": [{"apiKey": []}],
        "responses": responses,
    }
    if body is not None:
        operation["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": _ref(body)}},
        }
    return operation


def _generation(operation_id: str, summary: str, body: str, answer: str, chunk: str) -> Schema:
    ok = {
        "description": f"The answer; with `stream: true`, server-sent events: each `data:` "
        f"line holds an {chunk} (chat: the first carries the role), a late error an "
        f"OpenAIError, and the last `[DONE]`. `x-ratelimit-*` headers when the caller has "
        f"limits.",
        "content": {
            "application/json": {"schema": _ref(answer)},
            "text/event-stream": {"schema": {"type": "string"}},
        },
    }
    codes = ("400", "401", "403", "404", "413", "429", "500", "503", "504")
    return {"post": _operation(operation_id, summary, {"200": ok, **_errors(*codes)}, body)}


MODEL_NAME = {
    "name": "name",
    "in": "path",
    "required": True,
    "description": "The deployment's name.",
    "schema": {"type": "string", "pattern": DEPLOYMENT_NAME.regex.pattern},
}

PATHS = {
    "/v1/chat/completions": _generation(
        "openai_chat_completions_create",
        "A chat completion (OpenAI's Chat Completions API)",
        "OpenAIChatCompletionRequest",
        "OpenAIChatCompletion",
        "OpenAIChatCompletionChunk",
    ),
    "/v1/completions": _generation(
        "openai_completions_create",
        "A text completion (OpenAI's legacy Completions API)",
        "OpenAICompletionRequest",
        "OpenAITextCompletion",
        "OpenAITextCompletionChunk",
    ),
    "/v1/embeddings": {
        "post": _operation(
            "openai_embeddings_create",
            "Embeddings of the input, from a deployment that serves them",
            {
                "200": {
                    "description": "One embedding per input, in order.",
                    "content": {"application/json": {"schema": _ref("OpenAIEmbeddings")}},
                },
                **_errors("400", "401", "403", "404", "413", "429", "500", "503", "504"),
            },
            "OpenAIEmbeddingRequest",
        )
    },
    "/v1/models": {
        "get": _operation(
            "openai_models_list",
            "The running deployments the key may use",
            {
                "200": {
                    "description": "The models.",
                    "content": {"application/json": {"schema": _ref("OpenAIModelList")}},
                },
                **_errors("401", "403"),
            },
        )
    },
    "/v1/models/{name}": {
        "get": {
            **_operation(
                "openai_models_retrieve",
                "One running deployment the key may use",
                {
                    "200": {
                        "description": "The model.",
                        "content": {"application/json": {"schema": _ref("OpenAIModel")}},
                    },
                    **_errors("401", "403", "404"),
                },
            ),
            "parameters": [MODEL_NAME],
        }
    },
}


def openai_paths(result: Schema, generator: Any, request: Any, public: bool) -> Schema:
    """drf-spectacular postprocessing hook: add the /v1/ paths and their components."""
    result.setdefault("components", {}).setdefault("schemas", {}).update(copy.deepcopy(COMPONENTS))
    result.setdefault("paths", {}).update(copy.deepcopy(PATHS))
    result.setdefault("tags", [])
    result["tags"].append(
        {
            "name": "openai",
            "description": "The OpenAI-compatible endpoint: an API key with the `inference` "
            "scope, errors in OpenAI's shape. docs/api.md lists what it serves.",
        }
    )
    return result
