"""An importance matrix computed on sample text, as llama.cpp's ``llama-imatrix`` does.

For each weight matrix of the transformer blocks, the importance of its input column j
is the mean of x_j² over the activations x that entered it while the model read the
text. The quantiser (``quantize.quantize(imatrix=...)``) then rounds the columns that
carry the most signal on *this* data most carefully.

The activations are read where llama.cpp computes them: its scheduler calls back
(``cb_eval``) for each graph node, first asking whether the node is wanted, then, once
computed, handing it over. Wanted are the matrix multiplications whose weight is a
``blk.*`` tensor and whose input has at least 16 rows (llama-imatrix's rules), so the
figures are the ones that tool would write for the same text and chunks. Mixture-of-
experts layers (``MUL_MAT_ID``) are not collected: their weights quantise without one.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

Progress = Callable[[int, int, str], None]

GGML_MAX_DIMS = 4
GGML_MAX_OP_PARAMS = 64
GGML_MAX_SRC = 10
GGML_MAX_NAME = 64
GGML_TYPE_F32 = 0
MIN_ROWS = 16  # llama-imatrix ignores smaller batches


class ImatrixError(Exception):
    """The importance matrix cannot be computed as asked; the message says why."""


class _Tensor(ctypes.Structure):
    """The head of ggml.h's ``struct ggml_tensor``, as far as ``name``."""


_Tensor._fields_ = [
    ("type", ctypes.c_int),
    ("buffer", ctypes.c_void_p),
    ("ne", ctypes.c_int64 * GGML_MAX_DIMS),
    ("nb", ctypes.c_size_t * GGML_MAX_DIMS),
    ("op", ctypes.c_int),
    ("op_params", ctypes.c_int32 * (GGML_MAX_OP_PARAMS // 4)),
    ("flags", ctypes.c_int32),
    ("src", ctypes.POINTER(_Tensor) * GGML_MAX_SRC),
    ("view_src", ctypes.POINTER(_Tensor)),
    ("view_offs", ctypes.c_size_t),
    ("data", ctypes.c_void_p),
    ("name", ctypes.c_char * GGML_MAX_NAME),
]


@dataclass(frozen=True)
class ImatrixResult:
    matrix: dict[str, np.ndarray]  # weight name -> mean squared activation per column
    chunks: int
    n_ctx: int
    tokens: int
    seconds: float

    def summary(self) -> dict:
        return {
            "entries": len(self.matrix),
            "chunks": self.chunks,
            "n_ctx": self.n_ctx,
            "tokens": self.tokens,
            "seconds": round(self.seconds, 3),
        }


def _ggml():
    """libggml-base from llama-cpp-python's own build, and the op number of MUL_MAT."""
    from llama_cpp import _ggml

    lib = ctypes.CDLL(str(_ggml.libggml_base_path / "libggml-base.so"))
    lib.ggml_op_name.restype = ctypes.c_char_p
    lib.ggml_op_name.argtypes = [ctypes.c_int]
    lib.ggml_backend_buffer_is_host.restype = ctypes.c_bool
    lib.ggml_backend_buffer_is_host.argtypes = [ctypes.c_void_p]
    lib.ggml_backend_tensor_get.argtypes = [
        ctypes.c_void_p,
        ctypes.c_void_p,
        ctypes.c_size_t,
        ctypes.c_size_t,
    ]
    # The op's number, found by name, so a renumbered enum in a newer ggml still works.
    for op in range(256):
        name = lib.ggml_op_name(op)
        if name == b"MUL_MAT":
            return lib, op
        if name in (None, b"") or name == b"COUNT":
            break
    raise ImatrixError("This llama.cpp build has no MUL_MAT operation to observe.")


def _weight_name(raw: bytes) -> str:
    # Backends may decorate names: "CUDA0#blk.0.attn_k.weight#0" -> "blk.0.attn_k.weight".
    name = raw.decode("utf-8", "replace")
    if "#" in name:
        name = name.split("#")[1]
    return name


class _Collector:
    def __init__(self, lib, mul_mat: int) -> None:
        self.lib = lib
        self.mul_mat = mul_mat
        self.sums: dict[str, np.ndarray] = {}
        self.counts: dict[str, int] = {}
        self.error: BaseException | None = None

    def wanted(self, t: _Tensor) -> bool:
        if t.op != self.mul_mat or not t.src[0] or not t.src[1]:
            return False
        weight, x = t.src[0].contents, t.src[1].contents
        if x.type != GGML_TYPE_F32 or x.ne[1] < MIN_ROWS:
            return False
        # Dense weights only (one matrix): a 3-D weight is a stack of experts.
        if weight.ne[2] * weight.ne[3] != 1:
            return False
        return _weight_name(weight.name).startswith("blk.")

    def collect(self, t: _Tensor) -> None:
        weight, x = t.src[0].contents, t.src[1].contents
        ne = [int(n) for n in x.ne]
        nb = [int(n) for n in x.nb]
        span = sum((n - 1) * s for n, s in zip(ne, nb, strict=True)) + nb[0]
        if self.lib.ggml_backend_buffer_is_host(x.buffer):
            raw = (ctypes.c_char * span).from_address(x.data)
        else:  # a GPU's buffer: copy to the host first
            raw = ctypes.create_string_buffer(span)
            self.lib.ggml_backend_tensor_get(ctypes.addressof(x), raw, 0, span)
        rows = np.lib.stride_tricks.as_strided(
            np.frombuffer(raw, dtype=np.float32),
            shape=(ne[3], ne[2], ne[1], ne[0]),
            strides=(nb[3], nb[2], nb[1], nb[0]),
            writeable=False,
        )
        squares = np.square(rows, dtype=np.float64).sum(axis=(0, 1, 2))
        name = _weight_name(weight.name)
        if name in self.sums and self.sums[name].shape != squares.shape:
            raise ImatrixError(f"Inconsistent activations for {name}.")
        self.sums[name] = self.sums.get(name, 0) + squares
        self.counts[name] = self.counts.get(name, 0) + ne[1] * ne[2] * ne[3]

    def callback(self, tensor: int, ask: bool, _user_data: int) -> bool:
        try:
            t = ctypes.cast(tensor, ctypes.POINTER(_Tensor)).contents
            if ask:
                return self.wanted(t)
            self.collect(t)
            return True
        except BaseException as exc:  # never let an exception cross into C
            self.error = exc
            return False  # stops the computation

    def matrix(self) -> dict[str, np.ndarray]:
        out = {}
        for name, total in self.sums.items():
            mean = (total / self.counts[name]).astype(np.float32)
            if not np.all(np.isfinite(mean)):
                raise ImatrixError(f"Non-finite activations in {name}: the model overflowed.")
            out[name] = mean
        return out


def compute_imatrix(
    model_path: Path,
    text: str,
    *,
    n_ctx: int = 512,
    max_chunks: int | None = None,
    threads: int | None = None,
    gpu_layers: int = 0,
    progress: Progress | None = None,
) -> ImatrixResult:
    """Read ``text`` in chunks of ``n_ctx`` tokens with the model at ``model_path`` and
    return each block weight's importance per input column."""
    import llama_cpp
    from llama_cpp import _internals

    from workers.inference.engine import default_threads

    lib, mul_mat = _ggml()
    collector = _Collector(lib, mul_mat)
    callback = llama_cpp.ggml_backend_sched_eval_callback(collector.callback)
    threads = threads or default_threads(len(os.sched_getaffinity(0)))
    model_params = llama_cpp.llama_model_default_params()
    model_params.n_gpu_layers = gpu_layers
    params = llama_cpp.llama_context_default_params()
    params.n_ctx = params.n_batch = params.n_ubatch = n_ctx
    params.n_seq_max = 1
    params.n_threads = params.n_threads_batch = threads
    params.cb_eval = callback
    started = time.perf_counter()
    with contextlib.ExitStack() as stack:
        try:
            model = _internals.LlamaModel(
                path_model=str(model_path), params=model_params, verbose=False
            )
        except ValueError as exc:
            raise ImatrixError(f"llama.cpp could not load the model: {exc}") from exc
        stack.callback(model.close)
        ctx = _internals.LlamaContext(model=model, params=params, verbose=False)
        stack.callback(ctx.close)
        tokens = model.tokenize(text.encode("utf-8"), add_bos=True, special=False)
        chunks = len(tokens) // n_ctx
        if max_chunks is not None:
            chunks = min(chunks, max_chunks)
        if chunks < 1:
            raise ImatrixError(
                f"The text is {len(tokens)} tokens long; an importance matrix with a context "
                f"of {n_ctx} needs at least {n_ctx} tokens."
            )
        bos = model.token_bos() if model.add_bos_token() else None
        batch = llama_cpp.llama_batch_init(n_ctx, 0, 1)
        stack.callback(llama_cpp.llama_batch_free, batch)
        memory = llama_cpp.llama_get_memory(ctx.ctx)
        for chunk in range(chunks):
            piece = tokens[chunk * n_ctx : (chunk + 1) * n_ctx]
            if bos is not None:
                piece[0] = bos
            llama_cpp.llama_memory_clear(memory, True)
            batch.n_tokens = len(piece)
            for i, token in enumerate(piece):
                batch.token[i] = token
                batch.pos[i] = i
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = 0
                # Every position's logits, as llama-imatrix asks: else llama.cpp skips the
                # last block's feed-forward for rows no output needs, and those weights
                # would get no importance.
                batch.logits[i] = True
            rc = llama_cpp.llama_decode(ctx.ctx, batch)
            if collector.error is not None:
                raise ImatrixError(f"Reading the activations failed: {collector.error}")
            if rc != 0:
                raise ImatrixError(f"llama.cpp could not evaluate chunk {chunk + 1} (code {rc}).")
            if progress is not None:
                progress(chunk + 1, chunks, f"Importance matrix: chunk {chunk + 1}/{chunks}")
    del callback  # kept alive until here: llama.cpp held a pointer to it
    matrix = collector.matrix()
    if not matrix:
        raise ImatrixError("No block weight was seen: is this a transformer model?")
    return ImatrixResult(
        matrix=matrix,
        chunks=chunks,
        n_ctx=n_ctx,
        tokens=chunks * n_ctx,
        seconds=time.perf_counter() - started,
    )
