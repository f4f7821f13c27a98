"""Streaming range statistics for calibration.

Observers see one batch at a time and keep a fixed amount of state, so calibration memory does not
grow with the number of samples (onnxruntime's histogram calibrators keep every activation until
the end). ``range_search.compute`` accepts an observer directly.

``SampleExtremes`` finds calibration samples that set a range far beyond all the others (one corrupt
value of 1e30 made the digits CNN's input scale 3.9e27); ``FixedHistogramObserver`` then collects a
histogram on the rest's range without them, so percentile/enhanced encodings are not moved by them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Final

import numpy as np
from numpy.typing import ArrayLike

from qpasses.core.errors import CalibrationDataError

DEFAULT_BINS = 2048
OUTLIER_RATIO: Final = 100.0
"""A sample is an outlier when its values reach beyond the other samples' range by more than this many times
that range's width."""
MAX_OUTLIER_SAMPLES: Final = 7
"""At most this many samples (and fewer than half of them) are set aside as outliers."""


class CalibrationOutlierWarning(UserWarning):
    """A few calibration samples set a tensor's range far beyond all the other samples (see ``SampleExtremes``)."""


def _finite_batch(values: ArrayLike) -> np.ndarray:
    """Batch as float64; non-finite values would poison every range, so they are an error, not skipped."""
    x = np.asarray(values, dtype=np.float64)
    if x.size and not np.isfinite(x).all():
        raise CalibrationDataError(f"calibration batch of shape {x.shape} contains NaN or infinite values")
    return x


def _bin_width(lo: float, hi: float, bins: int) -> float:
    """Smallest width whose ``bins`` bins reach ``hi`` from ``lo`` (a zero span still gets a positive width)."""
    span = hi - lo
    if span <= 0.0:
        span = max(abs(lo), 1.0) * 1e-7
    width = span / bins
    while lo + width * bins < hi:
        width = float(np.nextafter(width, np.inf))
    return width


def _bin_index(x: np.ndarray, lo: float, width: float, bins: int) -> np.ndarray:
    """Bin of each value; clipping only absorbs float rounding at the edges, never drops a value."""
    return np.clip(np.floor((x - lo) / width), 0, bins - 1).astype(np.intp)


@dataclass(frozen=True, eq=False)
class Histogram:
    """Counts in equal bins over ``[lo, lo + width * len(counts)]``, with the exact observed min/max.

    The bins may extend past the data (after the range grew); ``min``/``max`` stay exact so that
    min/max encodings from a histogram equal those from a ``MinMaxObserver``.
    """

    lo: float
    width: float
    counts: np.ndarray
    min: float
    max: float

    @classmethod
    def from_values(cls, values: ArrayLike, bins: int = DEFAULT_BINS) -> Histogram:
        """One-shot histogram spanning exactly the data's range."""
        x = _finite_batch(values).ravel()
        if x.size == 0:
            raise CalibrationDataError("cannot build a histogram from an empty array")
        lo, hi = float(x.min()), float(x.max())
        width = _bin_width(lo, hi, bins)
        counts = np.bincount(_bin_index(x, lo, width, bins), minlength=bins).astype(np.int64)
        return cls(lo, width, counts, lo, hi)

    @property
    def total(self) -> int:
        return int(self.counts.sum())

    @property
    def edges(self) -> np.ndarray:
        return self.lo + self.width * np.arange(len(self.counts) + 1)

    @property
    def centers(self) -> np.ndarray:
        return self.lo + self.width * (np.arange(len(self.counts)) + 0.5)

    def quantile(self, q: float) -> float:
        """Value below which a fraction ``q`` of the samples lie, interpolated linearly inside a bin."""
        cum = np.cumsum(self.counts)
        target = q * cum[-1]
        i = min(int(np.searchsorted(cum, target, side="left")), len(cum) - 1)
        before = cum[i - 1] if i else 0
        frac = (target - before) / self.counts[i] if self.counts[i] else 0.0
        return float(np.clip(self.lo + (i + frac) * self.width, self.min, self.max))


@dataclass(eq=False)
class MinMaxObserver:
    """Running min/max, per tensor or per channel along ``axis``.

    ``min``/``max`` have one entry per channel (a single entry per tensor); ``None`` until data arrives.
    """

    axis: int | None = None
    min: np.ndarray | None = field(default=None, init=False)
    max: np.ndarray | None = field(default=None, init=False)

    def update(self, values: ArrayLike) -> None:
        x = _finite_batch(values)
        if self.axis is None:
            rows = x.reshape(1, -1)
        else:
            if not -x.ndim <= self.axis < x.ndim:
                raise CalibrationDataError(f"channel axis {self.axis} is out of range for a batch of shape {x.shape}")
            rows = np.moveaxis(x, self.axis, 0).reshape(x.shape[self.axis], -1)
        if rows.size == 0:
            return
        lo, hi = rows.min(axis=1), rows.max(axis=1)
        if self.min is None or self.max is None:
            self.min, self.max = lo, hi
            return
        if lo.shape != self.min.shape:
            raise CalibrationDataError(
                f"batch has {lo.shape[0]} channels along axis {self.axis}, earlier batches had {self.min.shape[0]}"
            )
        self.min, self.max = np.minimum(self.min, lo), np.maximum(self.max, hi)


@dataclass(eq=False)
class HistogramObserver:
    """Streaming fixed-size histogram whose range grows to cover every batch.

    AIMET fixes the range from the first batch and silently drops later values outside it. Here a
    batch beyond the range widens the bins by an integer factor, aligned to the old edges, so old
    counts merge exactly into new bins: no value is ever dropped and memory stays ``bins`` counts.
    """

    bins: int = DEFAULT_BINS
    _lo: float = field(default=0.0, init=False, repr=False)
    _width: float = field(default=0.0, init=False, repr=False)
    _counts: np.ndarray | None = field(default=None, init=False, repr=False)
    _min: float = field(default=math.inf, init=False, repr=False)
    _max: float = field(default=-math.inf, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.bins < 2:
            raise CalibrationDataError(f"a histogram needs at least 2 bins, got {self.bins}")

    def update(self, values: ArrayLike) -> None:
        x = _finite_batch(values).ravel()
        if x.size == 0:
            return
        lo, hi = float(x.min()), float(x.max())
        if self._counts is None:
            self._lo, self._width = lo, _bin_width(lo, hi, self.bins)
            self._counts = np.zeros(self.bins, dtype=np.int64)
        elif lo < self._lo or hi > self._lo + self._width * self.bins:
            self._grow(lo, hi)
        self._counts += np.bincount(_bin_index(x, self._lo, self._width, self.bins), minlength=self.bins)
        self._min, self._max = min(self._min, lo), max(self._max, hi)

    def _grow(self, lo: float, hi: float) -> None:
        """Merge groups of ``k`` old bins (shifted ``left`` old bins down) so the range covers [lo, hi]."""
        assert self._counts is not None
        left = max(0, math.ceil((self._lo - lo) / self._width))
        right = max(self.bins, math.ceil((hi - self._lo) / self._width))
        k = max(1, -(-(left + right) // self.bins))
        merged = np.zeros(self.bins, dtype=np.int64)
        if k >= self.bins:
            # Old bins land in at most two new ones; left and k may exceed int64 (a range grown 1e30-fold).
            first, last = left // k, (left + self.bins - 1) // k
            split = min(self.bins, (first + 1) * k - left)  # first old bin that moves on to ``last``
            merged[first] += self._counts[:split].sum()
            merged[last] += self._counts[split:].sum()
        else:
            np.add.at(merged, (np.arange(self.bins) + left) // k, self._counts)
        self._lo -= left * self._width
        self._width *= k
        self._counts = merged

    @property
    def histogram(self) -> Histogram:
        """Snapshot of the counts so far."""
        if self._counts is None:
            raise CalibrationDataError("histogram observer has not seen any values")
        return Histogram(self._lo, self._width, self._counts.copy(), self._min, self._max)


@dataclass(frozen=True)
class Outliers:
    """Samples (in arrival order) whose values reach far beyond the range of all the others."""

    samples: tuple[int, ...]
    rest_min: float  # range of every other sample's values
    rest_max: float
    high: float | None  # the outlier samples' extreme values beyond that range (None: not on that side)
    low: float | None

    def describe(self) -> str:
        which = ", ".join(map(str, self.samples))
        parts = [f"max {self.high:.4g}"] if self.high is not None else []
        parts += [f"min {self.low:.4g}"] if self.low is not None else []
        return (
            f"sample{'s' if len(self.samples) > 1 else ''} {which} ({', '.join(parts)}) vs "
            f"[{self.rest_min:.4g}, {self.rest_max:.4g}] for every other sample"
        )


@dataclass(eq=False)
class SampleExtremes:
    """Streaming extremes per sample: the ``keep`` highest sample maxima and lowest sample minima.

    A sample is a row along axis 0 of each value passed to ``update`` (the batch axis), numbered in
    arrival order over all updates; memory is constant. ``outliers`` tells whether a few samples set
    the range far beyond the others (``OUTLIER_RATIO``).
    """

    keep: int = MAX_OUTLIER_SAMPLES + 1
    samples: int = 0
    top: list[tuple[float, int]] = field(default_factory=list)  # (sample max, sample), highest first
    bottom: list[tuple[float, int]] = field(default_factory=list)  # (sample min, sample), lowest first

    def update(self, values: ArrayLike) -> None:
        x = np.asarray(values)
        if x.size == 0:
            return
        rows = x.reshape(x.shape[0] if x.ndim else 1, -1)
        self.update_extremes(rows.max(axis=1), rows.min(axis=1))

    def update_extremes(self, hi: np.ndarray, lo: np.ndarray) -> None:
        """``update`` from the samples' maxima and minima, when a caller already has them."""
        n = len(hi)
        k = min(self.keep, n)
        best = np.argpartition(-hi, k - 1)[:k] if k < n else np.arange(n)
        worst = np.argpartition(lo, k - 1)[:k] if k < n else np.arange(n)
        self.top = sorted(
            [*self.top, *((float(hi[i]), self.samples + int(i)) for i in best)], key=lambda e: (-e[0], e[1])
        )[: self.keep]
        self.bottom = sorted(
            [*self.bottom, *((float(lo[i]), self.samples + int(i)) for i in worst)], key=lambda e: (e[0], e[1])
        )[: self.keep]
        self.samples += n

    def outliers(self, ratio: float = OUTLIER_RATIO) -> Outliers | None:
        """The fewest samples whose maxima (minima) exceed the others' range by ``ratio`` times its width.

        Both sides at once (a huge negative sample must not hide a huge positive one by widening the
        "rest"), at most ``keep - 1`` samples and fewer than half of them; None when there are none.
        """
        limit = min(self.keep - 1, (self.samples - 1) // 2)
        best: tuple[int, int] | None = None
        for total in range(1, limit + 1):
            for j in range(total + 1):  # j from the top, total - j from the bottom
                if self._separates(j, total - j, ratio):
                    best = (j, total - j)
                    break
            if best is not None:
                break
        if best is None:
            return None
        j, i = best
        out = {s for _, s in self.top[:j]} | {s for _, s in self.bottom[:i]}
        rest_max = next(v for v, s in self.top if s not in out)
        rest_min = next(v for v, s in self.bottom if s not in out)
        return Outliers(
            tuple(sorted(out)), rest_min, rest_max, self.top[0][0] if j else None, self.bottom[0][0] if i else None
        )

    def _separates(self, j: int, i: int, ratio: float) -> bool:
        """Whether the top ``j`` sample maxima and bottom ``i`` minima all lie beyond the rest by ``ratio`` widths."""
        if j > len(self.top) - 1 or i > len(self.bottom) - 1:
            return False
        out = {s for _, s in self.top[:j]} | {s for _, s in self.bottom[:i]}
        rest_max = next((v for v, s in self.top if s not in out), None)
        rest_min = next((v for v, s in self.bottom if s not in out), None)
        if rest_max is None or rest_min is None:
            return False
        margin = ratio * max(rest_max - rest_min, MIN_WIDTH)
        high = all(v - rest_max > margin for v, s in self.top[:j])
        low = all(rest_min - v > margin for v, s in self.bottom[:i])
        return high and low


MIN_WIDTH: Final = 1e-4
"""The spec's minimum encoding range: a range narrower than this counts as this wide."""


@dataclass(eq=False)
class FixedHistogramObserver:
    """Counts on a fixed grid of ``bins`` bins over ``[lo, hi]``, leaving out whole samples and out-of-range values.

    Samples are rows along axis 0, numbered in arrival order as in ``SampleExtremes``. The bin of a
    value depends only on the value, so the counts do not depend on how the data is batched.
    ``dropped`` counts values outside ``[lo, hi]`` from samples that were not skipped (none, when the
    data is read in the same order as when ``[lo, hi]`` was measured).
    """

    lo: float
    hi: float
    skip: frozenset[int] = frozenset()
    bins: int = DEFAULT_BINS
    samples: int = 0
    dropped: int = 0
    _counts: np.ndarray | None = field(default=None, init=False, repr=False)
    _min: float = field(default=math.inf, init=False, repr=False)
    _max: float = field(default=-math.inf, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.bins < 2:
            raise CalibrationDataError(f"a histogram needs at least 2 bins, got {self.bins}")
        self._width = _bin_width(self.lo, self.hi, self.bins)
        self._counts = np.zeros(self.bins, dtype=np.int64)

    def update(self, values: ArrayLike) -> None:
        x = _finite_batch(values)
        if x.size == 0:
            return
        rows = x.reshape(x.shape[0] if x.ndim else 1, -1)
        first, n = self.samples, rows.shape[0]
        self.samples += n
        skipped = [i - first for i in self.skip if first <= i < first + n]
        if skipped:
            rows = np.delete(rows, skipped, axis=0)
        flat = rows.ravel()
        inside = flat[(flat >= self.lo) & (flat <= self.hi)]
        self.dropped += flat.size - inside.size
        if inside.size == 0:
            return
        assert self._counts is not None
        self._counts += np.bincount(_bin_index(inside, self.lo, self._width, self.bins), minlength=self.bins)
        self._min, self._max = min(self._min, float(inside.min())), max(self._max, float(inside.max()))

    @property
    def histogram(self) -> Histogram:
        if self._counts is None or not self._counts.any():
            raise CalibrationDataError("histogram observer has not seen any values")
        return Histogram(self.lo, self._width, self._counts.copy(), self._min, self._max)


@dataclass(eq=False)
class SkipSamples:
    """Passes each update on to ``observer`` without the rows (samples along axis 0, in arrival order) in ``skip``."""

    observer: ChannelMeans | MinMaxObserver | HistogramObserver
    skip: frozenset[int]
    samples: int = 0

    def update(self, values: ArrayLike) -> None:
        x = np.asarray(values)
        if x.size == 0:
            return
        n = x.shape[0] if x.ndim else 1
        first = self.samples
        self.samples += n
        drop = [i - first for i in self.skip if first <= i < first + n]
        if drop and x.ndim:
            x = np.delete(x, drop, axis=0)
        elif drop:
            return
        self.observer.update(x)


@dataclass
class ChannelExtremes:
    """Running per-channel min and max along axis 1 (NCHW / [batch, features])."""

    mins: np.ndarray | None = None
    maxs: np.ndarray | None = None

    def update(self, values: np.ndarray) -> None:
        v = np.asarray(values)
        if v.ndim < 2 or v.size == 0:
            return
        axes = tuple(i for i in range(v.ndim) if i != 1)
        lo, hi = v.min(axis=axes).astype(np.float64), v.max(axis=axes).astype(np.float64)
        self.mins = lo if self.mins is None else np.minimum(self.mins, lo)
        self.maxs = hi if self.maxs is None else np.maximum(self.maxs, hi)


@dataclass
class ChannelMeans:
    """Running per-channel mean along axis 1 (NCHW / [batch, features]), e.g. for bias correction;
    ``power``: of the squared values (a channel's mean power)."""

    sums: np.ndarray | None = None
    count: int = 0
    power: bool = False

    def update(self, values: np.ndarray) -> None:
        v = np.asarray(values)
        if v.ndim < 2 or v.size == 0:
            return
        if self.power:
            v = np.square(v, dtype=np.float64)
        total = v.sum(axis=tuple(i for i in range(v.ndim) if i != 1), dtype=np.float64)
        self.sums = total if self.sums is None else self.sums + total
        self.count += v.size // v.shape[1]

    @property
    def mean(self) -> np.ndarray | None:
        return None if self.sums is None else self.sums / self.count
