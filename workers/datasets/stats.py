"""Whole-file statistics in fixed memory: a length histogram and a duplicate finder that
spills row digests to disk."""

from __future__ import annotations

import heapq
import math
import tempfile
from array import array
from collections.abc import Iterator
from pathlib import Path

# Lengths below EXACT are counted one by one; above, each power of two is split into
# SUB bins (about 1.1% wide), which is finer than any percentile is read to.
EXACT = 1024
SUB_BITS = 6
SUB = 1 << SUB_BITS
_EXACT_BITS = EXACT.bit_length() - 1


def _bin(n: int) -> int:
    if n < EXACT:
        return n
    e = n.bit_length() - 1
    return EXACT + (e - _EXACT_BITS) * SUB + ((n >> (e - SUB_BITS)) & (SUB - 1))


def _bin_range(b: int) -> tuple[int, int]:
    """The lengths in bin b, inclusive."""
    if b < EXACT:
        return b, b
    e = (b - EXACT) // SUB + _EXACT_BITS
    sub = (b - EXACT) % SUB
    lo = (SUB + sub) << (e - SUB_BITS)
    return lo, lo + (1 << (e - SUB_BITS)) - 1


class LengthHistogram:
    """Counts of lengths in fine logarithmic bins: percentiles within about 1%, in a
    structure whose size does not depend on the number of rows."""

    def __init__(self) -> None:
        self.bins: dict[int, int] = {}
        self.count = 0
        self.total = 0
        self.min: int | None = None
        self.max: int | None = None

    def add(self, n: int) -> None:
        b = n if n < EXACT else _bin(n)
        bins = self.bins
        bins[b] = bins.get(b, 0) + 1
        self.count += 1
        self.total += n
        if self.min is None or n < self.min:
            self.min = n
        if self.max is None or n > self.max:
            self.max = n

    def percentile(self, p: float) -> int:
        if not self.count:
            return 0
        rank = max(1, math.ceil(self.count * p / 100))
        seen = 0
        for b in sorted(self.bins):
            seen += self.bins[b]
            if seen >= rank:
                lo, hi = _bin_range(b)
                return min(max((lo + hi) // 2, self.min), self.max)
        return self.max

    def stats(self) -> dict[str, float] | None:
        if not self.count:
            return None
        return {
            "min": self.min,
            "max": self.max,
            "mean": round(self.total / self.count, 1),
            "p50": self.percentile(50),
            "p95": self.percentile(95),
            "total": self.total,
        }

    def buckets(self, target: int = 12) -> list[dict[str, int]]:
        """About `target` bars for a small chart: equal widths, or equal ratios when the
        lengths span more than an order of magnitude (a few long rows would otherwise put
        everything else in the first bar)."""
        if not self.count:
            return []
        lo, hi = self.min, self.max
        if hi - lo + 1 <= target:
            edges = list(range(lo, hi + 2))
        elif hi > 16 * max(lo, 1):
            ratio = (hi / max(lo, 1)) ** (1 / target)
            edges = [lo]
            for i in range(1, target):
                edge = max(round(max(lo, 1) * ratio**i), edges[-1] + 1)
                if edge > hi:
                    break
                edges.append(edge)
            edges.append(hi + 1)
        else:
            width = math.ceil((hi - lo + 1) / target)
            edges = list(range(lo, hi + 1, width)) + [hi + 1]
        counts = [0] * (len(edges) - 1)
        for b, c in self.bins.items():
            blo, bhi = _bin_range(b)
            mid = min(max((blo + bhi) // 2, lo), hi)
            # Bars are found by bisection over at most a dozen edges.
            i = _bisect(edges, mid)
            counts[i] += c
        return [
            {"lo": edges[i], "hi": edges[i + 1] - 1, "count": counts[i]} for i in range(len(counts))
        ]


def _bisect(edges: list[int], x: int) -> int:
    lo, hi = 0, len(edges) - 1
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if edges[mid] <= x:
            lo = mid
        else:
            hi = mid
    return lo


# Digests held in memory before they are written out to the bucket files.
SPILL_BUFFER_BYTES = 1 << 20


class HashSpill:
    """64-bit row digests, bucketed by their low byte and spilled to one file per bucket
    once the buffers pass `buffer_bytes`, so memory stays flat whatever the row count:
    duplicates are then counted one bucket at a time. With `with_numbers`, each digest is
    stored with its row number so that later copies can be named."""

    BUCKETS = 256

    def __init__(
        self,
        directory: Path | None = None,
        *,
        with_numbers: bool = False,
        buffer_bytes: int | None = None,
    ) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="aibox-dataset-", dir=directory)
        self.dir = Path(self._tmp.name)
        self.with_numbers = with_numbers
        self.buffer_items = max(1, (buffer_bytes or SPILL_BUFFER_BYTES) // 8)
        self.buffers = [array("q") for _ in range(self.BUCKETS)]
        self.buffered = 0
        self.spilled = False
        self.count = 0

    def __enter__(self) -> HashSpill:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.buffers = []
        self._tmp.cleanup()

    def add(self, digest: int, number: int = 0) -> None:
        buf = self.buffers[digest & 255]
        buf.append(digest)
        if self.with_numbers:
            buf.append(number)
            self.buffered += 2
        else:
            self.buffered += 1
        self.count += 1
        if self.buffered >= self.buffer_items:
            self._flush()

    def _flush(self) -> None:
        for i, buf in enumerate(self.buffers):
            if buf:
                with open(self.dir / f"{i:02x}", "ab") as f:
                    buf.tofile(f)
                del buf[:]
        self.buffered = 0
        self.spilled = True

    def _bucket(self, i: int) -> array:
        if not self.spilled:
            return self.buffers[i]
        values = array("q")
        path = self.dir / f"{i:02x}"
        if path.exists():
            values.frombytes(path.read_bytes())
        return values

    def duplicates(self) -> int:
        """How many digests repeat an earlier one."""
        if self.spilled:
            self._flush()
        dupes = 0
        for i in range(self.BUCKETS):
            values = self._bucket(i)
            digests = values[::2] if self.with_numbers else values
            dupes += len(digests) - len(set(digests))
        return dupes

    def repeated_numbers(self) -> Iterator[int]:
        """The row numbers of every later copy, ascending (needs with_numbers)."""
        assert self.with_numbers
        if self.spilled:
            self._flush()
        streams = []
        for i in range(self.BUCKETS):
            values = self._bucket(i)
            seen: set[int] = set()
            repeated = array("q")
            # Within a bucket digests are in row order, so the first one seen is the
            # first occurrence in the file.
            for j in range(0, len(values), 2):
                digest = values[j]
                if digest in seen:
                    repeated.append(values[j + 1])
                else:
                    seen.add(digest)
            if repeated:
                path = self.dir / f"repeated-{i:02x}"
                path.write_bytes(repeated.tobytes())
                streams.append(_read_numbers(path))
            del values, seen, repeated
        return heapq.merge(*streams)


def _read_numbers(path: Path, chunk: int = 512) -> Iterator[int]:
    with open(path, "rb") as f:
        while data := f.read(chunk * 8):
            yield from array("q", data)
