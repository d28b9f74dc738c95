"""The vocabulary shared by the dataset modules: formats, shapes, options, errors."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path


class DatasetError(Exception):
    """A whole-file problem; the message is written to be shown to the user as is."""


class FileFormat(StrEnum):
    JSONL = "jsonl"
    CSV = "csv"
    PARQUET = "parquet"


class Shape(StrEnum):
    CHAT = "chat"
    INSTRUCTION = "instruction"
    PROMPT_COMPLETION = "prompt_completion"
    TEXT = "text"


# The canonical fields of each shape, in the order rows are written and exported.
FIELDS: dict[Shape, tuple[str, ...]] = {
    Shape.CHAT: ("messages",),
    Shape.INSTRUCTION: ("instruction", "input", "output"),
    Shape.PROMPT_COMPLETION: ("prompt", "completion"),
    Shape.TEXT: ("text",),
}
REQUIRED: dict[Shape, tuple[str, ...]] = {
    Shape.CHAT: ("messages",),
    Shape.INSTRUCTION: ("instruction", "output"),
    Shape.PROMPT_COMPLETION: ("prompt", "completion"),
    Shape.TEXT: ("text",),
}
CANONICAL_FIELDS: tuple[str, ...] = (
    "messages",
    "instruction",
    "input",
    "output",
    "prompt",
    "completion",
    "text",
)
# A row's shape is told by the first of these keys it has.
SIGNATURE: tuple[tuple[str, Shape], ...] = (
    ("messages", Shape.CHAT),
    ("instruction", Shape.INSTRUCTION),
    ("output", Shape.INSTRUCTION),
    ("prompt", Shape.PROMPT_COMPLETION),
    ("completion", Shape.PROMPT_COMPLETION),
    ("text", Shape.TEXT),
)
DEFAULT_ROLES = frozenset({"system", "user", "assistant", "tool"})


@dataclass
class ValidationOptions:
    """How to read and judge a dataset file; the same options give the same verdicts in
    validate(), read_page(), transform() and export_csv()."""

    # None: the first valid row sets the shape, and a later row of another shape is an error.
    shape: Shape | None = None
    # Canonical field -> source column (or JSON key) name.
    column_mapping: dict[str, str] = field(default_factory=dict)
    # Token count of a text; None measures lengths in characters.
    tokenize: Callable[[str], int] | None = None
    # The chosen model's context: a row with more tokens is a `too_long` error.
    max_tokens: int | None = None
    max_line_bytes: int = 8 * 1024 * 1024
    max_errors_kept: int = 200
    max_examples: int = 5
    roles: frozenset[str] = DEFAULT_ROLES
    # The preview index records where every index_every-th data row starts.
    index_every: int = 1000
    # Where the duplicate finder spills row digests; None is the system's temp directory.
    temp_dir: Path | None = None

    def __post_init__(self) -> None:
        if self.shape is not None:
            self.shape = Shape(self.shape)
        if self.max_tokens is not None and self.tokenize is None:
            raise ValueError("max_tokens needs a tokenize function to count tokens with")
        if self.index_every < 1 or self.max_line_bytes < 1:
            raise ValueError("index_every and max_line_bytes must be positive")
        unknown = sorted(set(self.column_mapping) - set(CANONICAL_FIELDS))
        if unknown:
            raise DatasetError(
                f"The column mapping names {', '.join(map(repr, unknown))}, which is not a "
                f"dataset field; the fields are: {', '.join(CANONICAL_FIELDS)}."
            )
        self.roles = frozenset(self.roles)

    @property
    def length_unit(self) -> str:
        return "characters" if self.tokenize is None else "tokens"


@dataclass
class RowError:
    """One row's problem. `line` is the line a user finds it on: the physical line of a
    JSON Lines file, the spreadsheet row of a CSV file (the header is line 1), the row
    number (from 1) of a Parquet file."""

    line: int
    code: str
    message: str
    field: str | None = None
