"""Quantising a GGUF model with llama.cpp's own quantiser (``llama_model_quantize``).

The same code ``llama-quantize`` runs, called through llama-cpp-python, so a file made
here is the file that tool would make from the same input and options. Two things the
tool does around the call are done here too:

- an importance matrix (what ``llama-imatrix`` computes: for each weight matrix, the
  mean square of the activations entering each of its columns) is passed as llama.cpp's
  ``llama_model_imatrix_data`` array, read from the GGUF file ``llama-imatrix`` writes;
- progress: the quantiser has no callback, but it writes the output file tensor by
  tensor, so the file's size against the size expected for the type is the progress.

Quantising an already quantised file (``allow_requantize``) loses more than quantising
from F16/BF16/F32 once: it is refused unless asked for, and the result says it happened.
"""

from __future__ import annotations

import ctypes
import os
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

Progress = Callable[[int, int, str], None]


class QuantizeError(Exception):
    """The file cannot be quantised as asked; the message says why."""


@dataclass(frozen=True)
class QuantType:
    name: str
    ftype: int  # llama.h's llama_ftype
    bits_per_weight: float  # of the bulk of the weights; for progress and estimates
    requires_imatrix: bool = False


# llama-quantize's names (tools/quantize/quantize.cpp) for the types AIBox offers.
QUANT_TYPES: dict[str, QuantType] = {
    t.name: t
    for t in (
        QuantType("Q8_0", 7, 8.5),
        QuantType("Q6_K", 18, 6.5625),
        QuantType("Q5_K_M", 17, 5.69),
        QuantType("Q5_K_S", 16, 5.54),
        QuantType("Q5_0", 8, 5.5),
        QuantType("Q4_K_M", 15, 4.89),
        QuantType("Q4_K_S", 14, 4.58),
        QuantType("Q4_0", 2, 4.5),
        QuantType("IQ4_XS", 30, 4.25),
        QuantType("Q3_K_L", 13, 4.27),
        QuantType("Q3_K_M", 12, 3.91),
        QuantType("Q3_K_S", 11, 3.5),
        QuantType("IQ3_M", 27, 3.66),
        QuantType("Q2_K", 10, 2.96),
        QuantType("IQ2_M", 29, 2.7),
        QuantType("IQ2_XS", 20, 2.31, requires_imatrix=True),
        QuantType("IQ2_XXS", 19, 2.06, requires_imatrix=True),
    )
}

# File types that hold unquantised weights: quantising them is not a requantisation.
UNQUANTISED_FILE_TYPES = {"ALL_F32", "MOSTLY_F16", "MOSTLY_BF16", "F32", "F16", "BF16"}


@dataclass(frozen=True)
class QuantizeResult:
    out_path: Path
    quant_type: str
    size: int
    seconds: float
    requantized: bool
    imatrix_entries: int
    params: dict

    def as_dict(self) -> dict:
        data = asdict(self)
        data["out_path"] = str(self.out_path)
        return data


def is_quantised(file_type: str) -> bool:
    """Whether a GGUF file type (``MOSTLY_Q4_K_M``, ``MOSTLY_F16``…) holds quantised weights."""
    return bool(file_type) and file_type.upper() not in UNQUANTISED_FILE_TYPES


def expected_size(parameter_count: int, quant_type: str) -> int:
    """About how many bytes the quantised file takes (weights only)."""
    return int(parameter_count * QUANT_TYPES[quant_type].bits_per_weight / 8)


def read_imatrix(path: Path) -> dict[str, np.ndarray]:
    """The importance matrix in a GGUF file written by ``llama-imatrix``, normalised as
    ``llama-quantize`` does: for each weight, the sums of squared activations divided by
    the number of tokens they were summed over (per expert for mixture-of-experts)."""
    from gguf import GGUFReader

    from workers.gguf_meta import read_header

    no_matrix = QuantizeError(
        "The file holds no importance matrix (no '.in_sum2' tensors): make it with "
        "llama.cpp's llama-imatrix."
    )
    try:
        # The header first: a model file given by mistake is refused without reading it.
        if not any(t.name.endswith(".in_sum2") for t in read_header(path).tensors):
            raise no_matrix
        reader = GGUFReader(path, "r")
    except (ValueError, OSError) as exc:
        raise QuantizeError(f"The importance matrix is not a readable GGUF file: {exc}") from exc
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, np.ndarray] = {}
    for tensor in reader.tensors:
        if tensor.name.endswith(".in_sum2"):
            sums[tensor.name.removesuffix(".in_sum2")] = np.asarray(tensor.data, np.float32)
        elif tensor.name.endswith(".counts"):
            counts[tensor.name.removesuffix(".counts")] = np.asarray(tensor.data, np.float32)
    if not sums:
        raise no_matrix
    matrix = {}
    for name, total in sums.items():
        count = counts.get(name)
        if count is None or count.size == 0:
            raise QuantizeError(f"The importance matrix has no token counts for {name}.")
        per_expert = total.reshape(count.size, -1)
        with np.errstate(divide="ignore", invalid="ignore"):
            mean = per_expert / count.reshape(-1, 1)
        # llama-quantize: a weight never reached (count 0) gets equal importance.
        mean[count.reshape(-1) <= 0, :] = 1.0
        matrix[name] = np.ascontiguousarray(mean.reshape(-1), dtype=np.float32)
    return matrix


def quantize(
    source: Path,
    out_path: Path,
    *,
    quant_type: str,
    source_file_type: str,
    parameter_count: int,
    allow_requantize: bool = False,
    imatrix: Mapping[str, np.ndarray] | None = None,
    threads: int | None = None,
    progress: Progress | None = None,
) -> QuantizeResult:
    """Write ``out_path`` (atomically) as ``source`` quantised to ``quant_type``."""
    import llama_cpp

    qtype = QUANT_TYPES.get(quant_type)
    if qtype is None:
        raise QuantizeError(
            f"Unknown quantisation type {quant_type!r}; choose one of {', '.join(QUANT_TYPES)}."
        )
    requantize = is_quantised(source_file_type)
    if requantize and not allow_requantize:
        raise QuantizeError(
            f"The source is already quantised ({source_file_type}); quantising it again loses "
            "more quality than quantising the F16/BF16 original. Ask for a requantisation "
            "explicitly to do it anyway."
        )
    if qtype.requires_imatrix and not imatrix:
        raise QuantizeError(f"{quant_type} needs an importance matrix.")

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = qtype.ftype
    params.nthread = threads or 0  # 0: llama.cpp uses every core
    params.allow_requantize = requantize
    keep: list = []  # the C strings and arrays must outlive the call
    if imatrix:
        entries = (llama_cpp.llama_model_imatrix_data * (len(imatrix) + 1))()
        for i, (name, values) in enumerate(imatrix.items()):
            array = np.ascontiguousarray(values, dtype=np.float32)
            encoded = name.encode("utf-8")
            keep += [array, encoded]
            entries[i].name = encoded
            entries[i].data = array.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            entries[i].size = array.size
        entries[len(imatrix)].name = None  # the list ends with a null name
        params.imatrix = entries
        keep.append(entries)

    out_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=out_path.parent, prefix=".quantize-", suffix=".gguf")
    os.close(fd)
    tmp = Path(tmp_name)
    expected = max(1, expected_size(parameter_count, quant_type))
    outcome: dict[str, int | BaseException] = {}

    def run() -> None:
        try:
            outcome["rc"] = llama_cpp.llama_model_quantize(
                str(source).encode("utf-8"), str(tmp).encode("utf-8"), ctypes.byref(params)
            )
        except BaseException as exc:  # re-raised in the caller's thread
            outcome["error"] = exc

    started = time.monotonic()
    worker = threading.Thread(target=run, name="quantize", daemon=True)
    try:
        worker.start()
        while worker.is_alive():
            worker.join(timeout=1.0)
            if progress is not None and worker.is_alive():
                written = tmp.stat().st_size if tmp.exists() else 0
                done = min(99, written * 100 // expected)
                progress(done, 100, f"Quantising to {quant_type}: {written / 1e6:.0f} MB written")
        if "error" in outcome:
            raise QuantizeError(f"llama.cpp's quantiser failed: {outcome['error']}")
        if outcome.get("rc") != 0:
            raise QuantizeError(
                f"llama.cpp's quantiser refused the file (code {outcome.get('rc')}); "
                "the worker log has its message."
            )
        os.chmod(tmp, 0o644)  # mkstemp makes it private
        os.replace(tmp, out_path)
    finally:
        tmp.unlink(missing_ok=True)
    del keep
    seconds = time.monotonic() - started
    if progress is not None:
        progress(100, 100, f"Quantised to {quant_type} in {seconds:.1f} s")
    return QuantizeResult(
        out_path=out_path,
        quant_type=quant_type,
        size=out_path.stat().st_size,
        seconds=round(seconds, 3),
        requantized=requantize,
        imatrix_entries=len(imatrix or {}),
        params={
            "ftype": qtype.ftype,
            "allow_requantize": requantize,
            "threads": threads or 0,
            "imatrix": bool(imatrix),
        },
    )


def llama_cpp_build() -> dict[str, str]:
    """Which llama.cpp made a file: the binding's version and the library's build info."""
    import llama_cpp

    return {
        "llama_cpp_python": llama_cpp.__version__,
        "system_info": llama_cpp.llama_print_system_info().decode("utf-8", "replace").strip(),
    }
