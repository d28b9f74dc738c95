"""Dataset rows to training examples: token ids and labels with the prompt masked.

Every shape except ``text`` goes through the chat template, so a fine-tuned model sees
its prompts exactly as serving will render them (same template, same renderer:
llama-cpp-python's Jinja formatter):

- chat: the conversation as is;
- instruction: one user turn (instruction, then the input after a blank line if any)
  answered by the output;
- prompt_completion: one user turn (the prompt) answered by the completion;
- text: BOS + the text + EOS, no template, every token learned.

Only what the model should learn to write carries a label: each assistant turn's
content and its end-of-turn marker. Everything else (BOS, the user turns, the template's
turn headers, the whitespace after an end-of-turn) is labelled -100, which the loss
ignores.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from workers.finetune.spec import FinetuneError

IGNORE = -100


class DataError(FinetuneError):
    """A row cannot be turned into a training example; the message names its line."""


@dataclass(frozen=True)
class Example:
    input_ids: list[int]
    labels: list[int]

    @property
    def learned_tokens(self) -> int:
        # The model predicts token i from tokens < i: position 0 is never a target.
        return sum(1 for label in self.labels[1:] if label != IGNORE)


def read_rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, row) for each non-blank line of a JSON Lines file."""
    with path.open(encoding="utf-8") as fh:
        for number, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path.name} line {number}: not valid JSON ({exc.msg}).") from exc
            if not isinstance(row, dict):
                raise DataError(f"{path.name} line {number}: a row must be a JSON object.")
            yield number, row


def row_messages(row: dict[str, Any], shape: str) -> list[dict[str, str]]:
    """The conversation a non-text row stands for."""
    if shape == "chat":
        messages = row.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ValueError('a chat row needs a non-empty "messages" list')
        for message in messages:
            if not isinstance(message, dict) or not isinstance(message.get("content"), str):
                raise ValueError('each message needs a "role" and a text "content"')
        return [{"role": str(m.get("role")), "content": m["content"]} for m in messages]
    if shape == "instruction":
        instruction, output = _text(row, "instruction"), _text(row, "output")
        extra = row.get("input") or ""
        if not isinstance(extra, str):
            raise ValueError('"input" must be text')
        prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]
    if shape == "prompt_completion":
        return [
            {"role": "user", "content": _text(row, "prompt")},
            {"role": "assistant", "content": _text(row, "completion")},
        ]
    raise ValueError(f"unknown shape {shape!r}")


def _text(row: dict[str, Any], key: str) -> str:
    value = row.get(key)
    if not isinstance(value, str):
        raise ValueError(f'the row needs a text "{key}"')
    return value


class Encoder:
    """Turns rows into Examples with one tokenizer and chat template."""

    def __init__(self, tokenizer, *, template: str | None, max_seq_length: int) -> None:
        self.tokenizer = tokenizer
        self.template = template
        self.max_seq_length = max_seq_length
        self._formatters: dict[bool, Any] = {}

    def render(self, messages: list[dict[str, str]], *, add_generation_prompt: bool) -> str:
        if self.template is None:
            raise FinetuneError(
                "This base model has no chat template and its architecture has no default: "
                "set a chat template on the job."
            )
        if add_generation_prompt not in self._formatters:
            from llama_cpp.llama_chat_format import Jinja2ChatFormatter

            self._formatters[add_generation_prompt] = Jinja2ChatFormatter(
                template=self.template,
                bos_token=self.tokenizer.bos_token or "",
                eos_token=self.tokenizer.eos_token or "",
                add_generation_prompt=add_generation_prompt,
            )
        return self._formatters[add_generation_prompt](messages=messages).prompt

    def chat_spans(self, messages: list[dict[str, str]]) -> tuple[str, list[tuple[int, int]]]:
        """The rendered conversation and the character spans the model must learn.

        A turn's span is what rendering that turn adds after the prompt that asks for
        it (the text after the generation prompt), without trailing whitespace: the
        content and the end-of-turn marker. This works for any template whose rendering
        of a conversation's first turns is a prefix of the whole, which chat templates
        are by design; one that is not gets a clear error instead of a wrong mask.
        """
        full = self.render(messages, add_generation_prompt=False)
        spans = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            asked = self.render(messages[:i], add_generation_prompt=True) if i else ""
            through = self.render(messages[: i + 1], add_generation_prompt=False)
            if not (through.startswith(asked) and full.startswith(through)):
                raise FinetuneError(
                    "The chat template renders a conversation's first turns differently "
                    "from the whole conversation, so the prompt cannot be masked."
                )
            end = len(through.rstrip())
            if end > len(asked):
                spans.append((len(asked), end))
        return full, spans

    def encode_row(self, row: dict[str, Any], shape: str) -> Example:
        tok = self.tokenizer
        if shape == "text":
            text = _text(row, "text")
            ids = tok(text, add_special_tokens=False)["input_ids"]
            ids = [tok.bos_token_id, *ids, tok.eos_token_id]
            labels = [IGNORE, *ids[1:]]
        else:
            full, spans = self.chat_spans(row_messages(row, shape))
            encoded = tok(full, add_special_tokens=False, return_offsets_mapping=True)
            ids = list(encoded["input_ids"])
            labels = [
                token if any(start <= begin < end for start, end in spans) else IGNORE
                for token, (begin, _) in zip(ids, encoded["offset_mapping"], strict=True)
            ]
            # Serving adds BOS when the template did not write one (templates.render).
            if tok.bos_token_id is not None and (not ids or ids[0] != tok.bos_token_id):
                ids, labels = [tok.bos_token_id, *ids], [IGNORE, *labels]
        return Example(ids[: self.max_seq_length], labels[: self.max_seq_length])

    def encode_file(self, path: Path, shape: str) -> tuple[list[Example], int]:
        """(examples, dropped): rows left with nothing to learn after truncation are dropped."""
        from jinja2 import TemplateError

        examples, dropped = [], 0
        for number, row in read_rows(path):
            try:
                example = self.encode_row(row, shape)
            # ValueError: a bad row, or the template's raise_exception (wrong roles/order).
            except (ValueError, TemplateError) as exc:
                raise DataError(f"{path.name} line {number}: {exc}") from exc
            if example.learned_tokens:
                examples.append(example)
            else:
                dropped += 1
        return examples, dropped


def collate(examples: list[Example], *, pad_id: int) -> dict[str, Any]:
    """Right-padded tensors for one micro-batch; padding is masked and unlabelled."""
    import torch

    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
