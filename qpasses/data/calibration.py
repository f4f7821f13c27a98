"""Calibration: run the FP32 model over the data once and stream the tensors to observe into observers.

The tensors to observe become extra graph outputs; onnxruntime keeps requested outputs intact
through its graph optimizations, so the sessions run with all of them enabled (onnxruntime's own
calibrator switches them off and runs ~2x slower). Only the observers survive a run, so memory does
not grow with the number of samples. The statistics of one run are computed in a worker thread
while onnxruntime runs the next: both release the GIL, so the two overlap.

A run keeps every requested output alive until it ends, so its memory grows with rows x observed
tensors (a YOLOv8n at 640x640 exposes ~200 MB per sample). ``max_bytes_per_run`` caps the bytes
one run may return. When the batch axis is dynamic every run covers one row (one sample): the
values then do not depend on the batch size (onnxruntime picks some kernels by batch size, and
they round differently), and a run returns the least there is to return. Each tensor's bytes per
row are estimated by shape inference at the feed's shapes (onnxruntime measures, through ``Shape``
outputs, what inference cannot tell); when one row is over the budget, the model is cut into
consecutive segments, each its own session fed with the values the earlier ones produced, so
every node still runs once per row. Cuts fall only between requested tensors and the sessions
leave out the NCHWc layout, so a segment computes bit for bit what the whole model computes. The
statistics do not depend on how the values arrive (min/max trivially; histograms sit on a grid
of power-of-two bins that depends only on the overall range, see ``_GridHistogram``): the
encodings are the same for any cap and any calibration batch size.

Modules: ``sessions`` (sessions with extra outputs), ``run_segments`` (cutting a run under the byte
cap), ``tensor_tap`` (``TensorTap`` / ``iterate_tensors`` / ``capture_tensors``: the reusable lower
level SeqMSE, the learned passes and AMP capture layer inputs with); this module: the statistics.
"""

from __future__ import annotations

import itertools
import math
import operator
import sys
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import closing
from dataclasses import dataclass, field

import numpy as np
import onnx
from tqdm import tqdm

from qpasses.core.errors import CalibrationDataError
from qpasses.data.tensor_tap import DEFAULT_MAX_BYTES_PER_RUN, Feed, iterate_chunks
from qpasses.quant.range_statistics import DEFAULT_BINS, ChannelMeans, HistogramObserver, MinMaxObserver

Observer = MinMaxObserver | HistogramObserver
# Elements per chunk of the histogram update: its float64/index scratch then stays in L2 cache.
_CHUNK = 1 << 16

# --- statistics ----------------------------------------------------------------------------------------


def _range(name: str, value: np.ndarray, batch: int) -> tuple[float, float]:
    """Exact min/max in the value's own dtype (no float64 copy); NaN/inf are errors, as in the observers."""
    lo, hi = value.min(), value.max()
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise CalibrationDataError(f"tensor '{name}' has NaN or infinite values in batch {batch}")
    return float(lo), float(hi)


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
class _HistogramScratch:
    """Reused buffers of the chunked histogram update (one per worker; never shared between threads)."""

    values: np.ndarray = field(default_factory=lambda: np.empty(_CHUNK, np.float64))
    index: np.ndarray = field(default_factory=lambda: np.empty(_CHUNK, np.intp))


@dataclass(eq=False)
class _GridHistogram:
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

    def update(self, x: np.ndarray, lo: float, hi: float, scratch: _HistogramScratch) -> None:
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


@dataclass(eq=False)
class _Collector:
    """Running ranges (and histograms) by tensor name, for tensors that have shown values.

    The ranges and histograms do not depend on how the values are split into pieces (rows, runs,
    batches): min/max trivially, histograms by construction (``_GridHistogram``). Channel means sum
    in float64, so their last bits do.
    """

    histogram: bool
    bins: int
    ranges: dict[str, tuple[float, float]] = field(default_factory=dict)
    histograms: dict[str, _GridHistogram] = field(default_factory=dict)
    scratch: _HistogramScratch = field(default_factory=_HistogramScratch)
    ranged: frozenset[str] = frozenset()
    means: dict[str, ChannelMeans] = field(default_factory=dict)

    def observe(self, values: dict[str, np.ndarray], batch: int) -> None:
        for name, value in values.items():
            if name in self.means:
                self.means[name].update(value)
            if value.size == 0 or name not in self.ranged:
                continue
            lo, hi = _range(name, value, batch)
            seen = self.ranges.get(name)
            self.ranges[name] = (lo, hi) if seen is None else (min(seen[0], lo), max(seen[1], hi))
            if self.histogram:
                hist = self.histograms.get(name)
                if hist is None:
                    hist = self.histograms[name] = _GridHistogram(self.bins)
                hist.update(value, lo, hi, self.scratch)

    def observers(self) -> dict[str, Observer]:
        if self.histogram:
            return {name: hist.observer() for name, hist in self.histograms.items()}
        out: dict[str, Observer] = {}
        for name, (lo, hi) in self.ranges.items():
            # A per-tensor MinMaxObserver keeps only min and max, so one update with the overall
            # range is exact; per batch it would cost a float64 copy of every activation.
            obs = out[name] = MinMaxObserver()
            obs.update(np.array([lo, hi]))
        return out


def collect_statistics(
    model: onnx.ModelProto,
    tensors: Sequence[str],
    feeds: Iterable[Feed],
    *,
    histogram: bool = False,
    progress: bool = True,
    num_batches: int | None = None,
    bins: int = DEFAULT_BINS,
    overlap: bool = True,
    channel_means: dict[str, ChannelMeans] | None = None,
    max_bytes_per_run: int | None = DEFAULT_MAX_BYTES_PER_RUN,
) -> dict[str, Observer]:
    """Per-tensor observers over all batches of ``feeds`` (dicts of input name -> batch array).

    ``histogram`` selects HistogramObserver (for enhanced / percentile modes) over MinMaxObserver;
    its grid is canonical (``_GridHistogram``): more than ``bins / 2`` and at most ``bins`` bins span
    the range. ``num_batches`` caps how many batches are read (and sizes the progress bar, on stderr).
    ``overlap`` computes statistics in a worker thread while onnxruntime runs the next piece.
    ``max_bytes_per_run`` caps the bytes of the tensors one onnxruntime run returns (one row per run,
    and consecutive segments of the model when a row is over it); the observers depend neither on it
    nor on the batch size. None: one run per batch, as before the cap (memory grows with the batch,
    and the values may depend on the batch size in the last bit). Tensors that never showed a value (unknown, constant,
    always empty) are absent from the result; ``unavailable_tensors`` tells why for the first two.
    ``channel_means`` (tensor -> ChannelMeans) are updated in place in the same pass over the data
    (bias correction uses them).
    """
    total = operator.length_hint(feeds) or None  # CalibrationData and lists know their length
    if num_batches is not None:
        feeds = itertools.islice(feeds, num_batches)
        total = num_batches if total is None else min(total, num_batches)
    means = channel_means or {}
    collector = _Collector(histogram, bins, ranged=frozenset(tensors), means=means)
    bar = tqdm(total=total, unit="batch", desc="calibrating", file=sys.stderr, disable=not progress, leave=False)
    stream = iterate_chunks(model, list(dict.fromkeys([*tensors, *means])), feeds, max_bytes_per_run)
    done = 0  # batches all of whose pieces have been observed

    def finished(batch: int) -> None:
        nonlocal done
        if batch > done:
            bar.update(batch - done)
            done = batch

    with closing(stream), bar:
        if not overlap:
            for batch, values in stream:
                finished(batch)
                collector.observe(values, batch)
                del values
        else:
            with ThreadPoolExecutor(max_workers=1, thread_name_prefix="qpasses-calibration") as worker:
                pending: Future[None] | None = None
                for batch, values in stream:
                    if pending is not None:
                        pending.result()  # at most one piece waits: memory stays flat; worker errors surface here
                        finished(batch)
                    pending = worker.submit(collector.observe, values, batch)
                    del values
                if pending is not None:
                    pending.result()
        if total is not None and bar.n < total:
            bar.update(total - bar.n)
        return collector.observers()
