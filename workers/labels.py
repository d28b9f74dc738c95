"""Worker labels: what a worker says about itself (``gpu=a100``, ``zone=b``, ``spot``),
and how a deployment's wanted and unwanted labels match them.

A label is a bare word or ``key=value``. A key appears at most once in a list. A wanted
or unwanted label with a value matches only that value; a bare word matches the worker
label of that name whatever its value (``gpu`` matches ``gpu=a100`` and ``gpu``). Plain
Python: the worker's settings, the heartbeat and the control plane's checks share it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

# Letters, digits, '.', '_', '-' (and '/' in a key, as in ``nvidia.com/gpu``), starting
# with a letter or digit, up to 63 characters each side.
_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,62}")
_VALUE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")

SYNTAX = (
    "a label is a word or key=value: letters, digits, '.', '_' and '-' (and '/' in the "
    "key), starting with a letter or digit, up to 63 characters each"
)


def label_key(label: str) -> str:
    return label.split("=", 1)[0]


def label_check(label: str) -> str:
    """``label`` if it is well formed; ValueError saying why otherwise."""
    key, has_value, value = label.partition("=")
    if not _KEY.fullmatch(key) or (has_value and not _VALUE.fullmatch(value)):
        raise ValueError(f"'{label}' is not a label: {SYNTAX}.")
    return label


def labels_check(labels: Iterable[str], *, limit: int | None = None) -> list[str]:
    """The labels, each well formed and each key once; ValueError saying why otherwise."""
    labels = list(labels)
    if limit is not None and len(labels) > limit:
        raise ValueError(f"At most {limit} labels, not {len(labels)}.")
    seen: dict[str, str] = {}
    for label in labels:
        if not isinstance(label, str):
            raise ValueError(f"{label!r} is not a label: {SYNTAX}.")
        label_check(label)
        key = label_key(label)
        if key in seen:
            raise ValueError(f"'{seen[key]}' and '{label}' give '{key}' twice; give it once.")
        seen[key] = label
    return labels


def labels_parse(text: str, *, limit: int | None = None) -> list[str]:
    """Comma-separated labels (``gpu=a100, zone=b, spot``), blanks ignored, checked."""
    return labels_check([part.strip() for part in text.split(",") if part.strip()], limit=limit)


def _has(worker: dict[str, str | None], label: str) -> bool:
    key, has_value, value = label.partition("=")
    if key not in worker:
        return False
    return not has_value or worker[key] == value


def labels_match(worker: Iterable[str], *, wanted: Iterable[str], unwanted: Iterable[str]) -> bool:
    """Whether a worker with the labels ``worker`` has every wanted label and no unwanted
    one."""
    held = {label_key(label): label.partition("=")[2] or None for label in worker}
    return all(_has(held, label) for label in wanted) and not any(
        _has(held, label) for label in unwanted
    )
