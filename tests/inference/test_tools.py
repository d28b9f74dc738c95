"""Tool calls in AIBox's prompt format: the request checks, the messages the chat template
gets, the schema the worker constrains to, and the calls read back from generated text."""

from __future__ import annotations

import itertools
import json
import re
import textwrap
from pathlib import Path
from typing import Any

import pytest

from apps.inference.openai_api import ApiError
from apps.inference.tools import (
    ToolRequest,
    ToolStream,
    call_schema,
    convert_messages,
    describe,
    parse_output,
    parse_tools,
    stream_deltas,
)

try:
    import jsonschema
except ImportError:  # the schema checks below are then skipped, the rest still runs
    jsonschema = None

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"enum": ["C", "F"]}},
            "required": ["city"],
        },
    },
}
TIME = {"type": "function", "function": {"name": "get_time"}}  # no parameters, no description
CALL_ID = re.compile(r"call_[0-9a-f]{24}")


def _tools(**data: Any) -> ToolRequest:
    request = parse_tools({"tools": [WEATHER, TIME], **data})
    assert request is not None
    return request


def _refused(param: str) -> Any:
    class Refused:
        def __enter__(self) -> None:
            pass

        def __exit__(self, kind, exc, tb) -> bool:
            assert isinstance(exc, ApiError), f"no 400 for {param}"
            assert exc.status == 400
            assert exc.param == param, exc.message
            return True

    return Refused()


def _named(calls: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    return [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls]


# parse_tools ----------------------------------------------------------------------------


def test_no_tools_is_none_and_tools_default_to_auto_with_parallel_calls():
    assert parse_tools({}) is None
    assert parse_tools({"tools": []}) is None
    assert parse_tools({"tool_choice": "none"}) is None
    request = _tools()
    assert (request.choice, request.function, request.parallel) == ("auto", None, True)
    assert [f.name for f in request.tools] == ["get_weather", "get_time"]
    assert request.tools[1].parameters == {"type": "object", "properties": {}}


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"tool_choice": "none"}, ("none", None, True)),
        ({"tool_choice": "required", "parallel_tool_calls": False}, ("required", None, False)),
        (
            {"tool_choice": {"type": "function", "function": {"name": "get_time"}}},
            ("function", "get_time", True),
        ),
    ],
)
def test_tool_choice_values(data, expected):
    request = _tools(**data)
    assert (request.choice, request.function, request.parallel) == expected


def _with_function(**changes: Any) -> dict[str, Any]:
    return {"tools": [{"type": "function", "function": {"name": "f", **changes}}]}


@pytest.mark.parametrize(
    ("data", "param"),
    [
        ({"tools": {"name": "f"}}, "tools"),
        ({"tools": [TIME] * 129}, "tools"),
        ({"tools": [TIME, TIME]}, "tools"),
        ({"tools": [WEATHER, {"type": "retrieval"}]}, "tools[1].type"),
        ({"tools": ["get_time"]}, "tools[0].type"),
        ({"tools": [{"type": "function"}]}, "tools[0].function"),
        (_with_function(name="has space"), "tools[0].function.name"),
        (_with_function(name="x" * 65), "tools[0].function.name"),
        (_with_function(name=""), "tools[0].function.name"),
        (_with_function(description=7), "tools[0].function.description"),
        (_with_function(parameters={"type": "string"}), "tools[0].function.parameters"),
        (_with_function(parameters=["city"]), "tools[0].function.parameters"),
        (_with_function(strict="yes"), "tools[0].function.strict"),
        ({"tools": [WEATHER], "tool_choice": "always"}, "tool_choice"),
        ({"tools": [WEATHER], "tool_choice": {"type": "function"}}, "tool_choice"),
        ({"tools": [WEATHER], "tool_choice": {"function": {"name": "get_weather"}}}, "tool_choice"),
        (
            {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "tool_choice",
        ),
        ({"tool_choice": "auto"}, "tool_choice"),
        ({"tool_choice": "required", "tools": []}, "tool_choice"),
        ({"tools": [WEATHER], "parallel_tool_calls": "yes"}, "parallel_tool_calls"),
    ],
)
def test_malformed_tools_are_refused_naming_the_param(data, param):
    with _refused(param):
        parse_tools(data)


EMAIL = {
    "type": "function",
    "function": {
        "name": "send",
        "parameters": {
            "type": "object",
            "properties": {"to": {"type": "string", "format": "email"}},
        },
    },
}


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "send"}}])
def test_a_schema_the_grammar_cannot_enforce_is_refused_when_the_output_is_constrained(choice):
    with _refused("tools[1].function.parameters"):
        parse_tools({"tools": [TIME, EMAIL], "tool_choice": choice})


def test_a_schema_is_only_described_in_auto_mode_or_when_another_function_is_named():
    assert parse_tools({"tools": [TIME, EMAIL]}).choice == "auto"
    named = {"type": "function", "function": {"name": "get_time"}}
    assert parse_tools({"tools": [TIME, EMAIL], "tool_choice": named}).function == "get_time"


# convert_messages -----------------------------------------------------------------------


def test_the_tools_are_described_at_the_end_of_the_system_message():
    messages = convert_messages(
        [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        _tools(),
    )
    assert [m["role"] for m in messages] == ["system", "user"]
    system = messages[0]["content"]
    assert system.startswith("Be brief.\n\n")
    assert (
        json.dumps(
            {
                "name": "get_weather",
                "description": "The current weather in a city.",
                "parameters": WEATHER["function"]["parameters"],
            }
        )
        in system
    )
    assert '{"name": "get_time", "parameters": {"type": "object", "properties": {}}}' in system
    assert '<tool_call>{"name": "<function name>", "arguments": {' in system
    assert "one <tool_call> block per call" in system


def test_the_documented_prompt_format_is_the_one_used():
    docs = (Path(__file__).parents[2] / "docs" / "api.md").read_text()
    section = docs.split("\n## Tool calls\n", 1)[1]
    documented = textwrap.dedent(section.split("```text\n", 1)[1].split("```", 1)[0]).strip()
    city = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    weather = {**WEATHER, "function": {**WEATHER["function"], "parameters": city}}
    assert documented == describe(parse_tools({"tools": [weather]}))


def test_without_a_system_message_the_tools_get_a_new_first_one():
    messages = convert_messages(
        [{"role": "user", "content": "Time?"}],
        _tools(tool_choice={"type": "function", "function": {"name": "get_time"}}),
    )
    assert [m["role"] for m in messages] == ["system", "user"]
    assert "Call the function get_time now." in messages[0]["content"]
    assert "one <tool_call> block per call" not in messages[0]["content"]


def test_tool_choice_none_describes_nothing():
    raw = [{"role": "user", "content": "Hi"}]
    assert convert_messages(raw, _tools(tool_choice="none")) == raw
    assert convert_messages(raw, None) == raw


ROUND_TRIP = [
    {"role": "system", "content": "You help travellers."},
    {"role": "user", "content": "Weather in Paris and the time?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_a",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
            },
            {
                "id": "call_b",
                "type": "function",
                "function": {"name": "get_time", "arguments": "{}"},
            },
        ],
    },
    {"role": "tool", "tool_call_id": "call_b", "content": "14:05"},
    {"role": "tool", "tool_call_id": "call_a", "content": [{"type": "text", "text": "18 °C"}]},
    {"role": "assistant", "content": "18 °C in Paris at 14:05."},
    {"role": "user", "content": "And in Rome?"},
    {
        "role": "assistant",
        "content": "Checking.",
        "tool_calls": [
            {
                "id": "call_c",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "call_c", "content": '{"temp": 21}'},
    {"role": "user", "content": "In Fahrenheit please."},
]


def test_a_round_trip_becomes_alternating_turns_with_each_response_named():
    messages = convert_messages(ROUND_TRIP, _tools())
    assert [m["role"] for m in messages] == [
        "system",
        "user",
        "assistant",
        "user",
        "assistant",
        "user",
        "assistant",
        "user",
    ]
    assert messages[2]["content"] == (
        '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>\n'
        '<tool_call>{"name": "get_time", "arguments": {}}</tool_call>'
    )
    assert messages[3]["content"] == (
        '<tool_response>{"name": "get_time", "content": "14:05"}</tool_response>\n'
        '<tool_response>{"name": "get_weather", "content": "18 °C"}</tool_response>'
    )
    assert messages[6]["content"] == (
        'Checking.\n<tool_call>{"name": "get_weather", "arguments": {"city": "Rome"}}</tool_call>'
    )
    # The user's next message joins the tool responses' turn.
    assert messages[7]["content"] == (
        '<tool_response>{"name": "get_weather", "content": "{\\"temp\\": 21}"}</tool_response>'
        "\n\nIn Fahrenheit please."
    )
    assert all(isinstance(m["content"], str) for m in messages)


def test_a_round_trip_renders_with_the_bundled_gemma_template():
    pytest.importorskip("llama_cpp")
    from workers.inference import templates

    template = templates.choose(override="", gguf_template=None, architecture="gemma3")
    rendered = templates.render(
        template, convert_messages(ROUND_TRIP, _tools()), bos_token="<bos>", eos_token="<eos>"
    )
    assert rendered.text.count("<start_of_turn>model\n") == 4  # 3 answers and the prompt
    assert '<tool_response>{"name": "get_time", "content": "14:05"}' in rendered.text
    assert rendered.text.endswith("In Fahrenheit please.<end_of_turn>\n<start_of_turn>model\n")


@pytest.mark.parametrize(
    "raw",
    [
        [{"role": "user", "content": "Hi"}],
        [
            {"role": "developer", "content": [{"type": "text", "text": "Be "}, {"type": "text"}]},
            {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
            {"role": "assistant", "content": "Hello", "tool_calls": []},
            {"role": "system", "content": ""},
        ],
    ],
)
def test_ordinary_messages_convert_to_plain_roles_and_text(raw):
    converted = convert_messages(raw, None)
    assert [m["role"] for m in converted] == [
        {"developer": "system"}.get(m["role"], m["role"]) for m in raw
    ]
    assert all(isinstance(m["content"], str) for m in converted)


@pytest.mark.parametrize(
    ("raw", "param"),
    [
        ([], "messages"),
        ("Hi", "messages"),
        ([{"content": "Hi"}], "messages[0].role"),
        (["Hi"], "messages[0].role"),
        ([{"role": "function", "content": "Hi"}], "messages[0].role"),
        ([{"role": "user"}], "messages[0].content"),
        ([{"role": "user", "content": [{"type": "image_url"}]}], "messages[0].content"),
        ([{"role": "assistant", "content": None}], "messages[0].content"),
    ],
)
def test_malformed_ordinary_messages_are_refused_naming_the_part(raw, param):
    with _refused(param):
        convert_messages(raw, None)


def _call(call_id: Any = "call_1", name: Any = "get_time", arguments: Any = "{}") -> dict:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


USER = {"role": "user", "content": "Hi"}


@pytest.mark.parametrize(
    ("raw", "param"),
    [
        ([USER, {"role": "tool", "content": "1"}], "messages[1].tool_call_id"),
        (
            [USER, {"role": "tool", "tool_call_id": "call_1", "content": "1"}],
            "messages[1].tool_call_id",
        ),
        (
            [
                USER,
                {"role": "assistant", "tool_calls": [_call("call_1")]},
                {"role": "tool", "tool_call_id": "call_2", "content": "1"},
            ],
            "messages[2].tool_call_id",
        ),
        (
            # Answers a call, but of an assistant message before the last one.
            [
                USER,
                {"role": "assistant", "tool_calls": [_call("call_1")]},
                {"role": "tool", "tool_call_id": "call_1", "content": "1"},
                {"role": "assistant", "content": "One."},
                {"role": "tool", "tool_call_id": "call_1", "content": "1"},
            ],
            "messages[4].tool_call_id",
        ),
        (
            [
                USER,
                {"role": "assistant", "tool_calls": [_call("call_1")]},
                {"role": "tool", "tool_call_id": "call_1"},
            ],
            "messages[2].content",
        ),
        ([USER, {"role": "assistant", "tool_calls": "get_time"}], "messages[1].tool_calls"),
        ([USER, {"role": "assistant", "tool_calls": ["get_time"]}], "messages[1].tool_calls[0]"),
        (
            [USER, {"role": "assistant", "tool_calls": [_call(call_id="")]}],
            "messages[1].tool_calls[0]",
        ),
        (
            [USER, {"role": "assistant", "tool_calls": [_call(name=None)]}],
            "messages[1].tool_calls[0]",
        ),
        (
            [USER, {"role": "assistant", "tool_calls": [_call(arguments={})]}],
            "messages[1].tool_calls[0]",
        ),
        (
            [USER, {"role": "assistant", "tool_calls": [{**_call(), "type": "custom"}]}],
            "messages[1].tool_calls[0]",
        ),
        (
            [USER, {"role": "assistant", "tool_calls": [_call(), _call()]}],
            "messages[1].tool_calls[1].id",
        ),
        (
            [USER, {"role": "assistant", "content": 5, "tool_calls": [_call()]}],
            "messages[1].content",
        ),
    ],
)
def test_malformed_tool_messages_are_refused_naming_the_param(raw, param):
    with _refused(param):
        convert_messages(raw, _tools())


# call_schema ----------------------------------------------------------------------------


def _validate(value: Any, schema: dict[str, Any]) -> bool:
    """Whether ``value`` meets ``schema`` (True when jsonschema is not installed)."""
    if jsonschema is None:
        return True
    try:
        jsonschema.validate(value, schema)
    except jsonschema.ValidationError:
        return False
    return True


def _object(name: str, parameters: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {"name": {"const": name}, "arguments": parameters},
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }


WEATHER_OBJECT = _object("get_weather", WEATHER["function"]["parameters"])
TIME_OBJECT = _object("get_time", {"type": "object", "properties": {}})


def test_free_text_modes_have_no_schema():
    assert call_schema(_tools()) is None
    assert call_schema(_tools(tool_choice="none")) is None


def test_required_with_parallel_calls_is_an_array_of_any_function():
    tools = _tools(tool_choice="required")
    schema = call_schema(tools)
    assert schema == {
        "type": "array",
        "minItems": 1,
        "items": {"anyOf": [WEATHER_OBJECT, TIME_OBJECT]},
    }
    output = (
        '[{"name": "get_weather", "arguments": {"city": "Oslo"}}, '
        '{"name": "get_time", "arguments": {}}]'
    )
    assert _validate(json.loads(output), schema)
    for wrong in ("[]", '[{"name": "get_weather", "arguments": {}}]', '{"name": "get_time"}'):
        assert not _validate(json.loads(wrong), schema) or jsonschema is None
    content, calls = parse_output(output, tools)
    assert content is None
    assert _named(calls) == [("get_weather", {"city": "Oslo"}), ("get_time", {})]


def test_required_without_parallel_calls_is_one_call_of_any_function():
    tools = _tools(tool_choice="required", parallel_tool_calls=False)
    schema = call_schema(tools)
    assert schema == {"anyOf": [WEATHER_OBJECT, TIME_OBJECT]}
    assert _validate({"name": "get_time", "arguments": {}}, schema)
    if jsonschema is not None:
        assert not _validate([{"name": "get_time", "arguments": {}}], schema)
    only = parse_tools({"tools": [TIME], "tool_choice": "required", "parallel_tool_calls": False})
    assert call_schema(only) == TIME_OBJECT


def test_a_named_function_is_one_call_of_it():
    tools = _tools(tool_choice={"type": "function", "function": {"name": "get_weather"}})
    schema = call_schema(tools)
    assert schema == WEATHER_OBJECT
    output = '{"name": "get_weather", "arguments": {"city": "Lima", "unit": "C"}}'
    assert _validate(json.loads(output), schema)
    if jsonschema is not None:
        assert not _validate({"name": "get_time", "arguments": {}}, schema)
        assert not _validate({"name": "get_weather", "arguments": {"unit": "K"}}, schema)
    content, calls = parse_output(output, tools)
    assert content is None
    assert _named(calls) == [("get_weather", {"city": "Lima", "unit": "C"})]


def test_every_call_schema_is_one_the_worker_can_turn_into_a_grammar():
    pytest.importorskip("llama_cpp")
    from workers.inference import grammar, json_schema

    named = {"type": "function", "function": {"name": "get_weather"}}
    for data in (
        {"tool_choice": "required"},
        {"tool_choice": "required", "parallel_tool_calls": False},
        {"tool_choice": named},
    ):
        schema = call_schema(_tools(**data))
        json_schema.check(schema)
        assert "get_weather" in grammar.grammar(schema)


def test_a_constrained_output_cut_short_is_content_not_a_call():
    tools = _tools(tool_choice="required")
    text = '[{"name": "get_weather", "arguments": {"ci'  # max_tokens ran out
    assert parse_output(text, tools) == (text, [])


# parse_output ---------------------------------------------------------------------------


def test_calls_are_read_from_blocks_and_the_rest_is_content():
    text = (
        "Let me check.\n"
        '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>\n'
        '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>\n'
    )
    content, calls = parse_output(text, _tools())
    assert content == "Let me check."
    assert _named(calls) == [("get_weather", {"city": "Paris"}), ("get_time", {})]
    for call in calls:
        assert CALL_ID.fullmatch(call["id"])
        assert call["type"] == "function"
        assert isinstance(call["function"]["arguments"], str)
    assert calls[0]["id"] != calls[1]["id"]


def test_only_calls_is_null_content():
    text = '<tool_call>{"name": "get_time", "arguments": {}}</tool_call>'
    content, calls = parse_output(text, _tools())
    assert content is None
    assert _named(calls) == [("get_time", {})]


def test_plain_text_is_unchanged_and_calls_nothing():
    text = "  Paris is sunny. Use <b> tags, or a < b.\n"
    assert parse_output(text, _tools()) == (text, [])
    assert parse_output(text, _tools(tool_choice="none")) == (text, [])


def test_tool_calls_are_not_read_when_tool_choice_is_none():
    text = '<tool_call>{"name": "get_time", "arguments": {}}</tool_call>'
    assert parse_output(text, _tools(tool_choice="none")) == (text, [])


@pytest.mark.parametrize(
    "block",
    [
        '<tool_call>{"name": "get_time", "arguments": {}</tool_call>',  # not JSON
        '<tool_call>{"name": "book_flight", "arguments": {}}</tool_call>',  # no such function
        '<tool_call>{"arguments": {}}</tool_call>',
        '<tool_call>{"name": "get_time", "arguments": [1]}</tool_call>',
        '<tool_call>{"name": "get_time", "arguments": {}}',  # never closed
    ],
)
def test_a_malformed_block_stays_content_and_calls_nothing(block):
    good = '<tool_call>{"name": "get_time", "arguments": {}}</tool_call>'
    assert parse_output(f"Hmm. {block}", _tools()) == (f"Hmm. {block}", [])
    content, calls = parse_output(f"{good}\n{block}", _tools())
    assert content == block
    assert _named(calls) == [("get_time", {})]


def test_quoted_or_missing_arguments_still_make_a_call():
    text = (
        '<tool_call>{"name": "get_weather", "arguments": "{\\"city\\": \\"Oslo\\"}"}</tool_call>'
        '<tool_call>{"name": "get_time"}</tool_call>'
    )
    _, calls = parse_output(text, _tools())
    assert _named(calls) == [("get_weather", {"city": "Oslo"}), ("get_time", {})]


def test_without_parallel_calls_a_second_block_stays_content():
    first = '<tool_call>{"name": "get_time", "arguments": {}}</tool_call>'
    second = '<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>'
    content, calls = parse_output(f"{first}\n{second}", _tools(parallel_tool_calls=False))
    assert content == second
    assert _named(calls) == [("get_time", {})]


# ToolStream -----------------------------------------------------------------------------

STREAMED = (
    "Sure, I'll look that up for you.\n"
    '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>\n'
    '<tool_call>{"name": "get_time", "arguments": {}}</tool_call>\n'
    "One moment."
)


def _run(stream: ToolStream, pieces: list[str]) -> tuple[list[str], str, list[dict]]:
    emitted = [stream.feed(piece) for piece in pieces]
    rest, calls = stream.finish()
    return emitted, rest, calls


def _splits(text: str):
    yield [text]
    yield list(text)  # one character at a time
    for i in range(1, len(text)):
        yield [text[:i], text[i:]]
    for i, j in itertools.combinations(range(30, len(text), 9), 2):
        yield [text[:i], text[i:j], text[j:]]


def test_the_stream_never_emits_any_part_of_a_call_block():
    for pieces in _splits(STREAMED):
        emitted, rest, calls = _run(ToolStream(_tools()), pieces)
        content = "".join(emitted) + rest
        assert content == "Sure, I'll look that up for you.\nOne moment.", pieces
        assert _named(calls) == [("get_weather", {"city": "Paris"}), ("get_time", {})]
        for piece in emitted:
            assert "<" not in piece and "{" not in piece and "tool" not in piece, pieces


def test_the_stream_emits_ordinary_text_promptly():
    stream = ToolStream(_tools())
    assert stream.feed("Paris is") == "Paris is"
    assert stream.feed(" sunny") == " sunny"
    assert stream.feed(" <") == ""  # could be the start of a call
    assert stream.feed("b>hot") == " <b>hot"
    assert stream.feed("</b>, 30") == "</b>, 30"
    assert stream.feed(" <tool_c") == ""
    assert stream.feed("all is a tag") == " <tool_call is a tag"
    assert stream.finish() == ("", [])


def test_the_stream_passes_a_malformed_block_on_as_content_once_it_closes():
    stream = ToolStream(_tools())
    assert stream.feed("Hm <tool_call>{not json") == "Hm"
    assert stream.feed("}</tool_call> ok") == " <tool_call>{not json}</tool_call> ok"
    assert stream.feed(' <tool_call>{"name": "get_time"') == ""
    assert stream.finish() == (' <tool_call>{"name": "get_time"', [])  # cut short


def test_the_stream_agrees_with_parse_output():
    tools = _tools()
    for text in (
        STREAMED,
        "plain text\n\n",
        '<tool_call>{"name": "x"}</tool_call> and <tool_call>{"name": "get_time"}</tool_call>',
    ):
        emitted, rest, calls = _run(ToolStream(tools), list(text))
        content, parsed = parse_output(text, tools)
        streamed = "".join(emitted) + rest
        assert (streamed.strip() or None if calls else streamed) == content
        assert _named(calls) == _named(parsed)


def test_a_constrained_stream_emits_nothing_until_the_calls():
    tools = _tools(tool_choice="required")
    output = '[{"name": "get_time", "arguments": {}}]'
    emitted, rest, calls = _run(ToolStream(tools), list(output))
    assert set(emitted) == {""}
    assert rest == ""
    assert _named(calls) == [("get_time", {})]
    emitted, rest, calls = _run(ToolStream(tools), ['[{"name": "get_t'])
    assert (rest, calls) == ('[{"name": "get_t', [])


def test_stream_deltas_are_openai_tool_call_chunks():
    _, calls = parse_output(STREAMED, _tools())
    deltas = stream_deltas(calls)
    assert [d["index"] for d in deltas] == [0, 1]
    for delta, call in zip(deltas, calls, strict=True):
        assert delta == {
            "index": delta["index"],
            "id": call["id"],
            "type": "function",
            "function": {
                "name": call["function"]["name"],
                "arguments": call["function"]["arguments"],
            },
        }
    assert stream_deltas([]) == []
