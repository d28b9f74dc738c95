"""A GGUF model written out unquantised (F16 or BF16), with a LoRA adapter merged in or not.

The merge is llama.cpp's maths (tools/export-lora, and llama-adapter.cpp for what serving
computes), so the merged file answers as the base served with the adapter does:

- an adapted weight W, numpy shape (out, in), becomes W + s·(B @ A) with A = lora_a
  (rank, in), B = lora_b (out, rank) and s = alpha / rank × the caller's scale (the
  caller's scale alone when the adapter has no alpha, as llama.cpp does), in float32 and
  rounded to the output type once;
- token_embd is looked up rather than multiplied, so llama.cpp keeps its pair the other
  way round: lora_a (n_vocab, rank), lora_b (n_embd, rank), delta A @ Bᵀ;
- an adapter's norm vectors are ignored, as llama.cpp ignores them when serving.

Unlike export-lora, which copies the other tensors as they are (a Q4_K_M base stays mostly
Q4_K_M), every weight matrix is dequantised and written at the asked type, so the result is
a plain F16/BF16 model to quantise afresh or hand to other tools. 1-D tensors (norms,
biases) are F32, as llama.cpp's converter writes them, and so is a matrix that a quantised
base holds in F32 (llama.cpp leaves some small ones, e.g. expert routers, unquantised).
Metadata, tensor order and alignment are the base's; ``aibox.export.*`` keys record what
was done.

The file is streamed: tensor infos first, then one tensor at a time, converted in blocks of
rows, so memory holds about one output tensor, not the model.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from workers.artifacts import file_sha256

Progress = Callable[[int, int, str], None]

# llama.h's llama_ftype for each output type, and the ggml type of its weight matrices.
OUT_TYPES = {"f16": ("MOSTLY_F16", "F16"), "bf16": ("MOSTLY_BF16", "BF16")}

# Integer tensors are data, not weights: copied as they are.
_INTEGER_TYPES = frozenset({"I8", "I16", "I32", "I64"})

# Rows of a matrix converted at once: bounds the float32 working copy (~64 MiB).
_BLOCK_BYTES = 64 << 20


class MergeError(Exception):
    """The model cannot be exported or the adapter merged as asked; the message says why."""


@dataclass(frozen=True)
class ExportResult:
    out_path: Path
    out_type: str
    tensors: int
    merged_tensors: int
    source_file_type: str  # the base's, e.g. "MOSTLY_Q4_K_M"
    size: int
    seconds: float

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["out_path"] = str(self.out_path)
        return data


@dataclass(frozen=True)
class _Lora:
    a: np.ndarray  # float32, numpy order as stored
    b: np.ndarray
    scale: np.float32
    embedding: bool  # token_embd: delta = A @ B.T instead of B @ A

    def delta(self, rows: slice) -> np.ndarray:
        if self.embedding:
            return (self.a[rows] @ self.b.T) * self.scale
        return (self.b[rows] @ self.a) * self.scale


def export_model(
    base_path: Path,
    out_path: Path,
    *,
    adapter_path: Path | None = None,
    adapter_scale: float = 1.0,
    out_type: str = "f16",
    progress: Progress | None = None,
) -> ExportResult:
    """Write ``out_path`` (atomically) as the GGUF model ``base_path`` unquantised to
    ``out_type`` ("f16" or "bf16"), with the LoRA adapter at ``adapter_path`` merged in at
    ``adapter_scale`` when given; raise MergeError when that cannot be done."""
    import gguf

    started = time.monotonic()
    if out_type not in OUT_TYPES:
        raise MergeError(f"Unknown output type {out_type!r}; choose one of {', '.join(OUT_TYPES)}.")
    if not math.isfinite(adapter_scale):
        raise MergeError(f"The adapter scale must be a finite number, not {adapter_scale}.")
    file_type = gguf.LlamaFileType[OUT_TYPES[out_type][0]]
    matrix_type = gguf.GGMLQuantizationType[OUT_TYPES[out_type][1]]
    for other, role in ((base_path, "base model"), (adapter_path, "adapter")):
        if other is not None and Path(out_path).resolve() == Path(other).resolve():
            raise MergeError(f"The output would overwrite the {role}; choose another path.")

    base = _read_gguf(base_path, "base model")
    arch = _string(base, "general.architecture")
    if _string(base, "general.type") == "adapter":
        raise MergeError(
            "The base is a LoRA adapter, not a model: export the model it was trained on and "
            "pass the adapter as the adapter."
        )
    if not arch or not base.tensors:
        raise MergeError("The base file holds no model (no architecture or no tensors).")
    if "split.count" in base.fields:
        raise MergeError("Split GGUF models are not supported; merge the parts first.")
    if base.endianess != gguf.GGUFEndian.LITTLE:
        raise MergeError("Big-endian GGUF files are not supported.")
    source_file_type = _file_type_name(base)
    # An all-F32 base has no matrix kept in F32 on purpose: convert them all.
    keep_f32 = source_file_type != "ALL_F32"
    for tensor in base.tensors:
        _check_dequantizable(tensor)

    loras: dict[str, _Lora] = {}
    if adapter_path is not None:
        loras = _read_lora(adapter_path, base, arch, adapter_scale)

    plan = []  # (tensor, ggml type written, lora or None), in the base's order
    for tensor in base.tensors:
        if tensor.tensor_type.name in _INTEGER_TYPES:
            kind = tensor.tensor_type
        elif len(tensor.shape) < 2 or (
            keep_f32 and tensor.tensor_type == gguf.GGMLQuantizationType.F32
        ):
            kind = gguf.GGMLQuantizationType.F32
        else:
            kind = matrix_type
        plan.append((tensor, kind, loras.get(tensor.name)))

    out_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=out_path.parent, prefix=".export-", suffix=".gguf")
    os.close(fd)
    writer = gguf.GGUFWriter(tmp_name, arch=arch)
    try:
        writer.data_alignment = base.alignment
        uint32 = gguf.GGUFValueType.UINT32
        _copy_metadata(
            base,
            writer,
            replace={
                gguf.Keys.General.FILE_TYPE: (int(file_type), uint32),
                # llama.cpp's converter writes it on unquantised files too.
                gguf.Keys.General.QUANTIZATION_VERSION: (gguf.GGML_QUANT_VERSION, uint32),
            },
        )
        writer.add_string("aibox.export.source_file_type", source_file_type)
        if adapter_path is not None:
            writer.add_string("aibox.export.adapter_sha256", file_sha256(adapter_path))
            writer.add_float32("aibox.export.adapter_scale", float(adapter_scale))
        for tensor, kind, _ in plan:
            shape = _numpy_shape(tensor)
            nbytes = tensor.n_bytes if kind.name in _INTEGER_TYPES else _nbytes(shape, kind)
            writer.add_tensor_info(tensor.name, shape, np.dtype(np.float32), nbytes, raw_dtype=kind)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for done, (tensor, kind, lora) in enumerate(plan, start=1):
            if kind.name in _INTEGER_TYPES:
                writer.write_tensor_data(np.asarray(tensor.data))
                action = "copied"
            else:
                writer.write_tensor_data(_convert(tensor, kind, lora))
                if lora is not None:
                    action = "merged"
                elif kind == tensor.tensor_type:
                    action = f"kept as {kind.name}"
                else:
                    action = f"{tensor.tensor_type.name} to {kind.name}"
            if progress is not None:
                progress(done, len(plan), f"{tensor.name}: {action}")
        writer.close()
        os.chmod(tmp_name, 0o644)  # mkstemp makes it private
        os.replace(tmp_name, out_path)
    except BaseException:
        writer.close()
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return ExportResult(
        out_path=out_path,
        out_type=out_type,
        tensors=len(plan),
        merged_tensors=len(loras),
        source_file_type=source_file_type,
        size=out_path.stat().st_size,
        seconds=round(time.monotonic() - started, 3),
    )


# -- reading -----------------------------------------------------------------------


def _read_gguf(path: Path, role: str):
    from gguf import GGUFReader

    try:
        return GGUFReader(path, "r")
    except (ValueError, OSError, IndexError) as exc:
        raise MergeError(f"The {role} is not a readable GGUF file: {exc}") from exc


def _string(reader, key: str) -> str:
    field = reader.fields.get(key)
    return "" if field is None else str(field.contents())


def _file_type_name(reader) -> str:
    from gguf import LlamaFileType

    field = reader.fields.get("general.file_type")
    if field is None:
        return "unknown"
    value = field.contents()
    try:
        return LlamaFileType(value).name
    except ValueError:
        return str(value)


def _numpy_shape(tensor) -> tuple[int, ...]:
    return tuple(int(n) for n in reversed(tensor.shape))


def _nbytes(shape: tuple[int, ...], kind) -> int:
    return math.prod(shape) * (4 if kind.name == "F32" else 2)


def _dequantize(data: np.ndarray, kind) -> np.ndarray:
    from gguf.quants import dequantize

    return np.asarray(dequantize(data, kind), dtype=np.float32)


def _check_dequantizable(tensor) -> None:
    if tensor.tensor_type.name in _INTEGER_TYPES:
        return
    data = tensor.data
    try:
        _dequantize(data[:1] if data.ndim > 1 else data, tensor.tensor_type)
    except NotImplementedError as exc:
        raise MergeError(
            f"Tensor {tensor.name} is {tensor.tensor_type.name}, which gguf-py cannot "
            "dequantise; export it from a file of another type."
        ) from exc


def _read_lora(path: Path, base, arch: str, user_scale: float) -> dict[str, _Lora]:
    adapter = _read_gguf(path, "adapter")
    if _string(adapter, "general.type") != "adapter" or _string(adapter, "adapter.type") != "lora":
        raise MergeError(
            "The adapter is not a LoRA adapter (GGUF general.type 'adapter', adapter.type 'lora')."
        )
    adapter_arch = _string(adapter, "general.architecture")
    if adapter_arch != arch:
        raise MergeError(
            f"The adapter is for '{adapter_arch}' models and the base is a '{arch}' model."
        )
    if "adapter.alora.invocation_tokens" in adapter.fields:
        # An activated LoRA applies only after its invocation tokens; merged, it would
        # apply everywhere.
        raise MergeError("An activated LoRA (aLoRA) cannot be merged into its base.")
    alpha_field = adapter.fields.get("adapter.lora.alpha")
    alpha = np.float32(alpha_field.contents() if alpha_field is not None else 0.0)

    pairs: dict[str, dict[str, Any]] = {}
    for tensor in adapter.tensors:
        name = tensor.name
        if name.endswith((".lora_a", ".lora_b")):
            pairs.setdefault(name[:-7], {})[name[-1]] = tensor
        elif not name.endswith("_norm.weight"):
            raise MergeError(f"Unexpected tensor {name} in the LoRA adapter.")
    if not pairs:
        raise MergeError("The adapter holds no LoRA weights.")

    base_tensors = {t.name: t for t in base.tensors}
    loras = {}
    for name, pair in pairs.items():
        if set(pair) != {"a", "b"}:
            raise MergeError(f"The adapter has only half of the LoRA pair for {name}.")
        target = base_tensors.get(name)
        if target is None:
            raise MergeError(f"The adapter changes {name}, which the base model does not have.")
        if len(target.shape) != 2:
            raise MergeError(f"The adapter changes {name}, which is not a matrix.")
        _check_dequantizable(pair["a"])
        _check_dequantizable(pair["b"])
        a = _dequantize(pair["a"].data, pair["a"].tensor_type)
        b = _dequantize(pair["b"].data, pair["b"].tensor_type)
        rows, cols = _numpy_shape(target)
        embedding = name.endswith("token_embd.weight")
        rank = b.shape[-1]
        if embedding:
            fits = a.shape == (rows, rank) and b.shape == (cols, rank)
        else:
            fits = a.shape == (rank, cols) and b.shape == (rows, rank)
        if a.ndim != 2 or b.ndim != 2 or not fits:
            raise MergeError(
                f"LoRA shapes {tuple(a.shape)} and {tuple(b.shape)} do not fit {name} "
                f"({rows}x{cols}): the adapter was made for another model."
            )
        # llama_adapter_lora_weight::get_scale, in float32 as there.
        scale = np.float32(user_scale) * alpha / np.float32(rank) if alpha else user_scale
        loras[name] = _Lora(a=a, b=b, scale=np.float32(scale), embedding=embedding)
    return loras


# -- writing -----------------------------------------------------------------------


def _copy_metadata(reader, writer, *, replace: dict[str, tuple[Any, Any]]) -> None:
    """Every key/value of ``reader`` into ``writer`` in the same order, those in
    ``replace`` with the value given (added at the end when the reader lacks them)."""
    from gguf import GGUFValueType

    for key, field in reader.fields.items():
        # The reader's own header fields, the one key the writer starts with, and the
        # record of an earlier export: the keys added here describe the last one.
        if key.startswith(("GGUF.", "aibox.export.")) or key == "general.architecture":
            continue
        kind = field.types[0]
        if key in replace:
            writer.add_key_value(key, *replace[key])
        elif kind == GGUFValueType.STRING:
            # Raw bytes: a value is copied as is, even one that is not valid UTF-8.
            writer.add_key_value(key, bytes(field.parts[-1]), kind)
        elif kind != GGUFValueType.ARRAY:
            writer.add_key_value(key, field.contents(), kind)
        elif len(field.types) != 2:
            # gguf-py's writer cannot write an empty or a nested array.
            raise MergeError(f"The metadata array {key} is empty or nested; it cannot be copied.")
        elif field.types[1] == GGUFValueType.STRING:
            values = [bytes(field.parts[i]) for i in field.data]
            writer.add_key_value(key, values, kind, sub_type=GGUFValueType.STRING)
        else:
            writer.add_key_value(key, field.contents(), kind, sub_type=field.types[1])
    for key, (value, kind) in replace.items():
        if key not in reader.fields:
            writer.add_key_value(key, value, kind)


def _convert(tensor, kind, lora: _Lora | None) -> np.ndarray:
    """The tensor at ``kind`` (F32, F16 or BF16), with the LoRA delta added, as the bytes
    to write; converted a block of rows at a time."""
    from gguf.quants import quantize

    shape = _numpy_shape(tensor)
    data = tensor.data
    if len(shape) < 2:  # always written as F32
        return _dequantize(data, tensor.tensor_type).reshape(shape)
    cols = shape[-1]
    data = data.reshape(-1, data.shape[-1])  # rows of elements, or of quantised blocks
    rows = data.shape[0]
    out = np.empty((rows, cols), dtype=_dtype(kind))
    step = max(1, _BLOCK_BYTES // (cols * 4))
    for start in range(0, rows, step):
        block = slice(start, min(start + step, rows))
        values = _dequantize(data[block], tensor.tensor_type).reshape(-1, cols)
        if lora is not None:
            values = lora.delta(block) + values  # llama.cpp: ggml_add(delta, base)
        if kind.name == "BF16":
            out[block] = quantize(values, kind).view(np.uint16)
        else:
            out[block] = values
    return out


def _dtype(kind) -> np.dtype:
    # BF16 has no numpy type: its 16 bits are written from uint16.
    return np.dtype({"F32": np.float32, "F16": np.float16, "BF16": np.uint16}[kind.name])
