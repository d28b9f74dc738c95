"""One row: from a source object (a JSON object, a CSV record, a Parquet row) to a
canonical row of one shape, or the first reason it is not one."""

from __future__ import annotations

from typing import Any

import orjson

from .core import FIELDS, REQUIRED, SIGNATURE, RowError, Shape, ValidationOptions

_MISSING = object()


class BadRow(Exception):
    def __init__(self, code: str, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.field = field


_TYPE_NAMES = {
    str: "string",
    int: "number",
    float: "number",
    bool: "boolean",
    list: "list",
    dict: "object",
    type(None): "null",
}


def type_name(value: Any) -> str:
    name = _TYPE_NAMES.get(type(value))
    if name is not None:
        return name
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list | tuple):
        return "list"
    if isinstance(value, dict):
        return "object"
    if isinstance(value, bytes | bytearray):
        return "bytes"
    return type(value).__name__


def show(value: str, limit: int = 40) -> str:
    """A value quoted for an error message, cut short."""
    text = value if len(value) <= limit else value[: limit - 1] + "…"
    return repr(text)


def row_text(row: dict[str, Any], shape: Shape) -> str:
    """The text of a canonical row that its length and personal data are measured on."""
    if shape is Shape.CHAT:
        return "".join([f"{m['role']}: {m['content']}\n" for m in row["messages"]])
    if shape is Shape.INSTRUCTION:
        return f"{row['instruction']}\n{row['input']}\n{row['output']}"
    if shape is Shape.PROMPT_COMPLETION:
        return row["prompt"] + row["completion"]
    return row["text"]


def scan_text(row: dict[str, Any], shape: Shape, text: str | None = None) -> str:
    """The text personal data is looked for in: row_text (passed in when it is already
    built), except that a prompt and its completion are kept apart, so that the end of
    one and the start of the other never make up (or hide) a number or an address."""
    if shape is Shape.PROMPT_COMPLETION:
        return f"{row['prompt']}\n{row['completion']}"
    return text if text is not None else row_text(row, shape)


def detect_shape(view: dict[str, Any]) -> Shape | None:
    for key, shape in SIGNATURE:
        if key in view:
            return shape
    return None


class RowChecker:
    """Maps, detects and validates rows in file order.

    Until the file's shape is known (given in the options, or set by the first valid
    row), each row is judged as the shape its keys suggest; after that a row of another
    shape is a `mixed_shape` error.
    """

    def __init__(
        self,
        options: ValidationOptions,
        *,
        json_cells: bool = False,
        shape: Shape | None = None,
        shape_row: int = 0,
        shape_line: int | None = None,
    ) -> None:
        self.options = options
        self.roles = options.roles
        self.roles_text = ", ".join(sorted(options.roles))
        self.shape: Shape | None = options.shape or (Shape(shape) if shape else None)
        # The data row (0-based) whose validity set the shape; rows before it are judged
        # by their own keys, as validate() did when it first read them.
        self.shape_row = 0 if options.shape else shape_row
        self.shape_line = None if options.shape else shape_line
        self.first_detected: Shape | None = None
        # CSV and Parquet cells hold chat messages as JSON text.
        self.json_cells = json_cells
        mapping = options.column_mapping
        self.pairs = [(f, mapping.get(f, f)) for f in _ALL_FIELDS]
        self.mapped = bool(mapping)
        self.labels = {
            f: (f"{f} (column {mapping[f]!r})" if f in mapping and mapping[f] != f else f)
            for f in _ALL_FIELDS
        }

    def check(self, obj: Any, line: int, number: int) -> tuple[Shape, dict[str, Any], int]:
        """Return (shape, canonical row, length of its row_text in characters); raise
        BadRow for the row's first problem."""
        if not isinstance(obj, dict):
            raise BadRow("not_object", f"the row is a JSON {type_name(obj)}, not an object")
        view = {f: obj[src] for f, src in self.pairs if src in obj} if self.mapped else obj
        file_shape = self.shape
        if file_shape is not None and number >= self.shape_row:
            shape = file_shape
            keys = _KEYS[file_shape]
            if keys[0] not in view and (len(keys) == 1 or keys[1] not in view):
                other = detect_shape(view)
                if other is not None:
                    raise BadRow(
                        "mixed_shape",
                        f"the row is {other.value} ({', '.join(REQUIRED[other])}) but the "
                        f"dataset is {file_shape.value} ({', '.join(REQUIRED[file_shape])})"
                        + (f", set by line {self.shape_line}" if self.shape_line else ""),
                    )
            return (shape, *self.canonical(view, shape))
        shape = detect_shape(view)
        if shape is None:
            keys = ", ".join(list(map(str, obj))[:8]) or "none"
            raise BadRow(
                "unknown_shape",
                f"the row matches no dataset shape (its keys: {keys}); a row needs "
                "messages, instruction and output, prompt and completion, or text",
            )
        if self.first_detected is None:
            self.first_detected = shape
        row, chars = self.canonical(view, shape)
        if file_shape is None:
            self.shape = shape
            self.shape_row = number
            self.shape_line = line
        return shape, row, chars

    def canonical(self, view: dict[str, Any], shape: Shape) -> tuple[dict[str, Any], int]:
        """The canonical row, and the length of its row_text (counted here, where it is
        cheap, so that a row's text need only be built when something reads it)."""
        if shape is Shape.CHAT:
            messages, chars = self.messages(view)
            return {"messages": messages}, chars
        if shape is Shape.INSTRUCTION:
            instruction = self.string(view, "instruction")
            value = view.get("input")
            if value is None:
                value = ""
            elif not isinstance(value, str):
                value = self.string(view, "input", allow_empty=True)
            output = self.string(view, "output")
            chars = len(instruction) + len(value) + len(output) + 2
            return {"instruction": instruction, "input": value, "output": output}, chars
        if shape is Shape.PROMPT_COMPLETION:
            prompt = self.string(view, "prompt")
            completion = self.string(view, "completion")
            return {"prompt": prompt, "completion": completion}, len(prompt) + len(completion)
        text = self.string(view, "text")
        return {"text": text}, len(text)

    def string(self, view: dict[str, Any], name: str, allow_empty: bool = False) -> str:
        value = view.get(name, _MISSING)
        label = self.labels[name]
        if value is _MISSING:
            raise BadRow("missing_field", f"{label} is missing", name)
        if isinstance(value, bytes | bytearray):
            try:
                value = value.decode("utf-8")
            except UnicodeDecodeError:
                raise BadRow("not_utf8", f"{label} is not valid UTF-8", name) from None
        if not isinstance(value, str):
            raise BadRow("wrong_type", f"{label} must be a string, not {type_name(value)}", name)
        if not allow_empty and (not value or value.isspace()):
            raise BadRow("empty_content", f"{label} is empty", name)
        return value

    def messages(self, view: dict[str, Any]) -> tuple[list[dict[str, str]], int]:
        messages = view.get("messages", _MISSING)
        label = self.labels["messages"]
        if messages is _MISSING:
            raise BadRow("missing_field", f"{label} is missing", "messages")
        if self.json_cells and isinstance(messages, str | bytes):
            try:
                messages = orjson.loads(messages)
            except orjson.JSONDecodeError as exc:
                raise BadRow(
                    "invalid_json", f"{label} is not valid JSON: {exc.msg}", "messages"
                ) from None
        if not isinstance(messages, list):
            raise BadRow(
                "wrong_type",
                f"{label} must be a list of {{role, content}} objects, not {type_name(messages)}",
                "messages",
            )
        if not messages:
            raise BadRow("empty_content", f"{label} is an empty list", "messages")
        out = []
        append = out.append
        chars = 0
        assistant = False
        roles = self.roles
        for i, message in enumerate(messages):
            # The common case in as few steps as possible; _bad_message says what is wrong.
            if type(message) is dict:
                role = message.get("role")
                content = message.get("content")
                if (
                    type(role) is str
                    and role in roles
                    and type(content) is str
                    and content
                    and not content.isspace()
                ):
                    if role == "assistant":
                        assistant = True
                    append({"role": role, "content": content})
                    chars += len(role) + len(content) + 3  # "role: content\n"
                    continue
            self._bad_message(i, message)
        if not assistant:
            raise BadRow(
                "no_assistant_turn",
                f"{label} has no assistant turn, so there is nothing to learn from",
                "messages",
            )
        return out, chars

    def _bad_message(self, i: int, message: Any) -> None:
        if not isinstance(message, dict):
            raise BadRow(
                "wrong_type",
                f"messages[{i}] must be an object, not {type_name(message)}",
                "messages",
            )
        role = message.get("role", _MISSING)
        if role is _MISSING:
            raise BadRow("missing_field", f"messages[{i}].role is missing", "messages")
        if not isinstance(role, str):
            raise BadRow(
                "wrong_type",
                f"messages[{i}].role must be a string, not {type_name(role)}",
                "messages",
            )
        if role not in self.roles:
            raise BadRow(
                "unknown_role",
                f"messages[{i}].role {show(role)} is not one of {self.roles_text}",
                "messages",
            )
        content = message.get("content", _MISSING)
        if content is _MISSING:
            raise BadRow("missing_field", f"messages[{i}].content is missing", "messages")
        if not isinstance(content, str):
            raise BadRow(
                "wrong_type",
                f"messages[{i}].content must be a string, not {type_name(content)}",
                "messages",
            )
        raise BadRow("empty_content", f"messages[{i}].content is empty", "messages")


_ALL_FIELDS = tuple(dict.fromkeys(f for fields in FIELDS.values() for f in fields))
_KEYS: dict[Shape, tuple[str, ...]] = {
    shape: tuple(key for key, s in SIGNATURE if s is shape) for shape in Shape
}


def row_error(line: int, exc: BadRow) -> RowError:
    return RowError(line=line, code=exc.code, message=exc.message, field=exc.field)
