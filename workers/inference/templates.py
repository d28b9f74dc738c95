"""Chat templates: which one a replica uses, and turning messages into a prompt.

Templates are Jinja, rendered by llama-cpp-python's own sandboxed formatter, the same
way Hugging Face tokenizers render ``chat_template``. Precedence, most specific first:

1. the deployment's override (an admin set it on purpose);
2. the template stored in the GGUF file (``tokenizer.chat_template``);
3. a default for the model's architecture (the bundled Gemma GGUF ships none).

A model with none of these still serves completions; chat requests get a clear error.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# Gemma's turn format: "user" and "model" turns; a system message has no turn of its
# own and is prepended to the first user turn.
GEMMA_TEMPLATE = """{{ bos_token }}
{%- set system = '' -%}
{%- if messages and messages[0]['role'] == 'system' -%}
  {%- set system = messages[0]['content'] + '\\n\\n' -%}
  {%- set turns = messages[1:] -%}
{%- else -%}
  {%- set turns = messages -%}
{%- endif -%}
{%- for message in turns -%}
  {%- if message['role'] not in ('user', 'assistant') -%}
    {{ raise_exception("Gemma knows the roles system, user and assistant, not '"
                       ~ message['role'] ~ "'.") }}
  {%- endif -%}
  {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
    {{ raise_exception('After an optional system message, turns must alternate '
                       ~ 'user, assistant, user, ...') }}
  {%- endif -%}
  {{ '<start_of_turn>' ~ ('model' if message['role'] == 'assistant' else 'user') ~ '\\n' }}
  {{- (system if loop.first else '') ~ message['content'] | trim ~ '<end_of_turn>\\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}{%- endif -%}"""

ARCHITECTURE_DEFAULTS: dict[str, tuple[str, list[str]]] = {
    # architecture: (template, extra stop strings)
    "gemma": (GEMMA_TEMPLATE, ["<end_of_turn>"]),
    "gemma2": (GEMMA_TEMPLATE, ["<end_of_turn>"]),
    "gemma3": (GEMMA_TEMPLATE, ["<end_of_turn>"]),
}


class TemplateError(Exception):
    """The messages cannot be rendered (bad roles or order, or no template at all)."""


@dataclass(frozen=True)
class ChatTemplate:
    source: str  # "deployment", "gguf" or "default:<architecture>"
    template: str
    stop: tuple[str, ...]


def choose(*, override: str, gguf_template: str | None, architecture: str) -> ChatTemplate | None:
    if override.strip():
        return ChatTemplate("deployment", override, ())
    if gguf_template:
        return ChatTemplate("gguf", gguf_template, ())
    if architecture in ARCHITECTURE_DEFAULTS:
        template, stop = ARCHITECTURE_DEFAULTS[architecture]
        return ChatTemplate(f"default:{architecture}", template, tuple(stop))
    return None


@dataclass(frozen=True)
class RenderedPrompt:
    text: str
    stop: list[str]
    # Whether the template already wrote the BOS token (then the tokenizer must not).
    added_bos: bool


def render(
    template: ChatTemplate, messages: list[dict[str, str]], *, bos_token: str, eos_token: str
) -> RenderedPrompt:
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    formatter = Jinja2ChatFormatter(
        template=template.template,
        eos_token=eos_token,
        bos_token=bos_token,
        add_generation_prompt=True,
    )
    try:
        result = formatter(messages=messages)
    except Exception as exc:  # noqa: BLE001 - jinja raises many kinds; all are the caller's input
        raise TemplateError(f"Could not apply the chat template: {exc}") from exc
    stop = [s for s in (result.stop or []) if isinstance(s, str)]
    if isinstance(result.stop, str):
        stop = [result.stop]
    return RenderedPrompt(
        text=result.prompt,
        stop=list(dict.fromkeys([*stop, *template.stop])),
        added_bos=bool(bos_token) and result.prompt.startswith(bos_token),
    )


# Tokenizes text: (text, special) -> token ids, without BOS. ``special`` parses the
# model's control-token texts (``<end_of_turn>``) into control tokens.
Tokenize = Callable[[str, bool], list[int]]


def prompt_tokens(
    tokenize: Tokenize, rendered: RenderedPrompt, messages: list[dict[str, Any]]
) -> list[int]:
    """The rendered prompt's tokens, with each message's content taken literally.

    The template's own markup is parsed for control tokens, but a user who writes
    ``<end_of_turn><start_of_turn>model`` into a message must not forge a turn: such a
    content is tokenized as plain text. Contents without control-token text (nearly all)
    leave the prompt exactly as one tokenization of the whole text would make it.
    """
    text = rendered.text
    literal: list[tuple[int, int]] = []
    cursor = 0
    for message in messages:
        content = message.get("content")
        if not isinstance(content, str) or not content.strip():
            continue
        if tokenize(content, True) == tokenize(content, False):
            continue  # no control-token text in it: nothing to keep literal
        # Templates may trim a content; find it as written, else trimmed.
        start, found = text.find(content, cursor), content
        if start < 0:
            found = content.strip()
            start = text.find(found, cursor)
        if start < 0:
            raise TemplateError(
                "A message contains the model's control-token text, and this chat template "
                "changes message contents, so it cannot be passed on as plain text."
            )
        literal.append((start, start + len(found)))
        cursor = start + len(found)
    if not literal:
        return tokenize(text, True)
    tokens: list[int] = []
    position = 0
    for start, end in literal:
        tokens += tokenize(text[position:start], True) + tokenize(text[start:end], False)
        position = end
    return tokens + tokenize(text[position:], True)
