"""OpenAI tool calls for models without native tool support: a documented prompt format.

The tools are described in the system message; the model answers a call as
``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``, and each result comes back in
a user turn as ``<tool_response>{"name": ..., "content": ...}</tool_response>``, so any
chat template that knows system, user and assistant turns can carry a tool conversation
(docs/api.md, "Tool calls"). With ``tool_choice`` "required" or a named function the
worker constrains the output to ``call_schema``'s JSON schema, so it always parses.

Plain Python: the request parser and the response shaping call it.

About 500 lines on purpose: the prompt format, the parser of a model's answer and the
schema that constrains it must change together, so they are kept in one module.
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass
from typing import Any

# A module import, not names from it: openai_api may import this module in turn.
from apps.inference import openai_api

MAX_TOOLS = 128
NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")
OPEN = "<tool_call>"
CLOSE = "</tool_call>"
CHOICES = ("none", "auto", "required")


@dataclass(frozen=True)
class Function:
    name: str
    description: str | None
    parameters: dict[str, Any]  # a JSON object schema (no properties when not given)
    strict: bool = False


@dataclass
class ToolRequest:
    """A request's ``tools``, ``tool_choice`` and ``parallel_tool_calls``, checked."""

    tools: list[Function]
    choice: str  # "none", "auto", "required" or "function" (the one named in ``function``)
    function: str | None
    parallel: bool

    @property
    def constrained(self) -> bool:
        """Whether the output is held to ``call_schema`` (it is then a call, always)."""
        return self.choice in ("required", "function")

    def find(self, name: str) -> Function | None:
        return next((f for f in self.tools if f.name == name), None)


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


# Parsing the request ------------------------------------------------------------------


def _function(tool: Any, i: int) -> Function:
    where = f"tools[{i}]"
    if not isinstance(tool, dict) or tool.get("type") != "function":
        raise openai_api.bad_request(
            f"{where} must be an object with type 'function' (the only tool type AIBox serves).",
            param=f"{where}.type",
        )
    spec = tool.get("function")
    if not isinstance(spec, dict):
        raise openai_api.bad_request(
            f"{where}.function must be an object.", param=f"{where}.function"
        )
    name = spec.get("name")
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise openai_api.bad_request(
            f"{where}.function.name must be 1 to 64 letters, digits, underscores or dashes.",
            param=f"{where}.function.name",
        )
    description = spec.get("description")
    if description is not None and not isinstance(description, str):
        raise openai_api.bad_request(
            f"{where}.function.description must be a string.",
            param=f"{where}.function.description",
        )
    parameters = spec.get("parameters")
    if parameters is None or parameters == {}:
        parameters = {"type": "object", "properties": {}}
    elif not isinstance(parameters, dict) or parameters.get("type", "object") != "object":
        raise openai_api.bad_request(
            f"{where}.function.parameters must be a JSON Schema of an object "
            "(type 'object'): a function's arguments are a JSON object.",
            param=f"{where}.function.parameters",
        )
    elif "type" not in parameters:
        parameters = {"type": "object", **parameters}
    strict = spec.get("strict")
    if strict is not None and not isinstance(strict, bool):
        raise openai_api.bad_request(
            f"{where}.function.strict must be true or false.", param=f"{where}.function.strict"
        )
    return Function(name, description, parameters, bool(strict))


def parse_tools(data: dict[str, Any]) -> ToolRequest | None:
    """The request's tools, or None when it has none (an empty list counts as none).

    Raises ``ApiError`` (400, naming the parameter) for anything malformed, a named
    ``tool_choice`` that is not among the tools, a ``tool_choice`` other than "none"
    without tools, or (when the output is constrained) arguments' schemas that the
    grammar cannot enforce.
    """
    raw = data.get("tools")
    if raw is not None and not isinstance(raw, list):
        raise openai_api.bad_request("'tools' must be a list of functions.", param="tools")
    if raw and len(raw) > MAX_TOOLS:
        raise openai_api.bad_request(
            f"'tools' may list at most {MAX_TOOLS} functions.", param="tools"
        )
    tools = [_function(tool, i) for i, tool in enumerate(raw or [])]
    names = [f.name for f in tools]
    for name in names:
        if names.count(name) > 1:
            raise openai_api.bad_request(
                f"'tools' lists the function '{name}' more than once.", param="tools"
            )

    parallel = data.get("parallel_tool_calls")
    if parallel is None:
        parallel = True  # OpenAI's default
    elif not isinstance(parallel, bool):
        raise openai_api.bad_request(
            "'parallel_tool_calls' must be true or false.", param="parallel_tool_calls"
        )

    raw_choice = data.get("tool_choice")
    function = None
    if raw_choice is None:
        choice = "auto" if tools else "none"
    elif isinstance(raw_choice, str) and raw_choice in CHOICES:
        choice = raw_choice
    elif isinstance(raw_choice, dict):
        spec = raw_choice.get("function")
        function = spec.get("name") if isinstance(spec, dict) else None
        if raw_choice.get("type") != "function" or not isinstance(function, str):
            raise openai_api.bad_request(
                "A named 'tool_choice' must be "
                '{"type": "function", "function": {"name": "<a function in tools>"}}.',
                param="tool_choice",
            )
        choice = "function"
    else:
        raise openai_api.bad_request(
            "'tool_choice' must be 'none', 'auto', 'required' or "
            '{"type": "function", "function": {"name": ...}}.',
            param="tool_choice",
        )
    if not tools:
        if choice != "none":
            raise openai_api.bad_request(
                "'tool_choice' needs 'tools': there is no function to call.",
                param="tool_choice",
            )
        return None
    if function is not None and function not in names:
        raise openai_api.bad_request(
            f"'tool_choice' names the function '{function}', which is not in 'tools'.",
            param="tool_choice",
        )
    if choice in ("required", "function"):
        # These arguments are held to their schema by a grammar: refuse one it cannot
        # enforce. In auto mode a schema is only described to the model.
        for i, f in enumerate(tools):
            if choice == "required" or f.name == function:
                openai_api.checked_schema(f.parameters, f"tools[{i}].function.parameters")
    return ToolRequest(tools=tools, choice=choice, function=function, parallel=parallel)


# Messages for the chat template ---------------------------------------------------------


def describe(tools: ToolRequest) -> str:
    """The tools' part of the system message (docs/api.md shows it)."""
    listed = "\n".join(
        _dumps(
            {"name": f.name}
            | ({"description": f.description} if f.description else {})
            | {"parameters": f.parameters}
        )
        for f in tools.tools
    )
    if tools.choice == "function":
        when = f"Call the function {tools.function} now."
    elif tools.choice == "required":
        when = "Call at least one function now."
    else:
        when = "Call a function only when it helps; otherwise answer in plain text."
    if tools.parallel and tools.choice != "function":
        several = "To call several functions at once, write one <tool_call> block per call."
    else:
        several = "Call one function at a time."
    return (
        "You can call functions to help answer. Each line below is one function: its "
        "name, what it does and a JSON Schema of its arguments.\n"
        f"{listed}\n"
        "To call a function, answer with "
        '<tool_call>{"name": "<function name>", "arguments": {<the arguments as JSON>}}'
        f"</tool_call>. {several} Each result comes back in the next user turn as "
        '<tool_response>{"name": "<function name>", "content": "<the result>"}'
        f"</tool_response>. {when}"
    )


def _tool_calls(message: dict[str, Any], i: int) -> list[tuple[str, str, str]]:
    """An assistant message's ``tool_calls`` as (id, name, arguments) triples."""
    raw = message.get("tool_calls")
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise openai_api.bad_request(
            f"messages[{i}].tool_calls must be a list.", param=f"messages[{i}].tool_calls"
        )
    calls = []
    for j, call in enumerate(raw):
        where = f"messages[{i}].tool_calls[{j}]"
        function = call.get("function") if isinstance(call, dict) else None
        if (
            not isinstance(function, dict)
            or call.get("type", "function") != "function"
            or not isinstance(call.get("id"), str)
            or not call["id"]
            or not isinstance(function.get("name"), str)
            or not function["name"]
            or not isinstance(function.get("arguments"), str)
        ):
            raise openai_api.bad_request(
                f"{where} must be "
                '{"id": "...", "type": "function", '
                '"function": {"name": "...", "arguments": "<JSON string>"}}.',
                param=where,
            )
        if any(call["id"] == other for other, _, _ in calls):
            raise openai_api.bad_request(
                f"{where}.id repeats the id '{call['id']}' of an earlier call.",
                param=f"{where}.id",
            )
        calls.append((call["id"], function["name"], function["arguments"]))
    return calls


def _call_block(name: str, arguments: str) -> str:
    try:
        parsed: Any = json.loads(arguments)
    except ValueError:
        parsed = arguments  # passed on as it came, as a JSON string
    return f"{OPEN}{_dumps({'name': name, 'arguments': parsed})}{CLOSE}"


def convert_messages(raw_messages: list[Any], tools: ToolRequest | None) -> list[dict[str, str]]:
    """The request's messages as plain system, user and assistant turns for the template.

    An assistant message's ``tool_calls`` become ``<tool_call>`` blocks after its content;
    a run of ``tool`` messages becomes one user turn of ``<tool_response>`` blocks (a user
    message right after it joins that turn, so turns still alternate). The tools are
    described at the end of the system message (a new first one if there is none) unless
    ``tool_choice`` is "none". Raises ``ApiError`` (400, naming the message) otherwise.
    """
    if not isinstance(raw_messages, list) or not raw_messages:
        raise openai_api.bad_request("'messages' must be a non-empty list.", param="messages")
    roles = [*openai_api.ROLES, "tool"]
    converted: list[dict[str, str]] = []
    # The calls of the assistant message that the current run of tool messages answers.
    answering: dict[str, str] | None = None
    in_tool_turn = False
    for i, message in enumerate(raw_messages):
        role = message.get("role") if isinstance(message, dict) else None
        if role not in roles:
            raise openai_api.bad_request(
                f"messages[{i}] must have a role: one of {', '.join(roles)}.",
                param=f"messages[{i}].role",
            )
        if role == "tool":
            call_id = message.get("tool_call_id")
            if not isinstance(call_id, str) or not call_id:
                raise openai_api.bad_request(
                    f"messages[{i}] (a tool message) needs a 'tool_call_id'.",
                    param=f"messages[{i}].tool_call_id",
                )
            if answering is None or call_id not in answering:
                raise openai_api.bad_request(
                    f"messages[{i}] answers the tool call '{call_id}', but the assistant "
                    "message before it made no call with that id.",
                    param=f"messages[{i}].tool_call_id",
                )
            block = _dumps({"name": answering[call_id], "content": openai_api._content(message, i)})
            block = f"<tool_response>{block}</tool_response>"
            if in_tool_turn:
                converted[-1]["content"] += "\n" + block
            else:
                converted.append({"role": "user", "content": block})
                in_tool_turn = True
            continue
        answering = None
        if role == "assistant" and (calls := _tool_calls(message, i)):
            answering = {call_id: name for call_id, name, _ in calls}
            blocks = "\n".join(_call_block(name, arguments) for _, name, arguments in calls)
            content = "" if message.get("content") is None else openai_api._content(message, i)
            if content.strip():
                blocks = f"{content.rstrip()}\n{blocks}"
            converted.append({"role": "assistant", "content": blocks})
        elif role == "user" and in_tool_turn:
            converted[-1]["content"] += "\n\n" + openai_api._content(message, i)
        else:
            content = openai_api._content(message, i)
            converted.append({"role": openai_api.ROLES[role], "content": content})
        in_tool_turn = False
    if tools is not None and tools.choice != "none":
        if converted[0]["role"] == "system" and converted[0]["content"].strip():
            converted[0]["content"] = f"{converted[0]['content'].rstrip()}\n\n{describe(tools)}"
        elif converted[0]["role"] == "system":
            converted[0]["content"] = describe(tools)
        else:
            converted.insert(0, {"role": "system", "content": describe(tools)})
    return converted


# Constraining and reading the output ----------------------------------------------------


def _call_object(function: Function) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {"name": {"const": function.name}, "arguments": function.parameters},
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }


def call_schema(tools: ToolRequest) -> dict[str, Any] | None:
    """The JSON schema the worker holds the output to, or None when it is free text.

    "required" with parallel calls: an array of at least one call; a named function:
    one call of it; "required" without parallel calls: one call of any function.
    """
    if tools.choice == "function":
        # parse_tools checked that the named function is among the tools.
        return _call_object(next(f for f in tools.tools if f.name == tools.function))
    if tools.choice != "required":
        return None
    objects = [_call_object(f) for f in tools.tools]
    if tools.parallel:
        return {"type": "array", "minItems": 1, "items": {"anyOf": objects}}
    return objects[0] if len(objects) == 1 else {"anyOf": objects}


def _new_call(name: str, arguments: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": f"call_{secrets.token_hex(12)}",
        "type": "function",
        "function": {"name": name, "arguments": _dumps(arguments)},
    }


def _as_call(value: Any, tools: ToolRequest) -> dict[str, Any] | None:
    """A call the model wrote, as OpenAI's tool call; None unless it names a function."""
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    if tools.find(value["name"]) is None:
        return None
    arguments = value.get("arguments", {})
    if isinstance(arguments, str):  # small models sometimes quote the arguments
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return None
    if not isinstance(arguments, dict):
        return None
    return _new_call(value["name"], arguments)


def _constrained_calls(text: str, tools: ToolRequest) -> list[dict[str, Any]]:
    """The calls in a constrained output, or none if it is cut short (``max_tokens``)."""
    try:
        value = json.loads(text)
    except ValueError:
        return []
    calls = [_as_call(item, tools) for item in (value if isinstance(value, list) else [value])]
    if not calls or None in calls:
        return []
    return calls  # type: ignore[return-value]


def _open_prefix(text: str) -> int:
    """How long an end of ``text`` is that could be the start of a ``<tool_call>``."""
    for n in range(min(len(OPEN) - 1, len(text)), 0, -1):
        if text.endswith(OPEN[:n]):
            return n
    return 0


class ToolStream:
    """Generated text pieces in, content out, with the tool calls taken out of it.

    In auto mode ordinary text is passed on as it comes; text that could be the start
    of a ``<tool_call>`` block is held back until the block closes (then it is a call,
    or content again if it does not parse or names no function). Whitespace next to a
    call is dropped, so trailing whitespace is held until more text follows. In
    constrained mode nothing streams: the calls come at the end. Concatenating what
    ``feed`` and ``finish`` return gives the text unchanged when there are no calls.
    """

    def __init__(self, tools: ToolRequest) -> None:
        self._tools = tools
        self._pending = ""  # undecided: a possible OPEN prefix, or an open block
        self._blank = ""  # whitespace after the last content, held
        self._calls: list[dict[str, Any]] = []
        self._constrained: list[str] = []

    def feed(self, piece: str) -> str:
        """Return the content that may be sent now."""
        if self._tools.constrained:
            self._constrained.append(piece)
            return ""
        if self._tools.choice == "none":
            return piece
        text = self._pending + piece
        out: list[str] = []
        while text:
            if not text.startswith(OPEN):
                start = text.find(OPEN)
                if start < 0:
                    hold = _open_prefix(text)
                    out.append(self._content(text[: len(text) - hold]))
                    text = text[len(text) - hold :]
                    break
                out.append(self._content(text[:start]))
                text = text[start:]
            end = text.find(CLOSE)
            if end < 0:
                break  # the block is still open
            block, text = text[: end + len(CLOSE)], text[end + len(CLOSE) :]
            call = self._call(block[len(OPEN) : end])
            if call is None:
                out.append(self._content(block))
            else:
                self._calls.append(call)
                self._blank = ""
        self._pending = text
        return "".join(out)

    def _content(self, text: str) -> str:
        text = self._blank + text
        kept = text.rstrip()
        self._blank = text[len(kept) :]
        return kept

    def _call(self, inner: str) -> dict[str, Any] | None:
        if self._calls and not self._tools.parallel:
            return None  # one call only: a second block stays text
        try:
            return _as_call(json.loads(inner), self._tools)
        except ValueError:
            return None

    def finish(self) -> tuple[str, list[dict[str, Any]]]:
        """Return the content still held and the calls, once the generation has ended."""
        if self._tools.constrained:
            text = "".join(self._constrained)
            calls = _constrained_calls(text, self._tools)
            return ("" if calls else text), calls
        rest = self._blank + self._pending
        self._blank = self._pending = ""
        if self._calls and not rest.strip():
            rest = ""
        return rest, self._calls


def parse_output(text: str, tools: ToolRequest) -> tuple[str | None, list[dict[str, Any]]]:
    """A whole generation's content and tool calls (OpenAI's ``message.tool_calls``).

    Content is the text unchanged when there are no calls; with calls, the text around
    them, stripped, or None when there is none.
    """
    stream = ToolStream(tools)
    content = stream.feed(text)
    rest, calls = stream.finish()
    content += rest
    if calls:
        return content.strip() or None, calls
    return content, calls


def stream_deltas(calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The calls as ``delta.tool_calls`` entries of a streamed chunk, whole, one per call."""
    return [{"index": i, **call} for i, call in enumerate(calls)]
