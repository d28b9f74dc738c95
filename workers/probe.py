"""A quick measure of this machine's memory bandwidth and matrix throughput.

The setups advisor estimates how fast a model will run on a worker no trial has run on
yet: decoding one token reads every weight once (memory-bound), reading a prompt is
matrix multiplication (compute-bound). Both figures are taken once per worker process
(about half a second) and sent with its heartbeats.
"""

from __future__ import annotations

import functools
import time

import numpy as np

# Large enough to defeat the CPU caches, small enough not to matter on a worker.
_COPY_BYTES = 128 * 1024 * 1024
_MATMUL_N = 1024
_REPEATS = 3


def _best_of(fn, repeats: int = _REPEATS) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


@functools.lru_cache(maxsize=1)
def probe() -> dict[str, float]:
    """``{"memory_gbs": copy bandwidth (read + write), "matmul_gflops": float32 GEMM}``."""
    src = np.ones(_COPY_BYTES // 4, dtype=np.float32)
    dst = np.empty_like(src)
    np.copyto(dst, src)  # faults both arrays' pages in
    seconds = _best_of(lambda: np.copyto(dst, src), repeats=5)
    memory_gbs = 2 * _COPY_BYTES / seconds / 1e9
    a = np.random.default_rng(0).random((_MATMUL_N, _MATMUL_N), dtype=np.float32)
    a @ a  # starts the BLAS thread pool, which the first product would pay for
    seconds = _best_of(lambda: a @ a, repeats=5)
    matmul_gflops = 2 * _MATMUL_N**3 / seconds / 1e9
    return {"memory_gbs": round(memory_gbs, 2), "matmul_gflops": round(matmul_gflops, 1)}
