"""JSON Schema to a llama.cpp grammar (GBNF), on the worker.

llama-cpp-python's converter does the work; AIBox adds what it leaves out and apps
rely on: integer ranges (``minimum``/``maximum`` and their exclusive forms) and whole
number bounds on numbers, spelled out digit by digit so every generated value is in
range. ``json_schema.check`` has refused what neither can honour before the request
was queued.
"""

from __future__ import annotations

import json
from typing import Any

from llama_cpp.llama_grammar import RESERVED_NAMES, SchemaConverter

from workers.inference.json_schema import BOUNDS, MAX_DIGITS, integer_bounds

# What JSON mode ({"type": "json_object"}) asks for: any JSON object.
JSON_OBJECT: dict[str, Any] = {"type": "object"}


class _Converter(SchemaConverter):
    def visit(self, schema: dict[str, Any], name: str) -> str:
        kind = schema.get("type") if isinstance(schema, dict) else None
        if (
            kind in ("integer", "number")
            and any(bound in schema for bound in BOUNDS)
            and "enum" not in schema
            and "const" not in schema
        ):
            rule_name = name + "-" if name in RESERVED_NAMES else name or "root"
            low, high = integer_bounds(schema)
            body = integer_range(low, high) if kind == "integer" else number_range(low, high)
            return self._add_rule(rule_name, f"( {body} ) space")
        return super().visit(schema, name)


def grammar(schema: dict[str, Any]) -> str:
    """The GBNF grammar (root rule ``root``) whose sentences are the schema's JSON values."""
    converter = _Converter(prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False)
    # The converter rewrites "$ref"s in place; work on a copy of the request's schema.
    schema = converter.resolve_refs(json.loads(json.dumps(schema)), "input")
    converter.visit(schema, "")
    return converter.format_grammar()


def integer_range(low: int | None, high: int | None) -> str:
    """GBNF alternatives for the integers from ``low`` to ``high`` (None: no bound),
    written without leading zeros, as JSON writes them."""
    largest = 10**MAX_DIGITS - 1
    low = -largest if low is None else low
    high = largest if high is None else high
    parts = []
    if low < 0:
        # -x for x from max(1, -high) to -low
        magnitudes = _natural_range(max(1, -high), -low)
        parts.append(f'"-" ( {magnitudes} )')
    if high >= 0:
        parts.append(_natural_range(max(0, low), high))
    return " | ".join(parts)


def number_range(low: int, high: int | None) -> str:
    """Numbers from ``low`` (whole, at least 0) to ``high`` (whole, or None): an integer
    part in range and an optional fraction, which the largest value may have only as zeros."""
    fraction = '( "." [0-9] ' + " ".join(["[0-9]?"] * (MAX_DIGITS - 1)) + " )?"
    if high is None:
        return f"( {integer_range(low, None)} ) {fraction}"
    zeros = '( "." "0" ' + " ".join(['"0"?'] * (MAX_DIGITS - 1)) + " )?"
    top = f'"{high}" {zeros}'
    if low == high:
        return top
    return f"( {integer_range(low, high - 1)} ) {fraction} | {top}"


def _natural_range(low: int, high: int) -> str:
    """Alternatives for the whole numbers low..high (0 <= low <= high), no leading zeros."""
    parts = []
    for digits in range(len(str(low)), len(str(high)) + 1):
        first = 0 if digits == 1 else 10 ** (digits - 1)
        a, b = max(low, first), min(high, 10**digits - 1)
        if a <= b:
            parts += _same_length(str(a), str(b))
    return " | ".join(parts)


def _same_length(low: str, high: str) -> list[str]:
    """Sequences for the digit strings from ``low`` to ``high``, both of one length."""
    rest = len(low) - 1
    any_digits = " [0-9]" * rest
    if low == high:
        return [f'"{low}"']
    if low[0] == high[0]:
        return [f'"{low[0]}" ( {" | ".join(_same_length(low[1:], high[1:]))} )']
    if low[1:] == "0" * rest and high[1:] == "9" * rest:
        return [f"[{low[0]}-{high[0]}]{any_digits}"]
    parts = []
    start, end = int(low[0]), int(high[0])
    if low[1:] != "0" * rest:
        parts.append(f'"{low[0]}" ( {" | ".join(_same_length(low[1:], "9" * rest))} )')
        start += 1
    if high[1:] != "9" * rest:
        end -= 1
    if start <= end:
        parts.append(f"[{start}-{end}]{any_digits}")
    if high[1:] != "9" * rest:
        parts.append(f'"{high[0]}" ( {" | ".join(_same_length("0" * rest, high[1:]))} )')
    return parts
