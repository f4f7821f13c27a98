"""The one collector: every statistic of a read measured in one pass over the calibration data.

Each feed goes through at most two taps: the capped one (``TensorTap.chunks``: one row per run, the model
in segments when a row is over ``max_bytes_per_run``), which serves ranges, histograms, channel means and
sample extremes, and the whole-batch one (one run per feed), which serves captured values (a captured
tensor keeps the model's own layout, wherever its batch axis is) and requests made with no cap. Each tap
runs only on the batches its requests cover (the first ``batches``, or all). The statistics of one piece
are computed in a worker thread while onnxruntime runs the next: both release the GIL, so they overlap.

Every statistic here depends on the values alone, not on how they arrive: min/max trivially, histograms
by construction (``GridHistogram``); channel means sum in float64 one update per row (per batch for a
graph input), as calibration always did.
"""

from __future__ import annotations

import itertools
import math
import operator
import sys
from collections.abc import Hashable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

import numpy as np
import onnx
from tqdm import tqdm

from qpasses.core.errors import CalibrationDataError
from qpasses.data.grid_histogram import GridHistogram, HistogramScratch
from qpasses.data.tensor_tap import Feed, TensorTap
from qpasses.quant.range_statistics import ChannelExtremes, ChannelMeans, HistogramObserver, SampleExtremes

# --- what one tensor accumulates ---------------------------------------------------------------------------


class Piece:
    """One tensor's values in one piece of a batch; min/max computed once for every accumulator that needs them."""

    __slots__ = ("value", "batch", "scratch", "_lohi")

    def __init__(self, value: np.ndarray, batch: int, scratch: HistogramScratch) -> None:
        self.value, self.batch, self.scratch = value, batch, scratch
        self._lohi: tuple[float, float] | None = None

    @property
    def lohi(self) -> tuple[float, float]:
        """Exact min/max in the value's own dtype (no float64 copy); may be NaN/inf."""
        if self._lohi is None:
            self._lohi = (float(self.value.min()), float(self.value.max()))
        return self._lohi


class Accumulator(Protocol):
    def update(self, piece: Piece) -> None: ...

    def result(self) -> Any: ...


class ObservedRange(NamedTuple):
    """min/max over a tensor's finite values; ``nonfinite_batch``: the first batch with a NaN or infinity."""

    min: float
    max: float
    nonfinite_batch: int | None
    floating: bool

    @property
    def width(self) -> float:
        """max - min with 0 included, as an integer grid's range is (its step: width / levels)."""
        return max(self.max, 0.0) - min(self.min, 0.0)


@dataclass(eq=False)
class RangeAccumulator:
    lo: float = math.inf
    hi: float = -math.inf
    nonfinite_batch: int | None = None
    floating: bool = False

    def update(self, piece: Piece) -> None:
        value = piece.value
        if not value.size:
            return
        self.floating = bool(np.issubdtype(value.dtype, np.floating))
        lo, hi = piece.lohi
        if not (math.isfinite(lo) and math.isfinite(hi)):
            if self.nonfinite_batch is None:
                self.nonfinite_batch = piece.batch
            finite = value[np.isfinite(value)]
            if not finite.size:
                return
            lo, hi = float(finite.min()), float(finite.max())
        self.lo, self.hi = min(self.lo, lo), max(self.hi, hi)

    def result(self) -> ObservedRange | None:
        return None if self.lo > self.hi else ObservedRange(self.lo, self.hi, self.nonfinite_batch, self.floating)


@dataclass(eq=False)
class HistogramAccumulator:
    """The canonical grid histogram; none once a NaN or infinity shows (calibration rejects those)."""

    bins: int
    grid: GridHistogram | None = None
    broken: bool = False

    def update(self, piece: Piece) -> None:
        if self.broken or not piece.value.size:
            return
        lo, hi = piece.lohi
        if not (math.isfinite(lo) and math.isfinite(hi)):
            self.broken = True
            return
        if self.grid is None:
            self.grid = GridHistogram(self.bins)
        self.grid.update(piece.value, lo, hi, piece.scratch)

    def result(self) -> HistogramObserver | None:
        return None if self.broken or self.grid is None else self.grid.observer()


@dataclass(eq=False)
class ObserverAccumulator:
    """An observer with ``update(values)`` (ChannelMeans, SampleExtremes...) fed every value as it comes."""

    observer: Any

    def update(self, piece: Piece) -> None:
        self.observer.update(piece.value)

    def result(self) -> Any:
        obs = self.observer
        if isinstance(obs, ChannelMeans) and obs.sums is None or isinstance(obs, SampleExtremes) and not obs.samples:
            return None
        if isinstance(obs, ChannelExtremes) and obs.mins is None:
            return None
        return obs


@dataclass(eq=False)
class SampleExtremesAccumulator(ObserverAccumulator):
    """``SampleExtremes`` fed a one-row piece's min/max, which the range accumulator computes anyway (the
    collector's pieces are one row each: two passes over every activation instead of four)."""

    def update(self, piece: Piece) -> None:
        value = piece.value
        if value.size and (value.ndim == 0 or value.shape[0] == 1):
            lo, hi = piece.lohi
            self.observer.update_extremes(np.array([hi]), np.array([lo]))
        else:
            self.observer.update(value)


@dataclass(eq=False)
class CaptureAccumulator:
    """The values per batch (the pieces of a batch joined along axis 0)."""

    batches: list[np.ndarray] = field(default_factory=list)
    pending: list[np.ndarray] = field(default_factory=list)
    batch: int = -1

    def update(self, piece: Piece) -> None:
        if piece.batch != self.batch:
            self._flush()
            self.batch = piece.batch
        self.pending.append(piece.value)

    def _flush(self) -> None:
        if self.pending:
            self.batches.append(self.pending[0] if len(self.pending) == 1 else np.concatenate(self.pending))
            self.pending = []

    def result(self) -> list[np.ndarray] | None:
        self._flush()
        return self.batches or None


# --- the read ------------------------------------------------------------------------------------------------


class Statistic(Protocol):
    """What the collector needs of a request (``qpasses.data.statistics.TensorStatistic``)."""

    @property
    def tensors(self) -> tuple[str, ...]: ...
    @property
    def batches(self) -> int | None: ...
    @property
    def max_bytes_per_run(self) -> int | None: ...
    @property
    def progress(self) -> bool: ...
    @property
    def whole_batches(self) -> bool: ...
    @property
    def minimum_batches(self) -> bool: ...

    def key(self, tensor: str) -> Hashable: ...

    def accumulator(self) -> Accumulator: ...


class Entry(NamedTuple):
    """A measured statistic; ``covered``: the batches it was measured on (None: all of the data)."""

    value: Any
    covered: int | None


@dataclass(eq=False)
class _Mode:
    """What one tap serves: accumulators by tensor (each with the batches it observes), and the batches it runs on."""

    accumulators: dict[str, list[tuple[Accumulator, int | None]]] = field(default_factory=dict)
    limit: int | None = 0
    cap: int | None = None
    scratch: HistogramScratch = field(default_factory=HistogramScratch)

    def add(self, tensor: str, accumulator: Accumulator, batches: int | None, limit: int | None) -> None:
        self.accumulators.setdefault(tensor, []).append((accumulator, limit))
        self.limit = None if self.limit is None or batches is None else max(self.limit, batches)

    def tighten(self, cap: int | None) -> None:
        """The smallest cap asked for (the values do not depend on it: one row per run either way)."""
        if cap is not None:
            self.cap = cap if self.cap is None else min(self.cap, cap)

    def runs(self, batch: int) -> bool:
        return bool(self.accumulators) and (self.limit is None or batch < self.limit)

    def observe(self, values: Mapping[str, np.ndarray], batch: int) -> None:
        for name, value in values.items():
            piece = Piece(value, batch, self.scratch)
            for accumulator, limit in self.accumulators.get(name, ()):
                if limit is None or batch < limit:
                    accumulator.update(piece)


def collect(
    model: onnx.ModelProto,
    feeds: Iterable[Feed],
    requests: Sequence[Statistic],
    *,
    taps: Mapping[str, Any] | None = None,
    taps_max_bytes_per_run: int | None = None,
    overlap: bool = True,
) -> dict[Hashable, Entry]:
    """Measure ``requests`` on ``model`` over ``feeds`` in one read: an entry per key (request, tensor).

    A tensor that never showed a value (the model cannot expose it, or always empty) gets a None value.
    Minimum-batch requests (channel means) cover every batch their tap runs on. ``taps``: observers fed
    every value of their tensor (``update(values)``), in the capped tap (whole batches when
    ``taps_max_bytes_per_run`` is None).
    """
    capped, whole = _Mode(), _Mode()
    found: dict[Hashable, tuple[Accumulator, _Mode]] = {}
    for request in requests:
        mode = whole if request.whole_batches else capped
        if mode is capped:
            capped.tighten(request.max_bytes_per_run)
        for tensor in request.tensors:
            key = request.key(tensor)
            if key not in found:
                accumulator = request.accumulator()
                found[key] = (accumulator, mode)
                mode.add(tensor, accumulator, request.batches, None if request.minimum_batches else request.batches)
    for tensor, observer in (taps or {}).items():
        mode = whole if taps_max_bytes_per_run is None else capped
        mode.tighten(taps_max_bytes_per_run)
        mode.add(tensor, ObserverAccumulator(observer), None, None)
    modes = [mode for mode in (capped, whole) if mode.accumulators]
    if not modes:
        return {}
    limits = [mode.limit for mode in modes]
    read = None if None in limits else max(x for x in limits if x is not None)
    total = operator.length_hint(feeds) or None
    total = read if total is None else (total if read is None else min(total, read))
    source: Iterator[Feed] = iter(feeds) if read is None else itertools.islice(iter(feeds), read)
    progress = any(r.progress for r in requests)
    bar = tqdm(total=total, unit="batch", desc="calibrating", file=sys.stderr, disable=not progress, leave=False)
    taps_of = [(mode, TensorTap(model, list(mode.accumulators), max_bytes_per_run=mode.cap)) for mode in modes]
    count = 0
    try:
        with bar, ThreadPoolExecutor(max_workers=1, thread_name_prefix="qpasses-statistics") as worker:
            pending: Future[None] | None = None
            while (feed := next(source, None)) is not None:  # no enumerate: it would hold the last feed meanwhile
                for mode, tap in taps_of:
                    if not mode.runs(count):
                        continue
                    pieces = tap.chunks(feed, count) if mode.cap is not None else iter([tap.run(feed, count)])
                    for piece in pieces:
                        if not overlap:
                            mode.observe(piece, count)
                        else:
                            if pending is not None:
                                pending.result()  # at most one piece waits: memory stays flat; errors surface here
                            pending = worker.submit(mode.observe, piece, count)
                        del piece
                del feed  # before the source makes the next one
                count += 1
                bar.update()
            if pending is not None:
                pending.result()
    finally:
        for _, tap in taps_of:
            tap.close()
    if not count:
        raise CalibrationDataError("no calibration data: the data source yielded no batches")
    known = getattr(feeds, "num_batches", None)

    def covered(mode: _Mode) -> int | None:
        if mode.limit is None or count < mode.limit or (isinstance(known, int) and count >= known):
            return None
        return mode.limit

    return {key: Entry(accumulator.result(), covered(mode)) for key, (accumulator, mode) in found.items()}
