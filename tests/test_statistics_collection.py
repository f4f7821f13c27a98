"""Statistics are declared by the passes and measured in one read of the calibration data.

Regression: keep-mixed-ranges-float, calibrate, bias-correction, seq-mse, AdaRound/AdaScale and AMP each ran
their own onnxruntime pass over the data (the default flow read it three times: two batches for the mixed
ranges, all for calibrate, calibrate's channel means riding along for bias correction through an ad hoc
artifact). Now each pass declares typed requests (``Pass.statistics``), the pass manager measures those of
the passes that see the same values in one collection, and results are keyed on ``graph.version``.

Truth: a counting re-iterable source (how many times it is iterated), the collector's taps (how many
onnxruntime tap sets are built), and the statistics computed the old way (per pass) on the same model.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import graph_ir
import qpasses.data.collector as collector
from graph_ir import Graph
from qpasses.api import CaptureRequest, ChannelMeanRequest, RangeRequest, measure
from qpasses.core.context import PassContext
from qpasses.core.pass_base import Pass, PassResult
from qpasses.core.pass_manager import PassManager
from qpasses.core.statistics import StatisticsStore
from qpasses.data.calibration import collect_statistics
from qpasses.data.tensor_tap import iterate_tensors
from qpasses.passes import default_registry
from qpasses.quant.plan import QuantPlan, weighted_layer_inputs
from qpasses.quant.range_search import compute
from qpasses.quant.range_statistics import ChannelMeans
from qpasses.quantize import quantize_model

REGISTRY = default_registry()
BATCHES, ROWS = 6, 8


def _model() -> onnx.ModelProto:
    """Conv -> Relu, then a Concat of a 1x1 Conv's output (range ~1) with the Relu output x 300: mixed ranges."""
    rng = np.random.default_rng(0)

    def init(name: str, *shape: int, scale: float = 0.3) -> onnx.TensorProto:
        return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)

    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("Conv", ["r", "w2", "b2"], ["a"], name="conv2"),
        helper.make_node("Mul", ["r", "k"], ["big"], name="scale"),
        helper.make_node("Concat", ["a", "big"], ["joined"], name="join", axis=1),
        helper.make_node("GlobalAveragePool", ["joined"], ["p"], name="pool"),
        helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "w3", "b3"], ["y"], name="fc"),
    ]
    inits = [
        init("w1", 6, 3, 3, 3),
        init("b1", 6, scale=0.1),
        init("w2", 2, 6, 1, 1, scale=0.05),
        init("b2", 2, scale=0.01),
        numpy_helper.from_array(np.array(300.0, np.float32), "k"),
        init("w3", 8, 4),
        init("b3", 4, scale=0.1),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)


def _feeds() -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(1)
    return [{"x": (rng.standard_normal((ROWS, 3, 8, 8)) * (1 + i / 4)).astype(np.float32)} for i in range(BATCHES)]


class CountingFeeds:
    """A re-iterable source that counts how many times it is read."""

    def __init__(self) -> None:
        self.feeds = _feeds()
        self.reads = 0

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        self.reads += 1
        return iter(self.feeds)


@pytest.fixture
def taps(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, ...]]:
    """The tensors of every tap (set of onnxruntime sessions) the collector builds."""
    built: list[tuple[str, ...]] = []

    class Counting(collector.TensorTap):
        def __post_init__(self) -> None:
            super().__post_init__()
            built.append(self.tensors)

    monkeypatch.setattr(collector, "TensorTap", Counting)
    return built


def _applied(report: Any, pass_name: str) -> list[str]:
    return [r.message for r in report.remarks if r.pass_name == pass_name and r.kind == "applied"]


def test_default_quantize_reads_the_source_once_in_one_collection(taps: list[tuple[str, ...]]) -> None:
    source = CountingFeeds()
    result = quantize_model(_model(), source, progress=False, runtime_check=False, auto_fallback=False)
    assert _applied(result.report, "keep-mixed-ranges-float"), "the mixed ranges were measured"
    assert _applied(result.report, "calibrate") and _applied(result.report, "bias-correction")
    assert source.reads == 1
    assert len(taps) == 1  # one capped tap: mixed ranges, calibrate's ranges and extremes, bias-correction's means
    assert {"a", "big", "joined", "r"} <= set(taps[0]) and "x" in taps[0]


def test_runtime_parity_reads_the_record_not_the_statistics(taps: list[tuple[str, ...]]) -> None:
    """With the parity check on, the statistics still take one collection; the check reads its own 4 batches."""
    source = CountingFeeds()
    quantize_model(_model(), source, progress=False, auto_fallback=False)
    assert len(taps) == 1 and source.reads == 2


def test_generator_source_is_read_once_by_the_whole_flow() -> None:
    pulled: list[int] = []

    def generator() -> Iterator[dict[str, np.ndarray]]:
        for i, feed in enumerate(_feeds()):
            pulled.append(i)
            yield feed

    result = quantize_model(_model(), generator(), progress=False)
    expected = quantize_model(_model(), _feeds(), progress=False)
    assert pulled == list(range(BATCHES))
    assert result.encodings == expected.encodings


class _Scale(Pass):
    """Scales a weight in place (``Tensor.set_data``) and says nothing about it (no ``modifies_values``)."""

    name = "scale-weight"

    def __init__(self, tensor: str = "w1", factor: float = 2.0) -> None:
        super().__init__()
        self.tensor, self.factor = tensor, factor

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        t = graph.tensors[self.tensor]
        t.set_data(t.constant_data() * np.float32(self.factor))
        return self.result(True)


class _Declares(Pass):
    """Declares requests and reads nothing (a pass of someone else's, on the same values)."""

    name = "declares"

    def __init__(self, *requests: Any) -> None:
        super().__init__()
        self.requests = requests

    def statistics(self, graph: Graph, ctx: PassContext) -> tuple[Any, ...]:
        return self.requests

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        return self.result(False)


def _calibrate_passes() -> list[Pass]:
    return [
        REGISTRY.create_pass("annotate-precision", calibrated=True),
        REGISTRY.create_pass("encode-weights"),
        REGISTRY.create_pass("calibrate", progress=False),
    ]


def _activation_encodings(graph: Graph) -> dict[str, Any]:
    plan = PassContext().get(QuantPlan, graph).plan
    return {n: graph.tensors[n].encoding for n in plan.activations}


def test_a_weight_change_between_declaring_passes_forces_a_recollection(taps: list[tuple[str, ...]]) -> None:
    graph = graph_ir.load(_model())
    ctx = PassContext(calibration_data=_feeds())
    mixed = REGISTRY.create_pass("keep-mixed-ranges-float")
    PassManager([mixed, _Scale(), *_calibrate_passes()], verify="checker").run(graph, ctx)
    # The mixed-ranges read also measured calibrate's statistics (the scaling pass did not say it changes
    # values); set_data bumped graph.version, so calibrate measured again on the scaled weights.
    assert ctx.statistics.collections == 2 and len(taps) == 2
    truth, unscaled = graph_ir.load(_model()), graph_ir.load(_model())
    for g in (truth, unscaled):  # the same steps, each with its own fresh context: nothing carried over
        PassManager([REGISTRY.create_pass("keep-mixed-ranges-float")]).run(g, PassContext(calibration_data=_feeds()))
    _Scale()(truth)
    for g in (truth, unscaled):
        PassManager(_calibrate_passes(), verify="checker").run(g, PassContext(calibration_data=_feeds()))
    assert _activation_encodings(graph) == _activation_encodings(truth)
    assert _activation_encodings(graph)["r"] != _activation_encodings(unscaled)["r"]


def test_modifies_values_stops_the_look_ahead(taps: list[tuple[str, ...]]) -> None:
    class DeclaredScale(_Scale):
        modifies_values = True

    graph = graph_ir.load(_model())
    PassManager(
        [REGISTRY.create_pass("keep-mixed-ranges-float"), DeclaredScale(), *_calibrate_passes()], verify="checker"
    ).run(graph, PassContext(calibration_data=_feeds()))
    assert len(taps) == 2
    assert set(taps[0]) == {"a", "big", "joined"}  # the mixed ranges alone: calibrate's come after the scaling


def test_annotations_keep_the_statistics() -> None:
    graph = graph_ir.load(_model())
    store = StatisticsStore()
    store.results(graph)["k"] = 1
    graph.tensors["r"].precision = "float"  # an annotation: graph.version stays
    assert store.results(graph) == {"k": 1}
    other = graph_ir.load(_model())
    other.version = graph.version
    assert store.results(other) == {}  # another graph at the same version number: not its statistics
    store.results(graph)["k"] = 1
    graph.tensors["w1"].set_data(graph.tensors["w1"].constant_data() + 1)  # a value: a new state
    assert store.results(graph) == {}


def test_standalone_calibrate_measures_on_demand(taps: list[tuple[str, ...]]) -> None:
    graph = graph_ir.load(_model())
    ctx = PassContext(calibration_data=_feeds())
    for p in _calibrate_passes()[:2]:
        p(graph, ctx)
    assert len(ctx.statistics) == 0
    result = REGISTRY.create_pass("calibrate", progress=False)(graph, ctx)  # no pass manager: nothing measured ahead
    assert result.modified and ctx.statistics.collections == 1 and len(taps) == 1
    truth = graph_ir.load(_model())
    PassManager(_calibrate_passes(), verify="checker").run(truth, PassContext(calibration_data=_feeds()))
    assert _activation_encodings(graph) == _activation_encodings(truth)


@pytest.mark.parametrize("mode", ["tf", "enhanced"])
def test_results_equal_the_per_pass_statistics(mode: str) -> None:
    """Each statistic of the one collection equals what the pass measured on its own before."""
    graph = graph_ir.load(_model())
    ctx = PassContext(calibration_data=_feeds())
    inputs = tuple(weighted_layer_inputs(graph))
    passes = [
        REGISTRY.create_pass("keep-mixed-ranges-float"),
        REGISTRY.create_pass("annotate-precision", calibrated=True),
        REGISTRY.create_pass("encode-weights"),
        REGISTRY.create_pass("seq-mse", progress=False, num_batches=3),
        REGISTRY.create_pass("calibrate", mode=mode, progress=False),
        _Declares(ChannelMeanRequest(inputs, batches=2)),  # bias correction's, without changing the biases
    ]
    PassManager(passes, verify="checker").run(graph, ctx)
    assert ctx.statistics.collections == 1
    model = graph.to_onnx()
    plan = ctx.get(QuantPlan, graph).plan

    # calibrate: its own collect_statistics over the activations, all batches
    observers = collect_statistics(model, plan.activations, _feeds(), histogram=mode == "enhanced", progress=False)
    for name in plan.activations:
        assert graph.tensors[name].encoding == compute(observers[name], 8, mode), name

    # keep-mixed-ranges-float: min/max with 0 of the first 2 batches, one run per batch (iterate_tensors)
    parts = ("a", "big", "joined")
    measured = measure(graph, ctx, [request := RangeRequest(parts, batches=2)])
    for name in parts:
        values = np.concatenate([v[name].ravel() for v in iterate_tensors(model, [name], _feeds()[:2])])
        r = measured[request][name]
        assert (min(r.min, 0.0), max(r.max, 0.0)) == (min(values.min(), 0.0), max(values.max(), 0.0))
    assert ctx.statistics.collections == 1

    # bias-correction: the channel means calibrate used to leave (its collect_statistics hook, all batches)
    old = {name: ChannelMeans() for name in inputs}
    collect_statistics(model, [], _feeds(), progress=False, channel_means=old)
    new = measure(graph, ctx, [means := ChannelMeanRequest(inputs)])[means]
    assert ctx.statistics.collections == 1  # at least 2 batches: measured with calibrate's, over all of them
    for name in inputs:
        np.testing.assert_array_equal(new[name].mean, old[name].mean)

    # seq-mse: its FP32 layer inputs were captured in the same read; capturing them again equals the old capture
    layer_inputs = ("x", "r", "f")
    again = measure(graph, ctx, [captured := CaptureRequest(layer_inputs, batches=3)])[captured]
    for name in layer_inputs:
        expected = [v[name] for v in itertools.islice(iterate_tensors(model, [name], _feeds()), 3)]
        assert len(again[name]) == 3
        for got, want in zip(again[name], expected, strict=True):
            np.testing.assert_array_equal(got, want)


def test_declared_calibration_superset_covers_the_plan() -> None:
    """Declared ahead of annotate-precision, calibrate asks for every float activation the plan could quantize."""
    graph = graph_ir.load(_model())
    ctx = PassContext(calibration_data=_feeds())
    graph.tensors["r"].precision = "float"  # kept float by some pass before (the plan leaves it out for now)
    calibrate = REGISTRY.create_pass("calibrate")
    (ranged, *_) = calibrate.statistics_ahead(graph, ctx)
    graph.tensors["r"].precision = None  # ... and given back by a later one
    REGISTRY.create_pass("annotate-precision", calibrated=True)(graph, ctx)
    plan = ctx.get(QuantPlan, graph).plan
    assert "r" in plan.activations and set(plan.activations) <= set(ranged.tensors)
    assert not any(graph.tensors[n].is_constant for n in ranged.tensors)
    (exact, *_) = calibrate.statistics(graph, ctx)  # at its own turn: what the plan quantizes
    assert set(exact.tensors) == set(plan.activations)


def test_sample_extremes_from_one_row_pieces_equal_the_rows_own() -> None:
    """The collector feeds ``SampleExtremes`` a one-row piece's min/max (computed once for the range too):
    the same top/bottom samples as reducing every row itself, NaN rows and multi-row pieces included."""
    from qpasses.data.collector import HistogramScratch, Piece, SampleExtremesAccumulator
    from qpasses.quant.range_statistics import SampleExtremes

    rng = np.random.default_rng(0)
    rows = [rng.standard_normal((1, 3, 5)).astype(np.float32) * s for s in (1.0, 40.0, 2.0, 0.5, 3.0)]
    rows[2][0, 1, 1] = np.nan
    pieces = [*rows, np.concatenate([rows[0], rows[3]])]  # a multi-row piece (a feed that cannot be cut)
    direct, fed = SampleExtremes(), SampleExtremesAccumulator(SampleExtremes())
    scratch = HistogramScratch()
    for batch, value in enumerate(pieces):
        direct.update(value)
        fed.update(Piece(value, batch, scratch))
    got = fed.observer
    assert got.samples == direct.samples == 7
    for mine, theirs in ((got.top, direct.top), (got.bottom, direct.bottom)):
        assert [s for _, s in mine] == [s for _, s in theirs]
        np.testing.assert_array_equal([v for v, _ in mine], [v for v, _ in theirs])
    assert got.outliers() == direct.outliers()
