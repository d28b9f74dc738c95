"""GGUF metadata: the header of a GGUF file, read without its tensors' data.

The `gguf` package's ``GGUFReader`` (the llama.cpp project's own) builds a numpy view per
element of every metadata array, which for a 262,144-token vocabulary takes 12 seconds
of CPU on the 2-core box, and every upload, import, quantisation and fine-tune read the
header that way. ``read_header`` walks the same layout (GGUF versions 2 and 3, little- or
big-endian) in about a tenth of a second: string arrays (the vocabulary, merges) are
skipped and only counted, numeric arrays kept as numpy arrays.
``tests/workers/test_gguf_meta.py`` checks it against ``GGUFReader`` field by field.
"""

from __future__ import annotations

import math
import mmap
import re
import struct
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

# GGUF value types (gguf.GGUFValueType) and their scalar layouts.
_SCALARS = {
    0: "B",  # uint8
    1: "b",  # int8
    2: "H",  # uint16
    3: "h",  # int16
    4: "I",  # uint32
    5: "i",  # int32
    6: "f",  # float32
    7: "?",  # bool
    10: "Q",  # uint64
    11: "q",  # int64
    12: "d",  # float64
}
_STRING, _ARRAY = 8, 9
# The bounds llama.cpp's reader enforces: anything larger is a damaged or hostile file.
MAX_STRING_BYTES = 2**30
MAX_ARRAY_ELEMENTS = 2**30
MAX_DIMENSIONS = 4


@dataclass(frozen=True)
class StringArray:
    """A metadata array of strings, counted but not read (a vocabulary, merges)."""

    count: int

    def __len__(self) -> int:
        return self.count


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # in ggml's order: the fastest-varying dimension first
    ggml_type: int
    # Bytes of its data in the file (whole quantisation blocks), as GGUFReader's n_bytes.
    n_bytes: int = 0

    @property
    def n_elements(self) -> int:
        count = 1
        for dimension in self.shape:
            count *= dimension
        return count


@dataclass
class GGUFHeader:
    version: int
    fields: dict[str, Any] = field(default_factory=dict)
    tensors: list[TensorInfo] = field(default_factory=list)


class _Cursor:
    def __init__(self, data: memoryview | bytes, order: str) -> None:
        self.data = data
        self.order = order
        self.offset = 0

    def unpack(self, fmt: str) -> Any:
        layout = struct.Struct(self.order + fmt)
        self._need(layout.size, "a value")
        (value,) = layout.unpack_from(self.data, self.offset)
        self.offset += layout.size
        return value

    def string(self) -> str:
        length = self.unpack("Q")
        self._need(length, "a string", MAX_STRING_BYTES)
        raw = bytes(self.data[self.offset : self.offset + length])
        self.offset += length
        return raw.decode("utf-8", errors="replace")

    def value(self, kind: int) -> Any:
        if kind == _STRING:
            return self.string()
        if kind in _SCALARS:
            return self.unpack(_SCALARS[kind])
        if kind != _ARRAY:
            raise ValueError(f"unknown value type {kind}")
        item, count = self.unpack("I"), self.unpack("Q")
        if count > MAX_ARRAY_ELEMENTS:
            raise ValueError(f"an array of {count} elements is larger than any GGUF holds")
        if item == _STRING:
            length = struct.Struct(self.order + "Q")
            end = len(self.data)
            for _ in range(count):  # each string is its length, then its bytes
                if self.offset + 8 > end:
                    raise ValueError("a string array runs past the end of the file")
                (size,) = length.unpack_from(self.data, self.offset)
                self.offset += 8 + size
                if self.offset > end:
                    raise ValueError("a string array runs past the end of the file")
            return StringArray(count)
        if item not in _SCALARS:
            raise ValueError(f"an array of value type {item} is not supported")
        dtype = np.dtype(_SCALARS[item]).newbyteorder(self.order)
        self._need(dtype.itemsize * count, "an array")
        values = np.frombuffer(self.data, dtype=dtype, count=count, offset=self.offset).copy()
        self.offset += dtype.itemsize * count
        return values

    def _need(self, size: int, what: str, limit: int | None = None) -> None:
        """Refuse ``size`` more bytes that run past the file's end (or past ``limit``)."""
        if (limit is not None and size > limit) or self.offset + size > len(self.data):
            raise ValueError(f"{what} runs past the end of the file")


def read_header(path: Path) -> GGUFHeader:
    """The metadata and tensor list of a GGUF file (raises ValueError for one that is not)."""
    with open(path, "rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as data:
        view = memoryview(data)
        try:
            return _parse(view)
        finally:
            view.release()


def _parse(view: memoryview) -> GGUFHeader:
    if bytes(view[:4]) != b"GGUF":
        raise ValueError("it does not start with the GGUF magic")
    (version,) = struct.unpack_from("<I", view, 4)
    order = "<"
    if version & 0xFFFF == 0:  # written on a big-endian machine
        order, (version,) = ">", struct.unpack_from(">I", view, 4)
    if version not in (2, 3):
        raise ValueError(f"GGUF version {version} is not supported")
    cursor = _Cursor(view, order)
    cursor.offset = 8
    n_tensors, n_fields = cursor.unpack("Q"), cursor.unpack("Q")
    header = GGUFHeader(version)
    for _ in range(n_fields):
        key = cursor.string()
        header.fields[key] = cursor.value(cursor.unpack("I"))
    offsets = []
    for _ in range(n_tensors):
        name = cursor.string()
        n_dims = cursor.unpack("I")
        if n_dims > MAX_DIMENSIONS:
            raise ValueError(f"tensor {name!r} has {n_dims} dimensions")
        shape = tuple(cursor.unpack("Q") for _ in range(n_dims))
        ggml_type = cursor.unpack("I")
        offsets.append(cursor.unpack("Q"))  # where its data starts, in the data section
        n_bytes = _data_bytes(name, math.prod(shape), ggml_type)
        header.tensors.append(TensorInfo(name, shape, ggml_type, n_bytes))
    _data_check(header, offsets, cursor.offset, len(view))
    return header


def _data_bytes(name: str, n_elements: int, ggml_type: int) -> int:
    """The bytes a tensor's data takes: whole blocks of its quantisation type."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    try:
        block, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
    except (ValueError, KeyError):
        raise ValueError(f"tensor {name!r} has an unknown type {ggml_type}") from None
    return n_elements // block * block_bytes


def _data_check(header: GGUFHeader, offsets: list[int], header_end: int, size: int) -> None:
    """Every tensor's data lies inside the file (a truncated download or copy does not),
    as llama.cpp requires before it loads one."""
    alignment = int(header.fields.get("general.alignment", 32))
    if alignment <= 0 or alignment & (alignment - 1):
        raise ValueError(f"the alignment {alignment} is not a power of two")
    data_start = -(-header_end // alignment) * alignment
    for tensor, offset in zip(header.tensors, offsets, strict=True):
        if data_start + offset + tensor.n_bytes > size:
            raise ValueError(f"tensor {tensor.name!r} runs past the end of the file")


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
    # Where the tensors' bytes sit, for splitting a model between GPUs and RAM
    # (``tensor_layout``): {"layers": [bytes of blk.0, blk.1, ...], "input", "output",
    # "embedding", "output_tied"}. Empty in versions registered before it was recorded.
    tensor_bytes: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def read_metadata(path: Path) -> GGUFMetadata:
    """Parse a GGUF file's header; raise InvalidGGUF if it is not a readable GGUF."""
    from gguf import LlamaFileType  # heavy import, only when needed

    try:
        header = read_header(path)
        value = header.fields.get
        arch = str(value("general.architecture") or "")
        tokens = value("tokenizer.ggml.tokens")
        file_type = value("general.file_type")
        try:
            file_type_name = LlamaFileType(file_type).name.removeprefix("MOSTLY_")
        except (ValueError, TypeError):
            file_type_name = "" if file_type is None else str(file_type)
        lora_alpha = value("adapter.lora.alpha")
        meta = GGUFMetadata(
            gguf_type=str(value("general.type") or "model"),
            architecture=arch,
            name=str(value("general.name") or ""),
            parameter_count=sum(t.n_elements for t in header.tensors),
            file_type=file_type_name,
            context_length=_int_or_none(value(f"{arch}.context_length")),
            layers=_int_or_none(value(f"{arch}.block_count")),
            embedding_size=_int_or_none(value(f"{arch}.embedding_length")),
            vocab_size=len(tokens)
            if tokens is not None
            else _int_or_none(value(f"{arch}.vocab_size")),
            has_chat_template="tokenizer.chat_template" in header.fields,
            licence=str(value("general.license") or ""),
            adapter_type=str(value("adapter.type") or ""),
            lora_alpha=float(lora_alpha) if lora_alpha is not None else None,
            tensor_count=len(header.tensors),
            attention_heads=_largest_int(value(f"{arch}.attention.head_count")),
            attention_heads_kv=_largest_int(value(f"{arch}.attention.head_count_kv")),
            key_length=_largest_int(value(f"{arch}.attention.key_length")),
            value_length=_largest_int(value(f"{arch}.attention.value_length")),
            tensor_bytes=tensor_layout(header.tensors, _int_or_none(value(f"{arch}.block_count"))),
        )
    except Exception as exc:  # noqa: BLE001 - the reader raises many kinds on bad input
        raise InvalidGGUF(f"Not a valid GGUF file: {exc}") from exc
    if not meta.architecture:
        raise InvalidGGUF("Not a valid GGUF file: it names no architecture.")
    return meta


_BLOCK = re.compile(r"^blk\.(\d+)\.")
# The output layer's own tensors (llama.cpp's LLM_TENSOR_OUTPUT and OUTPUT_NORM).
_OUTPUT = ("output", "output_norm")
_EMBEDDING = "token_embd.weight"


def tensor_layout(tensors: list[TensorInfo], block_count: int | None) -> dict[str, Any]:
    """The tensors' bytes by the part of the model llama.cpp places as one: each
    repeating layer (``blk.<n>.*``), the output layer (``output``, ``output_norm``) and
    the input layer (the token embedding, and whatever else is outside a block).

    llama.cpp offloads whole layers: ``gpu_layers`` puts the last repeating layers and
    then the output layer on a GPU and always keeps the input layer in RAM. A model
    without an ``output.weight`` (Gemma ties it to the embedding) runs its output layer
    from a copy of ``token_embd.weight``: ``output_tied`` says so, and ``embedding``
    is what that copy costs on the GPU. ``layers``, ``input`` and ``output`` add up to
    every tensor's bytes in the file.
    """
    layers = [0] * (block_count or 0)
    layout = {"input": 0, "output": 0, "embedding": 0}
    names = set()
    for tensor in tensors:
        names.add(tensor.name)
        block = _BLOCK.match(tensor.name)
        if block:
            index = int(block.group(1))
            layers.extend([0] * (index + 1 - len(layers)))
            layers[index] += tensor.n_bytes
        elif tensor.name.split(".")[0] in _OUTPUT:
            layout["output"] += tensor.n_bytes
        else:
            layout["input"] += tensor.n_bytes
        if tensor.name == _EMBEDDING:
            layout["embedding"] = tensor.n_bytes
    return {
        "layers": layers,
        **layout,
        "output_tied": "output.weight" not in names and _EMBEDDING in names,
    }


_by_sha256: dict[str, GGUFMetadata] = {}


def read_metadata_cached(path: Path, sha256: str) -> GGUFMetadata:
    """The same content always parses the same: a file read again is not parsed again."""
    if sha256 not in _by_sha256:
        if len(_by_sha256) > 256:
            _by_sha256.clear()
        _by_sha256[sha256] = read_metadata(path)
    return _by_sha256[sha256]


def _int_or_none(value: Any) -> int | None:
    return None if value is None else int(value)


def _largest_int(value: Any) -> int | None:
    """Some architectures store a per-layer list (head counts); size for the largest."""
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, list | tuple):
        return max((int(v) for v in value), default=None)
    try:
        return None if value is None else int(value)
    except (TypeError, ValueError):
        return None
