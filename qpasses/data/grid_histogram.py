"""The canonical grid histogram: exact counts of every value on a grid of power-of-two bins set by the overall
range only, so the counts do not depend on how the values are batched (see ``GridHistogram``)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from qpasses.quant.range_statistics import HistogramObserver

# Elements per chunk of the histogram update: its float64/index scratch then stays in L2 cache.
_CHUNK = 1 << 16
# Smallest bin exponent: 2^-1000 still scales any finite float64 to a finite number below 2^61.
_MIN_EXPONENT = -1000
# Bins are at least 2^-60 of the largest magnitude (only binding for a range of one value).
_RELATIVE_EXPONENT = 60


def _grid_exponent(lo: float, hi: float, capacity: int) -> int:
    """Smallest ``e`` whose bins of width ``2^e`` (edges at multiples of ``2^e``) span [lo, hi] in ``capacity`` bins.

    It depends only on ``lo`` and ``hi`` and never decreases as the range widens, which is what
    makes the histogram independent of how the values are batched.
    """
    magnitude = max(abs(lo), abs(hi))
    e = _MIN_EXPONENT if magnitude == 0.0 else max(math.frexp(magnitude)[1] - _RELATIVE_EXPONENT, _MIN_EXPONENT)
    if hi > lo:  # at 2^e <= (hi - lo) / (capacity + 1) the range needs more bins: start just under that
        e = max(e, math.frexp((hi - lo) / (capacity + 1))[1] - 3)
    while math.floor(math.ldexp(hi, -e)) - math.floor(math.ldexp(lo, -e)) >= capacity:
        e += 1
    return e


@dataclass(eq=False)
class HistogramScratch:
    """Reused buffers of the chunked histogram update (one per worker; never shared between threads)."""

    values: np.ndarray = field(default_factory=lambda: np.empty(_CHUNK, np.float64))
    index: np.ndarray = field(default_factory=lambda: np.empty(_CHUNK, np.intp))


@dataclass(eq=False)
class GridHistogram:
    """Exact counts of every value seen on a canonical grid, so the result does not depend on batching.

    Bin ``k`` holds the values with ``floor(x / 2^e) == k``, where ``e`` is ``_grid_exponent`` of the
    overall min/max with room for ``bins`` bins: more than ``bins / 2`` and at most ``bins`` bins
    cover [min, max] (the modes' search then costs no more than on a ``bins``-bin histogram).
    ``x / 2^e`` is exact in float64 and so is its floor, so every value lands in its exact bin; when the range grows,
    ``e`` only grows and each old bin falls entirely into one new bin. After any sequence of
    updates the counts are those of the one-shot histogram of all the values on the final grid:
    identical whatever the batch size, the cap per run or the order of the batches.
    """

    bins: int
    exponent: int = 0
    base: int = 0  # grid index of counts[0]
    counts: np.ndarray | None = None
    min: float = math.inf
    max: float = -math.inf

    @property
    def capacity(self) -> int:
        return self.bins

    def update(self, x: np.ndarray, lo: float, hi: float, scratch: HistogramScratch) -> None:
        lo, hi = min(self.min, lo), max(self.max, hi)
        e = _grid_exponent(lo, hi, self.capacity)
        base = math.floor(math.ldexp(lo, -e))
        if self.counts is None:
            self.counts = np.zeros(self.capacity, np.int64)
        elif (e, base) != (self.exponent, self.base):
            filled = np.flatnonzero(self.counts)
            moved = ((filled + self.base) >> (e - self.exponent)) - base  # floor division by 2^(e - old e)
            merged = np.zeros(self.capacity, np.int64)
            np.add.at(merged, moved, self.counts[filled])
            self.counts = merged
        self.exponent, self.base, self.min, self.max = e, base, lo, hi
        scale, counts = math.ldexp(1.0, -e), self.counts
        flat = x.reshape(-1)
        for start in range(0, flat.size, _CHUNK):
            chunk = flat[start : start + _CHUNK]
            q = scratch.values[: chunk.size]
            np.multiply(chunk, scale, out=q, dtype=np.float64)  # exact: a power of two, far from overflow
            np.floor(q, out=q)
            np.subtract(q, base, out=q)  # exact: integers whose difference is below the capacity
            index = scratch.index[: chunk.size]
            np.copyto(index, q, casting="unsafe")
            counts += np.bincount(index, minlength=self.capacity)

    def observer(self) -> HistogramObserver:
        """A HistogramObserver holding these counts (trimmed to the occupied bins), for ``range_search.compute``."""
        assert self.counts is not None
        used = math.floor(math.ldexp(self.max, -self.exponent)) - self.base + 1
        obs = HistogramObserver(max(used, 2))
        obs._lo, obs._width = math.ldexp(float(self.base), self.exponent), math.ldexp(1.0, self.exponent)
        obs._counts = self.counts[: obs.bins].copy()
        obs._min, obs._max = self.min, self.max
        return obs
