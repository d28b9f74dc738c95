"""What apps expect from /v1/, through the whole stack with the official ``openai`` client:
structured output, tool calls, log-probabilities, refused fields, prompt caching,
per-key limits and size caps.
"""

from __future__ import annotations

import json
import statistics
import threading
import time
import uuid

import httpx
import jsonschema
import openai
import pytest

from aibox.redis_clients import sync_client
from apps.accounts.models import Role, Scope
from apps.accounts.services import api_key_create, limit_set
from apps.inference.models import UsageRecord
from tests.conftest import make_user

MODEL = "gemma-apps"
GREEDY = {"temperature": 0}


@pytest.fixture(scope="module")
def apps(stack):
    stack.deploy(MODEL, context_length=2048, parallel_slots=2, queue_size=8, stream_interval_ms=0)
    return stack


@pytest.fixture
def client(apps):
    return openai.OpenAI(base_url=f"{apps.url}/v1", api_key=apps.key(), max_retries=0, timeout=120)


def _ask(client, content: str, *, stream: bool = False, **extra):
    messages = [{"role": "user", "content": content}]
    if not stream:
        return client.chat.completions.create(model=MODEL, messages=messages, **GREEDY, **extra)
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=messages,
            stream=True,
            stream_options={"include_usage": True},
            **GREEDY,
            **extra,
        )
    )
    return chunks


def _streamed_text(chunks) -> tuple[str, str | None]:
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = next(
        (c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason),
        None,
    )
    return text, finish


# -- structured output -----------------------------------------------------------

SCHEMAS = [
    {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 20}},
        "required": ["name"],
    },
    {
        "type": "object",
        "properties": {"age": {"type": "integer", "minimum": 0, "maximum": 120}},
        "required": ["age"],
    },
    {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]},
    {
        "type": "object",
        "properties": {"colour": {"enum": ["red", "green", "blue"]}},
        "required": ["colour"],
    },
    {
        "type": "object",
        "properties": {"score": {"type": "number", "minimum": 0, "maximum": 1}},
        "required": ["score"],
    },
    {
        "type": "object",
        "properties": {
            "tags": {
                "type": "array",
                "items": {"type": "string", "maxLength": 12},
                "minItems": 1,
                "maxItems": 3,
            }
        },
        "required": ["tags"],
    },
    {
        "type": "object",
        "properties": {
            "person": {
                "type": "object",
                "properties": {
                    "first": {"type": "string", "maxLength": 16},
                    "last": {"type": "string", "maxLength": 16},
                },
                "required": ["first", "last"],
            }
        },
        "required": ["person"],
    },
    {
        "type": "array",
        "items": {"type": "integer", "minimum": -10, "maximum": 10},
        "minItems": 2,
        "maxItems": 5,
    },
    {
        "type": "object",
        "properties": {
            "city": {"type": "string", "maxLength": 20},
            "population": {"type": "integer", "minimum": 1000, "maximum": 40000000},
        },
        "required": ["city", "population"],
    },
    {
        "type": "object",
        "properties": {
            "when": {"type": "string", "format": "date"},
            "where": {"type": "string", "maxLength": 20},
        },
        "required": ["when", "where"],
    },
    {
        "type": "object",
        "properties": {"id": {"type": "string", "format": "uuid"}},
        "required": ["id"],
    },
    {
        "type": "object",
        "properties": {
            "status": {"const": "done"},
            "count": {"type": "integer", "exclusiveMinimum": 0, "exclusiveMaximum": 10},
        },
        "required": ["status", "count"],
    },
    {
        "type": "object",
        "properties": {
            "items": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{3}$"},
                        "qty": {"type": "integer", "minimum": 1, "maximum": 9},
                    },
                    "required": ["sku", "qty"],
                },
                "minItems": 1,
                "maxItems": 3,
            }
        },
        "required": ["items"],
    },
    {
        "type": "object",
        "properties": {
            "answer": {
                "anyOf": [{"type": "integer", "minimum": 0, "maximum": 100}, {"type": "null"}]
            }
        },
        "required": ["answer"],
    },
    {
        "type": "object",
        "properties": {
            "kind": {"enum": ["cat", "dog"]},
            "legs": {"type": "integer", "minimum": 0, "maximum": 4},
            "name": {"type": "string", "maxLength": 12},
        },
        "required": ["kind", "legs"],
        "additionalProperties": False,
    },
    {
        "$defs": {
            "point": {
                "type": "object",
                "properties": {
                    "x": {"type": "integer", "minimum": -9, "maximum": 9},
                    "y": {"type": "integer", "minimum": -9, "maximum": 9},
                },
                "required": ["x", "y"],
            }
        },
        "type": "object",
        "properties": {"from": {"$ref": "#/$defs/point"}, "to": {"$ref": "#/$defs/point"}},
        "required": ["from", "to"],
    },
    {
        "type": "object",
        "properties": {
            "rating": {"type": "integer", "minimum": 1, "maximum": 5},
            "comment": {"type": "string", "maxLength": 30},
        },
        "required": ["rating", "comment"],
    },
    {
        "type": "object",
        "properties": {
            "temperature": {"type": "integer", "minimum": -40, "maximum": 50},
            "unit": {"enum": ["C", "F"]},
        },
        "required": ["temperature", "unit"],
    },
    {
        "type": "object",
        "properties": {
            "matrix": {
                "type": "array",
                "items": {
                    "type": "array",
                    "items": {"type": "integer", "minimum": 0, "maximum": 9},
                    "minItems": 2,
                    "maxItems": 2,
                },
                "minItems": 2,
                "maxItems": 2,
            }
        },
        "required": ["matrix"],
    },
    {
        "type": "object",
        "properties": {
            "price": {"type": "number", "minimum": 0, "maximum": 1000},
            "currency": {"enum": ["EUR", "USD"]},
            "in_stock": {"type": "boolean"},
        },
        "required": ["price", "currency", "in_stock"],
    },
]


def _format(schema: dict, i: int) -> dict:
    return {
        "type": "json_schema",
        "json_schema": {"name": f"schema_{i}", "schema": schema, "strict": True},
    }


def test_json_mode_answers_with_a_json_object(client):
    answer = _ask(
        client, "Describe a cat in JSON.", response_format={"type": "json_object"}, max_tokens=400
    )
    content = answer.choices[0].message.content
    assert answer.choices[0].finish_reason == "stop" and isinstance(json.loads(content), dict)
    # Streamed, the same request gives the same object, chunk by chunk. (Another prompt
    # may run past max_tokens: how long the small model's object grows depends on the
    # CPU's rounding, since llama.cpp is built for the machine it runs on.)
    text, finish = _streamed_text(
        _ask(
            client,
            "Describe a cat in JSON.",
            stream=True,
            response_format={"type": "json_object"},
            max_tokens=400,
        )
    )
    assert finish == "stop" and text == content


def test_twenty_json_schemas_give_output_that_validates(client):
    """Every schema's answer parses and validates; every other one is streamed."""
    assert len(SCHEMAS) == 20
    for i, schema in enumerate(SCHEMAS):
        stream = i % 2 == 1
        answer = _ask(
            client,
            "Fill in this JSON with plausible values.",
            stream=stream,
            response_format=_format(schema, i),
            max_tokens=300,
        )
        if stream:
            text, finish = _streamed_text(answer)
        else:
            text, finish = answer.choices[0].message.content, answer.choices[0].finish_reason
        assert finish == "stop", (i, text)
        jsonschema.validate(json.loads(text), schema)


@pytest.mark.parametrize(
    ("schema", "named"),
    [
        ({"type": "string", "format": "email"}, "format"),
        ({"type": "object", "not": {"required": ["a"]}}, "not"),
        ({"type": "array", "uniqueItems": True}, "uniqueItems"),
        ({"type": "number", "multipleOf": 5}, "multipleOf"),
        ({"type": "object", "patternProperties": {"^x": {}}}, "patternProperties"),
    ],
)
def test_a_schema_feature_that_cannot_be_enforced_is_refused_by_name(client, schema, named):
    with pytest.raises(openai.BadRequestError) as refused:
        _ask(client, "Hi", response_format=_format(schema, 0))
    error = refused.value.body
    assert error["param"] == "response_format.json_schema.schema"
    assert error["code"] == "unsupported_schema"
    assert named in error["message"]


# -- tool calls ------------------------------------------------------------------

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 30},
                "unit": {"enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "The local time in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 30}},
            "required": ["city"],
        },
    },
}


def _calls_from_stream(chunks) -> tuple[list[dict], str | None]:
    calls: dict[int, dict] = {}
    finish = None
    for chunk in chunks:
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        finish = choice.finish_reason or finish
        for delta in choice.delta.tool_calls or []:
            call = calls.setdefault(delta.index, {"id": "", "name": "", "arguments": ""})
            call["id"] += delta.id or ""
            call["name"] += delta.function.name or ""
            call["arguments"] += delta.function.arguments or ""
    return [calls[i] for i in sorted(calls)], finish


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize(
    "tool_choice",
    ["required", {"type": "function", "function": {"name": "get_weather"}}],
    ids=["required", "named"],
)
def test_a_tool_call_round_trip(client, stream, tool_choice):
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    request = {
        "model": MODEL,
        "messages": messages,
        "tools": [WEATHER, TIME],
        "tool_choice": tool_choice,
        **GREEDY,
    }
    if stream:
        calls, finish = _calls_from_stream(client.chat.completions.create(stream=True, **request))
    else:
        answer = client.chat.completions.create(**request)
        finish = answer.choices[0].finish_reason
        calls = [
            {"id": c.id, "name": c.function.name, "arguments": c.function.arguments}
            for c in answer.choices[0].message.tool_calls
        ]
    assert finish == "tool_calls" and calls
    for call in calls:
        assert call["id"].startswith("call_")
        arguments = json.loads(call["arguments"])  # always parses: the grammar held it
        tool = WEATHER if call["name"] == "get_weather" else TIME
        jsonschema.validate(arguments, tool["function"]["parameters"])
    if isinstance(tool_choice, dict):
        assert {c["name"] for c in calls} == {"get_weather"}

    # The app runs the tool and sends its result back; the model answers in text.
    messages.append(
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": c["id"],
                    "type": "function",
                    "function": {"name": c["name"], "arguments": c["arguments"]},
                }
                for c in calls
            ],
        }
    )
    messages += [
        {"role": "tool", "tool_call_id": c["id"], "content": "Sunny, 21 degrees."} for c in calls
    ]
    final = client.chat.completions.create(
        model=MODEL,
        messages=messages,
        tools=[WEATHER, TIME],
        tool_choice="none",
        max_tokens=16,
        **GREEDY,
    )
    assert final.choices[0].finish_reason in ("stop", "length")
    assert final.choices[0].message.content
    assert not final.choices[0].message.tool_calls


def test_a_tool_message_without_its_call_is_refused(client):
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(
            model=MODEL,
            messages=[
                {"role": "user", "content": "Hi"},
                {"role": "tool", "tool_call_id": "call_x", "content": "1"},
            ],
            tools=[WEATHER],
        )
    assert refused.value.body["param"].startswith("messages[1]")


# -- log-probabilities -----------------------------------------------------------


def test_chat_logprobs_name_the_tokens_of_the_answer(client):
    answer = _ask(client, "Name a colour.", logprobs=True, top_logprobs=2, max_tokens=12)
    entries = answer.choices[0].logprobs.content
    assert len(entries) == answer.usage.completion_tokens
    assert "".join(e.token for e in entries).startswith(answer.choices[0].message.content)
    for entry in entries:
        top = entry.top_logprobs
        assert len(top) == 2 and top[0].logprob >= top[1].logprob
        # The model's own probabilities: the deployment's repetition penalty may make
        # greedy decoding pick another than the likeliest, never a likelier one.
        assert entry.logprob <= top[0].logprob + 1e-6 and entry.logprob <= 0
        for alternative in top:
            if alternative.token == entry.token:
                assert alternative.logprob == pytest.approx(entry.logprob)

    chunks = _ask(
        client, "Name a colour.", stream=True, logprobs=True, top_logprobs=2, max_tokens=12
    )
    streamed = [
        e
        for c in chunks
        if c.choices and c.choices[0].logprobs
        for e in c.choices[0].logprobs.content
    ]
    assert [e.token for e in streamed] == [e.token for e in entries]


def test_completion_logprobs_in_the_legacy_shape(client):
    answer = client.completions.create(
        model=MODEL, prompt="The capital of France is", max_tokens=6, logprobs=2, **GREEDY
    )
    logprobs = answer.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == 6
    assert logprobs.text_offset[0] == 0 and logprobs.text_offset == sorted(logprobs.text_offset)
    for top, logprob in zip(logprobs.top_logprobs, logprobs.token_logprobs, strict=True):
        assert len(top) == 2 and logprob <= max(top.values()) + 1e-6


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"top_k": 20}, "top_k"),
        ({"logit_bias": {"1": 5}}, "logit_bias"),
        ({"store": True}, "store"),
        ({"made_up": 1}, "made_up"),
    ],
)
def test_a_field_aibox_does_not_implement_is_refused_by_name(client, extra, param):
    with pytest.raises(openai.BadRequestError) as refused:
        _ask(client, "Hi", extra_body=extra) if param != "logit_bias" else _ask(
            client, "Hi", logit_bias={"1": 5}
        )
    assert refused.value.body["param"] == param


# -- prompt caching --------------------------------------------------------------


def test_a_repeated_history_is_read_from_the_cache_with_the_same_greedy_answer(client):
    # A history no slot has seen (a fresh nonce up front), longer than a few chunks.
    nonce = uuid.uuid4().hex
    history = [
        {
            "role": "system",
            "content": f"Session {nonce}. You are a helpful assistant for a bakery.",
        },
        {"role": "user", "content": "How do I make bread? " * 20},
        {
            "role": "assistant",
            "content": "Mix flour, water, salt and yeast, knead, let it rise, then bake. " * 6,
        },
        {"role": "user", "content": "And how long should it rise?"},
    ]
    first = client.chat.completions.create(model=MODEL, messages=history, max_tokens=24, **GREEDY)
    second = client.chat.completions.create(model=MODEL, messages=history, max_tokens=24, **GREEDY)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached >= 192 and cached % 64 == 0 and cached < second.usage.prompt_tokens
    assert second.choices[0].message.content == first.choices[0].message.content
    record = UsageRecord.objects.get(request_id=uuid.UUID(second.id.removeprefix("chatcmpl-")))
    assert record.cached_tokens == cached


# -- limits ----------------------------------------------------------------------


@pytest.fixture
def limited(apps):
    """A fresh app developer key, and a way to put limits on it."""
    owner = make_user(Role.APP_DEVELOPER, username=f"lim-{uuid.uuid4().hex[:6]}")
    created = api_key_create(actor=owner, owner=owner, name="limited", scopes=[Scope.INFERENCE])
    # Key ids start again after the test database is flushed; Redis keeps counts by id.
    redis = sync_client()
    stale = redis.keys(f"aibox:limits:key:{created.api_key.pk}:*")
    if stale:
        redis.delete(*stale)

    def limit(**values):
        limit_set(actor=apps.admin, api_key=created.api_key, **values)

    client = openai.OpenAI(
        base_url=f"{apps.url}/v1", api_key=created.secret, max_retries=0, timeout=60
    )
    return client, limit


def _tiny(client):
    return client.completions.with_raw_response.create(
        model=MODEL, prompt="Hello", max_tokens=2, **GREEDY
    )


def test_a_key_over_its_request_rate_gets_429_while_another_key_is_served(limited, client):
    limited_client, limit = limited
    limit(requests_per_minute=2)
    ok = _tiny(limited_client)
    assert ok.headers["x-ratelimit-limit-requests"] == "2"
    assert ok.headers["x-ratelimit-remaining-requests"] == "1"
    _tiny(limited_client)
    with pytest.raises(openai.RateLimitError) as refused:
        _tiny(limited_client)
    response = refused.value.response
    assert int(response.headers["retry-after"]) >= 1
    assert response.headers["x-ratelimit-remaining-requests"] == "0"
    assert refused.value.body["code"] == "rate_limit_exceeded"
    assert _tiny(client).http_response.status_code == 200  # the app's other key


def test_a_key_over_its_token_rate_gets_429(limited):
    limited_client, limit = limited
    limit(tokens_per_minute=3)
    ok = _tiny(limited_client)  # 2 prompt tokens and 2 completion tokens: over the rate
    assert ok.headers["x-ratelimit-limit-tokens"] == "3"
    with pytest.raises(openai.RateLimitError) as refused:
        _tiny(limited_client)
    assert refused.value.body["code"] == "rate_limit_exceeded"
    assert "token" in refused.value.body["message"]
    assert 1 <= int(refused.value.response.headers["retry-after"]) <= 60


def test_a_key_over_its_token_budget_gets_429(limited):
    limited_client, limit = limited
    limit(token_budget=3, budget_period="day")
    _tiny(limited_client)  # 2 prompt tokens and 2 completion tokens: the budget is spent
    with pytest.raises(openai.RateLimitError) as refused:
        _tiny(limited_client)
    assert refused.value.body["code"] == "insufficient_quota"


def test_a_key_over_its_concurrency_gets_429_until_its_stream_ends(limited):
    limited_client, limit = limited
    limit(max_concurrent=1)
    stream = limited_client.completions.create(
        model=MODEL, prompt="Once upon a time", max_tokens=60, stream=True, **GREEDY
    )
    next(iter(stream))  # the first stream is running
    with pytest.raises(openai.RateLimitError):
        _tiny(limited_client)
    list(stream)
    assert _tiny(limited_client).http_response.status_code == 200


# -- size caps -------------------------------------------------------------------


def test_huge_prompts_beside_a_stream_are_refused_without_stalling_it(apps, client):
    """On the stack's default deployment (512-token context, deltas every 100 ms): a
    2.2 MB prompt is refused at the gateway (413), a 15 KB one is tokenised on the worker
    off the serving thread and refused there (400); the running stream keeps its pace."""
    gaps: list[float] = []

    def stream() -> None:
        last = None
        chunks = client.completions.create(
            model="gemma", prompt="Once upon a time", max_tokens=80, stream=True, **GREEDY
        )
        for chunk in chunks:
            now = time.perf_counter()
            if chunk.choices and chunk.choices[0].text:
                if last is not None:
                    gaps.append(now - last)
                last = now

    def send(prompt: str) -> httpx.Response:
        return httpx.post(
            f"{apps.url}/v1/completions",
            headers={"Authorization": f"Bearer {apps.key()}"},
            json={"model": "gemma", "prompt": prompt, "max_tokens": 4},
            timeout=60,
        )

    runner = threading.Thread(target=stream)
    runner.start()
    time.sleep(0.5)
    huge = send("lorem ipsum dolor sit amet " * 80_000)  # 2.2 MB, under the body limit
    large = send("lorem ipsum dolor sit amet " * 560)  # 15 KB: past the context, not the cap
    runner.join(timeout=120)
    assert huge.status_code == 413
    assert huge.json()["error"]["code"] == "context_length_exceeded"
    assert huge.json()["error"]["param"] == "prompt"
    assert large.status_code == 400
    assert large.json()["error"]["code"] == "context_length_exceeded"
    assert len(gaps) > 10
    assert max(gaps) < 2 * statistics.median(gaps)


def test_max_tokens_beyond_the_context_is_refused_at_the_gateway(client):
    with pytest.raises(openai.BadRequestError) as refused:
        _ask(client, "Hi", max_tokens=5000)
    assert "2048" in refused.value.body["message"]


def test_a_body_over_the_limit_gets_an_openai_error(apps):
    response = httpx.post(
        f"{apps.url}/v1/chat/completions",
        headers={"Authorization": f"Bearer {apps.key()}", "Content-Type": "application/json"},
        content=b"x" * (3 * 1024 * 1024),
        timeout=60,
    )
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "request_too_large"
