"""GGUF metadata, read with the `gguf` package (the llama.cpp project's own reader)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any


class InvalidGGUF(Exception):
    pass


@dataclass(frozen=True)
class GGUFMetadata:
    gguf_type: str  # "model" or "adapter"
    architecture: str
    name: str
    parameter_count: int
    file_type: str
    context_length: int | None
    layers: int | None
    embedding_size: int | None
    vocab_size: int | None
    has_chat_template: bool
    licence: str
    adapter_type: str
    lora_alpha: float | None
    tensor_count: int
    # Attention shape, for sizing the KV cache before a model is placed on a worker.
    attention_heads: int | None = None
    attention_heads_kv: int | None = None
    key_length: int | None = None
    value_length: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _scalar(reader, key: str) -> Any:
    field = reader.fields.get(key)
    if field is None:
        return None
    value = field.contents()
    return value


def read_metadata(path: Path) -> GGUFMetadata:
    """Parse a GGUF file's header; raise InvalidGGUF if it is not a readable GGUF."""
    from gguf import GGUFReader, LlamaFileType  # heavy import, only when needed

    try:
        reader = GGUFReader(path, "r")
        arch = str(_scalar(reader, "general.architecture") or "")
        tokens = reader.fields.get("tokenizer.ggml.tokens")
        file_type = _scalar(reader, "general.file_type")
        try:
            file_type_name = LlamaFileType(file_type).name.removeprefix("MOSTLY_")
        except (ValueError, TypeError):
            file_type_name = "" if file_type is None else str(file_type)
        lora_alpha = _scalar(reader, "adapter.lora.alpha")
        meta = GGUFMetadata(
            gguf_type=str(_scalar(reader, "general.type") or "model"),
            architecture=arch,
            name=str(_scalar(reader, "general.name") or ""),
            parameter_count=int(sum(int(t.n_elements) for t in reader.tensors)),
            file_type=file_type_name,
            context_length=_int_or_none(_scalar(reader, f"{arch}.context_length")),
            layers=_int_or_none(_scalar(reader, f"{arch}.block_count")),
            embedding_size=_int_or_none(_scalar(reader, f"{arch}.embedding_length")),
            vocab_size=len(tokens.data)
            if tokens is not None
            else _int_or_none(_scalar(reader, f"{arch}.vocab_size")),
            has_chat_template="tokenizer.chat_template" in reader.fields,
            licence=str(_scalar(reader, "general.license") or ""),
            adapter_type=str(_scalar(reader, "adapter.type") or ""),
            lora_alpha=float(lora_alpha) if lora_alpha is not None else None,
            tensor_count=len(reader.tensors),
            attention_heads=_largest_int(_scalar(reader, f"{arch}.attention.head_count")),
            attention_heads_kv=_largest_int(_scalar(reader, f"{arch}.attention.head_count_kv")),
            key_length=_largest_int(_scalar(reader, f"{arch}.attention.key_length")),
            value_length=_largest_int(_scalar(reader, f"{arch}.attention.value_length")),
        )
    except Exception as exc:  # noqa: BLE001 - the reader raises many kinds on bad input
        raise InvalidGGUF(f"Not a valid GGUF file: {exc}") from exc
    if not meta.architecture:
        raise InvalidGGUF("Not a valid GGUF file: it names no architecture.")
    return meta


_by_sha256: dict[str, GGUFMetadata] = {}


def read_metadata_cached(path: Path, sha256: str) -> GGUFMetadata:
    """Parsing a large vocabulary takes seconds; the same content always parses the same."""
    if sha256 not in _by_sha256:
        if len(_by_sha256) > 256:
            _by_sha256.clear()
        _by_sha256[sha256] = read_metadata(path)
    return _by_sha256[sha256]


def _int_or_none(value: Any) -> int | None:
    return None if value is None else int(value)


def _largest_int(value: Any) -> int | None:
    """Some architectures store a per-layer list (head counts); size for the largest."""
    if isinstance(value, list | tuple):
        return max((int(v) for v in value), default=None)
    try:
        return None if value is None else int(value)
    except (TypeError, ValueError):
        return None
