"""Token counts with a model's own tokenizer, through llama.cpp (vocabulary only)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import Any


@lru_cache(maxsize=4)
def _vocab(model_path: Path) -> tuple[Any, threading.Lock]:
    from llama_cpp import Llama  # heavy import, only when counting tokens

    llm = Llama(model_path=str(model_path), vocab_only=True, verbose=False)
    return llm, threading.Lock()


def llama_token_counter(model_path: Path) -> Callable[[str], int]:
    """A function giving the number of tokens the model at model_path reads for a text
    (with the beginning-of-sequence token, as training sees it). The vocabulary is
    loaded once per path and process."""
    llm, lock = _vocab(Path(model_path).resolve())
    tokenize = llm.tokenize

    def count(text: str) -> int:
        data = text.encode("utf-8", "replace")
        with lock:
            return len(tokenize(data, add_bos=True, special=False))

    return count
