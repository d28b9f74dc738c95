"""Which JSON Schemas AIBox can turn into a grammar, checked before a request is queued.

Structured output (``response_format`` with a JSON schema, and tool calls whose
arguments must parse) constrains generation with a llama.cpp grammar built from the
schema (``grammar.py``, on the worker). The converter honours most of what apps send
but silently drops some keywords; a schema that relies on one of those would get output
that does not validate, with a 200. ``check`` refuses such a schema up front, naming the
keyword and where it is, so the app learns at once instead of in production.

Plain Python, no llama.cpp: the web process runs it on every such request.
"""

from __future__ import annotations

import math
from typing import Any

TYPES = {"object", "array", "string", "number", "integer", "boolean", "null"}
# Formats the converter turns into a grammar; anything else would be an unconstrained string.
FORMATS = {"date", "time", "date-time", "uuid", "uuid1", "uuid2", "uuid3", "uuid4", "uuid5"}
# Keywords that describe and do not constrain: accepted and ignored, as OpenAI does.
ANNOTATIONS = {
    "title",
    "description",
    "$schema",
    "$id",
    "$comment",
    "default",
    "examples",
    "deprecated",
    "readOnly",
    "writeOnly",
    "strict",
}
# Containers of named schemas that "$ref" points into.
DEFINITIONS = {"$defs", "definitions"}
HONOURED = {
    "type",
    "$ref",
    "anyOf",
    "oneOf",
    "allOf",
    "const",
    "enum",
    "properties",
    "required",
    "additionalProperties",
    "items",
    "prefixItems",
    "minItems",
    "maxItems",
    "pattern",
    "format",
    "minLength",
    "maxLength",
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "exclusiveMaximum",
}
BOUNDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")
# The grammar for an integer range spells out its digits; beyond this the grammar grows
# without making answers any better.
MAX_DIGITS = 15
MAX_DEPTH = 32


class UnsupportedSchema(ValueError):
    """A schema that AIBox cannot enforce; ``path`` is a JSON pointer to the keyword."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{message} (at {path or '/'})")
        self.path = path


def check(schema: Any, path: str = "") -> None:
    """Raise ``UnsupportedSchema`` for anything in ``schema`` the grammar cannot honour."""
    _check(schema, path, 0)


def _check(schema: Any, path: str, depth: int) -> None:
    if schema is True or schema == {}:
        return  # any JSON value
    if not isinstance(schema, dict):
        raise UnsupportedSchema(path, "A schema must be a JSON object")
    if depth > MAX_DEPTH:
        raise UnsupportedSchema(path, f"The schema is nested more than {MAX_DEPTH} levels deep")
    for keyword in schema:
        if keyword not in HONOURED and keyword not in ANNOTATIONS and keyword not in DEFINITIONS:
            raise UnsupportedSchema(
                f"{path}/{keyword}",
                f"The JSON Schema keyword '{keyword}' is not supported by structured output",
            )
    kind = schema.get("type")
    kinds = kind if isinstance(kind, list) else [kind] if kind is not None else []
    for name in kinds:
        if name not in TYPES:
            raise UnsupportedSchema(f"{path}/type", f"Unknown type {name!r}")
    ref = schema.get("$ref")
    if ref is not None and (not isinstance(ref, str) or not ref.startswith("#/")):
        raise UnsupportedSchema(
            f"{path}/$ref", "Only references within the schema ('#/...') are supported"
        )
    if ref is not None and len(schema.keys() - ANNOTATIONS - {"$ref"}) > 0:
        raise UnsupportedSchema(
            f"{path}/$ref", "Keywords beside '$ref' are not supported; move them into its target"
        )
    fmt = schema.get("format")
    if fmt is not None and fmt not in FORMATS:
        raise UnsupportedSchema(
            f"{path}/format",
            f"The string format {fmt!r} is not supported (supported: {', '.join(sorted(FORMATS))})",
        )
    for keyword in ("minLength", "maxLength"):
        if keyword in schema and (kind != "string" or "pattern" in schema or "format" in schema):
            raise UnsupportedSchema(
                f"{path}/{keyword}",
                f'\'{keyword}\' is supported only on a plain string schema ("type": "string")',
            )
    pattern = schema.get("pattern")
    if pattern is not None and (
        not isinstance(pattern, str) or not pattern.startswith("^") or not pattern.endswith("$")
    ):
        raise UnsupportedSchema(
            f"{path}/pattern", "A 'pattern' must be anchored: start with '^' and end with '$'"
        )
    if any(bound in schema for bound in BOUNDS):
        _check_bounds(schema, path, kind)
    if "allOf" in schema:
        _check_all_of(schema, path)
    for keyword in ("anyOf", "oneOf", "allOf", "prefixItems"):
        if keyword in schema:
            items = schema[keyword]
            if not isinstance(items, list) or not items:
                raise UnsupportedSchema(
                    f"{path}/{keyword}", f"'{keyword}' must be a non-empty list"
                )
            for i, sub in enumerate(items):
                _check(sub, f"{path}/{keyword}/{i}", depth + 1)
    for keyword in ("properties", *DEFINITIONS):
        if keyword in schema:
            named = schema[keyword]
            if not isinstance(named, dict):
                raise UnsupportedSchema(f"{path}/{keyword}", f"'{keyword}' must be an object")
            for name, sub in named.items():
                _check(sub, f"{path}/{keyword}/{_escape(name)}", depth + 1)
    items = schema.get("items")
    if isinstance(items, list):
        for i, sub in enumerate(items):
            _check(sub, f"{path}/items/{i}", depth + 1)
    elif items is not None and items is not False:
        _check(items, f"{path}/items", depth + 1)
    extra = schema.get("additionalProperties")
    if isinstance(extra, dict):
        _check(extra, f"{path}/additionalProperties", depth + 1)
    required = schema.get("required")
    if required is not None and (
        not isinstance(required, list) or not all(isinstance(r, str) for r in required)
    ):
        raise UnsupportedSchema(f"{path}/required", "'required' must be a list of names")
    for keyword in ("minItems", "maxItems", "minLength", "maxLength"):
        value = schema.get(keyword)
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or value < 0
        ):
            raise UnsupportedSchema(f"{path}/{keyword}", f"'{keyword}' must be a whole number")
    if "enum" in schema and (not isinstance(schema["enum"], list) or not schema["enum"]):
        raise UnsupportedSchema(f"{path}/enum", "'enum' must be a non-empty list")


def _check_bounds(schema: dict[str, Any], path: str, kind: Any) -> None:
    for bound in BOUNDS:
        value = schema.get(bound)
        if value is None:
            continue
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
        ):
            raise UnsupportedSchema(f"{path}/{bound}", f"'{bound}' must be a number")
        if abs(value) >= 10**MAX_DIGITS:
            raise UnsupportedSchema(
                f"{path}/{bound}", f"'{bound}' must have at most {MAX_DIGITS} digits"
            )
    if kind == "integer":
        low, high = integer_bounds(schema)
        if low is not None and high is not None and low > high:
            raise UnsupportedSchema(path, "No integer lies within these bounds")
        return
    if kind == "number":
        # A number's range is enforced on its integer part: [minimum, maximum] with whole,
        # non-negative bounds (a score from 0 to 1, a price, a percentage).
        for bound in ("exclusiveMinimum", "exclusiveMaximum"):
            if bound in schema:
                raise UnsupportedSchema(
                    f"{path}/{bound}",
                    f"'{bound}' is supported on integers; on numbers use minimum/maximum",
                )
        low, high = schema.get("minimum"), schema.get("maximum")
        if low is None or low < 0 or low != int(low) or (high is not None and high != int(high)):
            raise UnsupportedSchema(
                f"{path}/minimum"
                if low is None or low < 0 or low != int(low)
                else f"{path}/maximum",
                "Bounds on a number are supported when they are whole numbers and 'minimum' is "
                "given and at least 0 (use an integer schema for other ranges)",
            )
        if high is not None and low > high:
            raise UnsupportedSchema(path, "No number lies within these bounds")
        return
    bound = next(b for b in BOUNDS if b in schema)
    raise UnsupportedSchema(
        f"{path}/{bound}", f'\'{bound}\' needs "type": "integer" or "number" beside it'
    )


def integer_bounds(schema: dict[str, Any]) -> tuple[int | None, int | None]:
    """The smallest and largest integer a schema's bounds allow (None: unbounded)."""
    low = high = None
    if "minimum" in schema:
        low = math.ceil(schema["minimum"])
    if "exclusiveMinimum" in schema:
        candidate = math.floor(schema["exclusiveMinimum"]) + 1
        low = candidate if low is None else max(low, candidate)
    if "maximum" in schema:
        high = math.floor(schema["maximum"])
    if "exclusiveMaximum" in schema:
        candidate = math.ceil(schema["exclusiveMaximum"]) - 1
        high = candidate if high is None else min(high, candidate)
    return low, high


def _check_all_of(schema: dict[str, Any], path: str) -> None:
    # The converter merges allOf's object parts (their properties and required names);
    # anything else in a part would be dropped.
    if schema.keys() - ANNOTATIONS - {"allOf", "type"} or schema.get("type", "object") != "object":
        raise UnsupportedSchema(
            f"{path}/allOf", "'allOf' is supported only as the whole of an object schema"
        )
    for i, part in enumerate(schema["allOf"]):
        if not isinstance(part, dict) or part.keys() - ANNOTATIONS - {
            "type",
            "properties",
            "required",
            "$ref",
        }:
            raise UnsupportedSchema(
                f"{path}/allOf/{i}",
                "Each part of 'allOf' may hold only 'properties', 'required' and '$ref'",
            )


def _escape(name: str) -> str:
    return name.replace("~", "~0").replace("/", "~1")
