"""Token counts with a model's own tokenizer, through llama.cpp (vocabulary only)."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path
from typing import Any


class TokenCounter:
    """counter(text) is the number of tokens the model reads for text, with its
    beginning-of-sequence token, as training sees it. counter.many(texts) counts a batch
    on several threads: llama.cpp's tokenizer runs outside the GIL and, at about 1 MB/s
    a thread for a large vocabulary such as Gemma's, is by far the slowest part of
    validating a dataset."""

    def __init__(self, llm: Any, threads: int | None = None) -> None:
        self.llm = llm
        self.threads = threads or min(8, len(os.sched_getaffinity(0)))
        self._pool: ThreadPoolExecutor | None = None
        self._pool_pid = 0
        self._direct = None
        try:
            import llama_cpp

            vocab = llm._model.vocab  # noqa: SLF001 - see _count_direct
            self._direct = (llama_cpp, vocab)
        except (ImportError, AttributeError):
            pass

    def __call__(self, text: str) -> int:
        data = text.encode("utf-8", "replace")
        if self._direct is not None:
            return self._count_direct(data)
        return len(self.llm.tokenize(data, add_bos=True, special=False))

    def _count_direct(self, data: bytes) -> int:
        # Llama.tokenize sizes its buffer from the training context, which a vocabulary-
        # only load reports as 0, so every call tokenizes twice; a buffer as long as the
        # text (a token is never shorter than a byte) tokenizes once.
        llama_cpp, vocab = self._direct
        size = len(data) + 8
        buf = (llama_cpp.llama_token * size)()
        n = llama_cpp.llama_tokenize(vocab, data, len(data), buf, size, True, False)
        if n < 0:
            return len(self.llm.tokenize(data, add_bos=True, special=False))
        return n

    def many(self, texts: list[str]) -> list[int]:
        if self.threads <= 1 or len(texts) < 2 * self.threads:
            return [self(text) for text in texts]
        if self._pool is None or self._pool_pid != os.getpid():
            # A pool's threads do not survive a fork (Celery's prefork workers).
            self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="tokenize")
            self._pool_pid = os.getpid()
        step = -(-len(texts) // self.threads)
        chunks = [texts[i : i + step] for i in range(0, len(texts), step)]
        counts: list[int] = []
        for part in self._pool.map(lambda chunk: [self(t) for t in chunk], chunks):
            counts.extend(part)
        return counts


@lru_cache(maxsize=4)
def _vocab(model_path: Path) -> Any:
    from llama_cpp import Llama  # heavy import, only when counting tokens

    return Llama(model_path=str(model_path), vocab_only=True, verbose=False)


def llama_token_counter(model_path: Path, threads: int | None = None) -> TokenCounter:
    """A token counter for the model at model_path (the vocabulary is loaded once per
    path and process)."""
    return TokenCounter(_vocab(Path(model_path).resolve()), threads)
