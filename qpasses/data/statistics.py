"""Typed statistic requests, and measuring them: from the store, or in one read of the data on demand.

A pass declares what it reads (``Pass.statistics``) with these requests; ``measure(graph, ctx,
requests)`` returns the results, from ``ctx.statistics`` when the pass manager measured them ahead
(on the same ``graph.version``), else by one read now (``qpasses.data.collector``) stored there for
the next reader. Every request names tensors and how much of the data it covers:

- ``batches``: the first N batches of ``batch_size`` (None: all); for a ``minimum_batches`` kind
  (channel means) it is a minimum: a read that covers more batches for another request measures the
  mean over all of them (a mean only improves with data: what calibrate used to leave for bias correction);
- ``max_bytes_per_run``: the byte cap of one onnxruntime run (one row per run; the values do not
  depend on its size); None: one run per batch, whose values may differ in the last bit.

Results per tensor (absent when the tensor never showed a value): ``RangeRequest`` ->
``ObservedRange``; ``HistogramRequest`` -> ``HistogramObserver`` (the canonical grid of
``calibrate``); ``ChannelMeanRequest`` -> ``ChannelMeans``; ``ChannelRangeRequest`` -> ``ChannelExtremes``;
``SampleExtremesRequest`` -> ``SampleExtremes``; ``ChannelPowerRequest`` -> ``ChannelMeans`` of the squares;
``CaptureRequest`` -> the values per batch (always whole
batches: a captured tensor keeps the model's layout). Captured values are big: their reader ``take``s them
out of the store.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, TypeVar

import numpy as np
import onnx

from graph_ir import Graph
from qpasses.core.context import PassContext
from qpasses.core.errors import CalibrationDataError
from qpasses.core.statistics import StatisticRequest
from qpasses.data.collector import (
    Accumulator,
    CaptureAccumulator,
    Entry,
    HistogramAccumulator,
    ObservedRange,
    ObserverAccumulator,
    RangeAccumulator,
    SampleExtremesAccumulator,
    collect,
)
from qpasses.data.feeds import context_feeds
from qpasses.data.sources import DEFAULT_BATCH_SIZE
from qpasses.data.tensor_tap import DEFAULT_MAX_BYTES_PER_RUN, Feed
from qpasses.quant.range_statistics import (
    DEFAULT_BINS,
    ChannelExtremes,
    ChannelMeans,
    HistogramObserver,
    MinMaxObserver,
    SampleExtremes,
)

R = TypeVar("R")

__all__ = [
    "CaptureRequest",
    "ChannelMeanRequest",
    "ChannelPowerRequest",
    "ChannelRangeRequest",
    "HistogramRequest",
    "Measured",
    "ObservedRange",
    "RangeRequest",
    "SampleExtremesRequest",
    "TensorStatistic",
    "capture",
    "measure",
    "minmax_observer",
    "reject_nonfinite",
]


@dataclass(frozen=True)
class TensorStatistic(StatisticRequest, Generic[R]):
    """A statistic of ``tensors`` over the calibration data (see the module docstring for the fields)."""

    tensors: tuple[str, ...]
    batches: int | None = None
    batch_size: int = DEFAULT_BATCH_SIZE
    max_bytes_per_run: int | None = field(default=DEFAULT_MAX_BYTES_PER_RUN, compare=False)
    progress: bool = field(default=False, compare=False)

    minimum_batches: ClassVar[bool] = False
    whole_only: ClassVar[bool] = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "tensors", tuple(dict.fromkeys(self.tensors)))

    @property
    def whole_batches(self) -> bool:
        return self.whole_only or self.max_bytes_per_run is None

    def params(self) -> tuple[Hashable, ...]:
        return ()

    def key(self, tensor: str) -> Hashable:
        kind = f"{type(self).__module__}.{type(self).__qualname__}"
        if self.minimum_batches:  # measured over at least ``batches``: the entry says how many
            return (kind, tensor, self.batch_size, *self.params())
        return (kind, tensor, self.batches, self.batch_size, self.whole_batches, *self.params())

    def accumulator(self) -> Accumulator:  # pragma: no cover - interface
        raise NotImplementedError

    def covers(self, entry: Entry) -> bool:
        if not self.minimum_batches or entry.covered is None:
            return True
        return self.batches is not None and entry.covered >= self.batches

    def missing_tensors(self, results: Mapping[Hashable, Any]) -> list[str]:
        return [t for t in self.tensors if (e := results.get(self.key(t))) is None or not self.covers(e)]

    def missing(self, graph: Graph, ctx: PassContext) -> bool:
        return bool(self.missing_tensors(ctx.statistics.results(graph)))

    @classmethod
    def collect(cls, graph: Graph, ctx: PassContext, requests: Sequence[StatisticRequest]) -> None:
        _fill(graph, ctx, [r for r in requests if isinstance(r, TensorStatistic)])


@dataclass(frozen=True)
class RangeRequest(TensorStatistic[ObservedRange]):
    """min/max of each tensor (over its finite values; the result says where a NaN/inf showed)."""

    def accumulator(self) -> Accumulator:
        return RangeAccumulator()


@dataclass(frozen=True)
class HistogramRequest(TensorStatistic[HistogramObserver]):
    """The canonical histogram of each tensor: more than ``bins / 2`` and at most ``bins`` bins span its range."""

    bins: int = DEFAULT_BINS

    def params(self) -> tuple[Hashable, ...]:
        return (self.bins,)

    def accumulator(self) -> Accumulator:
        return HistogramAccumulator(self.bins)


@dataclass(frozen=True)
class ChannelMeanRequest(TensorStatistic[ChannelMeans]):
    """Per-channel means (axis 1) of each tensor, e.g. weighted layers' inputs for bias correction."""

    minimum_batches: ClassVar[bool] = True

    def accumulator(self) -> Accumulator:
        return ObserverAccumulator(ChannelMeans())


@dataclass(frozen=True)
class ChannelPowerRequest(TensorStatistic[ChannelMeans]):
    """Per-channel mean power (mean of the squares, axis 1) of each tensor: a layer output's signal
    per channel, against which a predicted quantization noise is weighed."""

    def accumulator(self) -> Accumulator:
        return ObserverAccumulator(ChannelMeans(power=True))


@dataclass(frozen=True)
class ChannelRangeRequest(TensorStatistic[ChannelExtremes]):
    """Per-channel min and max (axis 1) of each tensor, e.g. where high-bias absorption may shift a Relu's input."""

    def accumulator(self) -> Accumulator:
        return ObserverAccumulator(ChannelExtremes())


@dataclass(frozen=True)
class SampleExtremesRequest(TensorStatistic[SampleExtremes]):
    """Each tensor's per-sample extremes (outlier samples, ``SampleExtremes.outliers``)."""

    def accumulator(self) -> Accumulator:
        return SampleExtremesAccumulator(SampleExtremes())


@dataclass(frozen=True)
class CaptureRequest(TensorStatistic[list[np.ndarray]]):
    """Each tensor's values, one array per batch, from whole-batch runs (graph inputs: the feeds themselves)."""

    whole_only: ClassVar[bool] = True

    def accumulator(self) -> Accumulator:
        return CaptureAccumulator()


class Measured:
    """Results of requests on one state of the graph: ``measured[request]`` -> {tensor: result}."""

    def __init__(self, results: dict[Hashable, Any]) -> None:
        self._results = results

    def __getitem__(self, request: TensorStatistic[R]) -> dict[str, R]:
        out: dict[str, R] = {}
        for tensor in request.tensors:
            entry = self._results.get(request.key(tensor))
            if entry is not None and entry.value is not None:
                out[tensor] = entry.value
        return out

    def covered(self, request: TensorStatistic[Any]) -> int | None:
        """The fewest batches any of the request's results was measured on (None: all of the data)."""
        counts = [e.covered for t in request.tensors if (e := self._results.get(request.key(t))) is not None]
        known = [c for c in counts if c is not None]
        return min(known) if known else None

    def take(self, request: TensorStatistic[R]) -> dict[str, R]:
        """``self[request]``, removed from the store (captured values: the reader frees them as it goes)."""
        out = self[request]
        for tensor in request.tensors:
            self._results.pop(request.key(tensor), None)
        return out

    def replace(self, request: TensorStatistic[R], values: Mapping[str, R], covered: int | None = None) -> None:
        """Store other results for ``request``'s tensors on this state (a refinement, e.g. outlier samples left out)."""
        for tensor, value in values.items():
            self._results[request.key(tensor)] = Entry(value, covered)


def reject_nonfinite(ranges: dict[str, ObservedRange]) -> dict[str, ObservedRange]:
    """``ranges``, or the CalibrationDataError naming the first tensor (by batch) with a NaN or infinity."""
    broken = [(r.nonfinite_batch, i, n) for i, (n, r) in enumerate(ranges.items()) if r.nonfinite_batch is not None]
    if broken:
        batch, _, name = min(broken)
        raise CalibrationDataError(f"tensor '{name}' has NaN or infinite values in batch {batch}")
    return ranges


def minmax_observer(observed: ObservedRange) -> MinMaxObserver:
    """A per-tensor MinMaxObserver of a range: it keeps only min and max, so one update with them is exact
    (per batch it would cost a float64 copy of every activation)."""
    obs = MinMaxObserver()
    obs.update(np.array([observed.min, observed.max]))
    return obs


def measure(graph: Graph, ctx: PassContext, requests: Sequence[TensorStatistic[Any]]) -> Measured:
    """Results of ``requests`` on the graph's current values: stored ones, the missing measured now in one read."""
    _fill(graph, ctx, requests)
    return Measured(ctx.statistics.results(graph))


def _fill(graph: Graph, ctx: PassContext, requests: Sequence[TensorStatistic[Any]]) -> None:
    """Measure what the store lacks of ``requests``: one read of the data per batch size."""
    results = ctx.statistics.results(graph)
    todo: dict[int, list[TensorStatistic[Any]]] = {}
    for request in requests:
        tensors = request.missing_tensors(results)
        if tensors:
            todo.setdefault(request.batch_size, []).append(dataclasses.replace(request, tensors=tuple(tensors)))
    if not todo:
        return
    model = graph.to_onnx()
    for batch_size, group in todo.items():
        data = context_feeds(ctx, graph, batch_size)
        results.update(collect(model, data, group))
        ctx.statistics.collections += 1


def capture(model: onnx.ModelProto, feeds: Iterable[Feed], names: Sequence[str]) -> dict[str, list[np.ndarray]]:
    """Per-batch values of ``names`` (duplicates allowed) on ``model`` (not the graph's state: e.g. the model
    quantized so far) in one read of ``feeds``, the collector's whole-batch runs; what is unavailable is absent."""
    request = CaptureRequest(tuple(names))
    entries = collect(model, feeds, [request])
    return {n: entries[request.key(n)].value for n in names if entries[request.key(n)].value is not None}
