"""Calibration: streaming statistics from onnxruntime sessions, the per-run cap, and the ``calibrate`` pass.

References are computed independently: a model exposing the tensors built with onnx.helper, run
by onnxruntime on all samples in one batch, and encodings computed from the raw values (histograms:
the one-shot histogram of all values on the canonical grid, computed here with numpy).
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import graph_ir
from qpasses.core.context import PassContext
from qpasses.core.errors import CalibrationDataError, PassError
from qpasses.data.calibration import collect_statistics
from qpasses.data.sessions import calibration_session, unavailable_tensors
from qpasses.data.tensor_tap import DEFAULT_MAX_BYTES_PER_RUN, TensorTap, iterate_chunks, iterate_tensors
from qpasses.passes import default_registry
from qpasses.passes.quantize.calibrate import Calibrate
from qpasses.quant.encodings import Encoding
from qpasses.quant.encodings_file import PrecisionOverride
from qpasses.quant.plan import QuantPlan
from qpasses.quant.range_search import compute
from qpasses.quant.range_statistics import DEFAULT_BINS, Histogram, HistogramObserver, MinMaxObserver

MODELS = Path(__file__).resolve().parent.parent / "models"
DIGITS = MODELS / "digits_cnn.onnx"
CALIB = MODELS / "digits_calib.npz"


@functools.cache
def calib_x() -> np.ndarray:
    with np.load(CALIB) as data:
        return data["input"]


def feeds(batch: int, x: np.ndarray | None = None) -> list[dict[str, np.ndarray]]:
    x = calib_x() if x is None else x
    return [{"input": x[i : i + batch]} for i in range(0, len(x), batch)]


@functools.cache
def reference(names: tuple[str, ...]) -> dict[str, np.ndarray]:
    """The digits model's ``names`` on all calibration samples, from a hand-built session.

    It exposes exactly ``names``, like calibration does: onnxruntime fuses differently (and rounds
    differently in the last bit) depending on which tensors must stay visible. The session is
    configured as calibration's (``calibration_session``: graph optimizations on but the NCHWc
    layout): the model is FP32 (no integer kernels) and the statistics must match bit for bit.
    """
    model = onnx.load(DIGITS)
    outputs = {o.name for o in model.graph.output}
    fetch = [n for n in names if n != "input"]
    model.graph.output.extend(helper.make_empty_tensor_value_info(n) for n in fetch if n not in outputs)
    session = calibration_session(model)
    values = dict(zip(fetch, session.run(fetch, {"input": calib_x()}), strict=True))
    values["input"] = calib_x()
    return values


def calibrated(mode: str, data: object = None, batch_size: int = 16, **options: object) -> tuple[graph_ir.Graph, list]:
    graph = graph_ir.load(DIGITS)
    ctx = PassContext(calibration_data=str(CALIB) if data is None else data)
    result = Calibrate(mode=mode, batch_size=batch_size, progress=False, **options)(graph, ctx)
    return graph, result.remarks


def activations(graph: graph_ir.Graph) -> list[str]:
    return QuantPlan(graph, PassContext()).plan.activations


def plan_values() -> dict[str, np.ndarray]:
    """Reference values of what the calibrate pass observes on the digits model."""
    return reference(tuple(activations(graph_ir.load(DIGITS))))


# --- encodings equal those from the raw activations ---------------------------------------------------


@pytest.mark.parametrize("mode", ["tf", "symmetric"])
def test_min_max_encodings_equal_direct_computation(mode: str) -> None:
    graph, remarks = calibrated(mode)
    names = activations(graph)
    assert len(names) >= 5
    for name in names:
        t = graph.tensors[name]
        assert t.encoding == compute(plan_values()[name], 8, mode), name
        assert t.meta["encoding_source"] == "calibration"
    applied = [r.message for r in remarks if r.kind == "applied"]
    assert applied == [f"calibrated {len(names)} activations ({mode}, 8-bit) on 256 samples in 16 batches"]


def canonical_histogram(values: np.ndarray, bins: int = DEFAULT_BINS) -> Histogram:
    """The documented grid, computed by brute force: the smallest power-of-two width ``2^e`` (edges at
    multiples of it, and at least 2^-60 of the largest magnitude) whose bins cover [min, max] in
    ``bins`` bins; exact counts of floor(x / 2^e)."""
    x = np.asarray(values, np.float64).ravel()
    lo, hi = float(x.min()), float(x.max())
    e = max(np.frexp(max(abs(lo), abs(hi)))[1] - 60, -1000) if max(abs(lo), abs(hi)) else -1000
    while np.floor(np.ldexp(hi, -e)) - np.floor(np.ldexp(lo, -e)) >= bins:
        e += 1
    index = np.floor(np.ldexp(x, -e)).astype(np.int64)
    base = int(index.min())
    counts = np.bincount(index - base, minlength=2)
    return Histogram(float(np.ldexp(float(base), e)), float(np.ldexp(1.0, e)), counts, lo, hi)


def assert_same_histogram(obs: object, expected: Histogram, name: str = "") -> None:
    assert isinstance(obs, HistogramObserver), name
    h = obs.histogram
    assert (h.lo, h.width, h.min, h.max) == (expected.lo, expected.width, expected.min, expected.max), name
    np.testing.assert_array_equal(h.counts, expected.counts, err_msg=name)


@pytest.mark.parametrize("batch", [256, 16])
def test_streaming_histograms_are_the_one_shot_histogram_on_the_canonical_grid(batch: int) -> None:
    model = onnx.load(DIGITS)
    names = activations(graph_ir.load(DIGITS))
    stats = collect_statistics(model, names, feeds(batch), histogram=True, progress=False)
    for name in names:
        values = plan_values()[name]
        assert_same_histogram(stats[name], canonical_histogram(values), name)
        # More than bins / 2 and at most bins bins cover [min, max].
        assert DEFAULT_BINS // 2 < len(stats[name].histogram.counts) <= DEFAULT_BINS, name


@pytest.mark.parametrize("mode", ["enhanced", "percentile"])
def test_histogram_encodings_equal_direct_computation(mode: str) -> None:
    graph, _ = calibrated(mode, batch_size=16)
    for name in activations(graph):
        values = plan_values()[name]
        enc = graph.tensors[name].encoding
        assert enc == compute(canonical_histogram(values), 8, mode), name
        # Against the one-shot 2048-bin histogram spanning exactly [min, max] (another grid): close.
        # tf_enhanced searches discrete steps, so a slightly different histogram may pick a neighbour.
        one_shot, tf = compute(Histogram.from_values(values), 8, mode), compute(values, 8, "tf")
        span = tf.max[0] - tf.min[0]
        tolerance = 0.02 if mode == "enhanced" else 0.001
        assert abs(enc.min[0] - one_shot.min[0]) <= tolerance * span, name
        assert abs(enc.max[0] - one_shot.max[0]) <= tolerance * span, name


def test_many_small_batches_equal_one_big_batch() -> None:
    model = onnx.load(DIGITS)
    names = activations(graph_ir.load(DIGITS))
    one = collect_statistics(model, names, feeds(256), progress=False)
    many = collect_statistics(model, names, feeds(3), progress=False)
    serial = collect_statistics(model, names, feeds(3), progress=False, overlap=False)
    for name in names:
        for stats in (many, serial):
            obs = stats[name]
            assert isinstance(obs, MinMaxObserver)
            assert (obs.min, obs.max) == (one[name].min, one[name].max), name
            assert compute(obs, 8, "tf") == compute(one[name], 8, "tf")
        assert one[name].min[0] == plan_values()[name].min() and one[name].max[0] == plan_values()[name].max()
    # Histograms too: the same rows as one batch, as many small ones, in another order.
    x = calib_x()
    order = np.random.default_rng(0).permutation(len(x))
    one_h = collect_statistics(model, names, feeds(256), histogram=True, progress=False)
    for data in (feeds(3), feeds(5, x[order])):
        many_h = collect_statistics(model, names, data, histogram=True, progress=False)
        for name in names:
            assert_same_histogram(many_h[name], one_h[name].histogram, name)


def test_grid_histogram_counts_exactly_through_range_growth() -> None:
    """Growth on both sides, a value on the top edge, negative and tiny ranges: any batching, any order."""
    rng = np.random.default_rng(0)
    model = helper.make_model(
        helper.make_graph(
            [helper.make_node("Identity", ["x"], ["y"])],
            "g",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N"])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N"])],
        ),
        opset_imports=[helper.make_opsetid("", 17)],
        ir_version=8,
    )
    batches = [
        rng.standard_normal(200_000).astype(np.float32) * s + c
        for s, c in [(1, 0), (0.1, 0), (5, 3), (1, -20), (30, 0), (0.5, 0.25)]
    ]
    batches.append(np.full(10, batches[4].max(), np.float32))  # exactly the overall max
    everything = np.concatenate(batches)
    for order in (range(len(batches)), reversed(range(len(batches)))):
        data = [{"x": batches[i]} for i in order]
        for cap in (None, 100_000):  # 100 kB: split into rows of the 1-D input
            stats = collect_statistics(model, ["y"], data, histogram=True, progress=False, max_bytes_per_run=cap)
            assert_same_histogram(stats["y"], canonical_histogram(everything))
    for values in (
        np.zeros(7, np.float32),
        np.full(5, -3.5, np.float32),
        np.float32([1e-30, 3e-30, -2e-30]),
        np.float32([100.0, 100.00001, 99.99999]),
    ):
        stats = collect_statistics(model, ["y"], [{"x": values[:2]}, {"x": values[2:]}], histogram=True, progress=False)
        assert_same_histogram(stats["y"], canonical_histogram(values))
        assert compute(stats["y"], 8, "enhanced") == compute(canonical_histogram(values), 8, "enhanced")


def test_iterate_tensors_streams_requested_tensors() -> None:
    model = onnx.load(DIGITS)
    names = ("input", "features.1.act_out", "logits")
    seen = list(iterate_tensors(model, names, feeds(100)))
    assert [len(v["logits"]) for v in seen] == [100, 100, 56]
    np.testing.assert_array_equal(
        np.concatenate([v["features.1.act_out"] for v in seen]), reference(names)["features.1.act_out"]
    )
    assert seen[0]["input"] is not None and seen[0]["input"].shape == (100, 1, 16, 16)


# --- overrides, precision, remarks ----------------------------------------------------------------------


def test_overridden_encodings_are_kept() -> None:
    graph = graph_ir.load(DIGITS)
    names = activations(graph)
    pinned = Encoding(8, (0.05,), (-10,))
    graph.tensors[names[1]].encoding = pinned
    graph.tensors[names[1]].meta["encoding_source"] = "override"
    graph.tensors[names[2]].precision = PrecisionOverride(16, "int")
    graph.tensors[names[3]].precision = PrecisionOverride(16, "float")
    result = Calibrate(progress=False)(graph, PassContext(calibration_data=str(CALIB)))
    assert result.modified
    assert graph.tensors[names[1]].encoding is pinned
    assert graph.tensors[names[1]].meta["encoding_source"] == "override"
    assert graph.tensors[names[2]].encoding == compute(plan_values()[names[2]], 16, "tf")
    assert graph.tensors[names[3]].encoding is None
    assert graph.tensors[names[0]].encoding == compute(plan_values()[names[0]], 8, "tf")
    assert any("kept 1 overridden" in r.message for r in result.remarks)


def test_tensors_that_cannot_be_observed_are_reported() -> None:
    model = onnx.load(DIGITS)
    weight = model.graph.initializer[0].name
    assert unavailable_tensors(model, ["logits", "nope", weight]) == {
        "nope": "not produced by any node of the main graph",
        weight: "a constant, not an activation",
    }
    stats = collect_statistics(model, ["logits", "nope", weight], feeds(64), progress=False)
    assert list(stats) == ["logits"]


def test_registered_and_leaves_the_graph_alone() -> None:
    p = default_registry().create_pass("calibrate", mode="enhanced", batch_size=64, progress=False)
    graph = graph_ir.load(DIGITS)
    before, version = graph.to_onnx().SerializeToString(), graph.version
    assert p(graph, PassContext(calibration_data=lambda: feeds(64))).modified
    assert graph.version == version and graph.to_onnx().SerializeToString() == before
    assert QuantPlan in Calibrate.preserves


# --- bad data ----------------------------------------------------------------------------------------------


def test_missing_calibration_data_is_a_clear_error() -> None:
    with pytest.raises(CalibrationDataError, match="no calibration data"):
        Calibrate(progress=False)(graph_ir.load(DIGITS), PassContext())


def test_empty_calibration_data() -> None:
    with pytest.raises(CalibrationDataError, match="no calibration"):
        collect_statistics(onnx.load(DIGITS), ["logits"], [], progress=False)
    with pytest.raises(CalibrationDataError):
        calibrated("tf", data=[])


@pytest.mark.parametrize("overlap", [True, False])
def test_wrong_input_name_names_the_input_and_batch(overlap: bool) -> None:
    bad = feeds(64)
    bad[2] = {"image": bad[2]["input"]}
    with pytest.raises(CalibrationDataError, match=r"batch 2.*'image'"):
        collect_statistics(onnx.load(DIGITS), ["logits"], bad, progress=False, overlap=overlap)
    with pytest.raises(CalibrationDataError, match="image"):
        calibrated("tf", data=bad)


def test_wrong_shape_names_the_input_and_batch() -> None:
    bad = feeds(64)
    bad[1] = {"input": np.zeros((64, 1, 8, 8), np.float32)}
    with pytest.raises(CalibrationDataError, match=r"batch 1.*'input'.*\(64, 1, 8, 8\)"):
        collect_statistics(onnx.load(DIGITS), ["logits"], bad, progress=False)
    with pytest.raises(CalibrationDataError, match="'input'"):
        calibrated("tf", data=bad)


def test_onnxruntime_failures_become_calibration_data_errors() -> None:
    """Symbolic dims pass validation; onnxruntime's own error is re-raised naming the batch and inputs."""
    add = helper.make_node("Add", ["x", "c"], ["y"])
    graph = helper.make_graph(
        [add],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "C"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor("c", TensorProto.FLOAT, [4], [1, 2, 3, 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    good, bad = np.zeros((2, 4), np.float32), np.zeros((2, 3), np.float32)
    with pytest.raises(CalibrationDataError, match=r"batch 1: onnxruntime failed on inputs 'x' float32 \[2, 3\]"):
        collect_statistics(model, ["y"], [{"x": good}, {"x": bad}], progress=False)


def test_non_finite_activations_are_rejected() -> None:
    x = calib_x()[:32].copy()
    x[5, 0, 3, 3] = np.nan
    with pytest.raises(CalibrationDataError, match="'input' has NaN or infinite values in batch 0"):
        collect_statistics(onnx.load(DIGITS), ["input", "logits"], feeds(32, x), progress=False)


# --- the cap on the bytes one run returns --------------------------------------------------------------------


class CountingTap(TensorTap):
    """Records the bytes each onnxruntime run returns."""

    def _run(self, *args: object, **kwargs: object) -> list[np.ndarray]:  # type: ignore[override]
        values = super()._run(*args, **kwargs)  # type: ignore[arg-type]
        self.returned = [*getattr(self, "returned", []), sum(v.nbytes for v in values)]
        return values


def gathered(
    model: onnx.ModelProto, names: list[str], data: list[dict[str, np.ndarray]], cap: int | None
) -> dict[str, np.ndarray]:
    """Every piece ``iterate_chunks`` yields, put back together in row order."""
    parts: dict[str, list[np.ndarray]] = {}
    for _, piece in iterate_chunks(model, names, data, cap):
        for name, value in piece.items():
            parts.setdefault(name, []).append(value)
    return {name: np.concatenate(values) for name, values in parts.items()}


@pytest.mark.parametrize("model_file", ["digits_cnn.onnx", "digits_cnn_residual.onnx"])
def test_encodings_do_not_depend_on_batch_size_or_cap(model_file: str) -> None:
    """Batch sizes 1, 7, 16 x no cap, the default cap and a 1-byte cap (every run split as finely as
    the model allows: one row, one segment between requested tensors): identical encodings in every mode."""
    graph = graph_ir.load(MODELS / model_file)
    model, names = graph.to_onnx(), activations(graph)
    tiny = TensorTap(model, names, max_bytes_per_run=1)
    plan = tiny._plan({"input": calib_x()[:16]})
    assert plan.rows == 1 and plan.segments is not None and len(plan.segments) >= 5
    x = calib_x()
    modes = {False: ("tf", "symmetric"), True: ("enhanced", "percentile")}
    for histogram, mode_names in modes.items():
        expected = collect_statistics(
            model, names, feeds(16, x), histogram=histogram, progress=False, max_bytes_per_run=None
        )
        for batch in (1, 7, 16):
            for cap in (None, DEFAULT_MAX_BYTES_PER_RUN, 1):
                stats = collect_statistics(
                    model, names, feeds(batch, x), histogram=histogram, progress=False, max_bytes_per_run=cap
                )
                assert list(stats) == list(expected)
                for name in names:
                    if histogram:  # the same histogram, so the same encodings (checked once: the search is slow)
                        assert_same_histogram(stats[name], expected[name].histogram, name)
                    if not histogram or (batch, cap) == (7, 1):
                        for mode in mode_names:
                            assert compute(stats[name], 8, mode) == compute(expected[name], 8, mode), (batch, cap, name)


def test_calibrate_pass_encodings_do_not_depend_on_the_cap() -> None:
    for mode in ("tf", "enhanced"):
        default, _ = calibrated(mode)
        for batch_size, cap in ((7, 1), (1, 0), (16, 50_000)):
            graph, _ = calibrated(mode, batch_size=batch_size, max_bytes_per_run=cap)
            for name in activations(graph):
                assert graph.tensors[name].encoding == default.tensors[name].encoding, (mode, batch_size, cap, name)
    with pytest.raises(PassError, match="max_bytes_per_run"):
        calibrated("tf", max_bytes_per_run=-1)


def test_capped_runs_deliver_every_value_once_and_bit_exact() -> None:
    model = onnx.load(DIGITS)
    names = activations(graph_ir.load(DIGITS))
    expected = reference(tuple(names))
    for batch, cap in ((16, 1), (7, 20_000), (256, 1 << 20)):
        got = gathered(model, names, feeds(batch), cap)
        assert sorted(got) == sorted(names)
        for name in names:
            np.testing.assert_array_equal(got[name], expected[name], err_msg=f"{name} batch {batch} cap {cap}")


def test_no_run_returns_more_than_the_cap() -> None:
    graph = graph_ir.load(MODELS / "digits_cnn_residual.onnx")
    model, names = graph.to_onnx(), activations(graph)
    per_row = {n: v.nbytes // len(v) for n, v in gathered(model, names, feeds(256), None).items()}
    total = sum(per_row.values())
    for cap in (total * 5, total // 2, total // 4):  # one row per run; segments when a row is over the cap
        tap = CountingTap(model, names, max_bytes_per_run=cap)
        for piece in tap.chunks({"input": calib_x()[:16]}):
            assert piece
        assert tap.returned and max(tap.returned) <= cap, (cap, tap.returned)
        plan = tap._plan({"input": calib_x()[:16]})
        assert plan.rows == 1 and (plan.segments is None if cap > total else len(plan.segments or ()) >= 2)
    uncapped = CountingTap(model, names, max_bytes_per_run=None)
    list(uncapped.chunks({"input": calib_x()[:16]}))
    assert uncapped.returned == [sum(per_row[n] for n in names if n != "input") * 16]


def branchy_model() -> onnx.ModelProto:
    """Fixed batch (no row split), a weight transposed by a node, a data-dependent shape and an If
    whose branches read a tensor of the outer graph: what cutting into segments must get right."""
    rng = np.random.default_rng(0)
    w = helper.make_tensor("w", TensorProto.FLOAT, [6, 4], rng.standard_normal((6, 4)).astype(np.float32).ravel())
    one = helper.make_tensor("one", TensorProto.FLOAT, [], [1.0])
    zero = helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0])
    then_branch = helper.make_graph(
        [helper.make_node("Add", ["a", "one"], ["t"])],
        "then",
        [],
        [helper.make_tensor_value_info("t", TensorProto.FLOAT, None)],
    )
    else_branch = helper.make_graph(
        [helper.make_node("Sub", ["a", "one"], ["e"])],
        "else",
        [],
        [helper.make_tensor_value_info("e", TensorProto.FLOAT, None)],
    )
    nodes = [
        helper.make_node("Transpose", ["w"], ["wt"], perm=[1, 0]),
        helper.make_node("MatMul", ["x", "wt"], ["h"]),
        helper.make_node("Relu", ["h"], ["a"]),
        helper.make_node("NonZero", ["a"], ["nz"]),
        helper.make_node("Cast", ["nz"], ["nzf"], to=TensorProto.FLOAT),
        helper.make_node("ReduceMax", ["a"], ["m"], keepdims=0),
        helper.make_node("Greater", ["m", "zero"], ["cond"]),
        helper.make_node("If", ["cond"], ["branch"], then_branch=then_branch, else_branch=else_branch),
        helper.make_node("Sigmoid", ["branch"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "branchy",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 6])],
        [w, one, zero],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_segments_handle_subgraphs_constant_nodes_and_unknown_shapes() -> None:
    model = branchy_model()
    names = ["x", "h", "a", "nzf", "branch", "y"]
    rng = np.random.default_rng(1)
    data = [{"x": rng.standard_normal((3, 4)).astype(np.float32)} for _ in range(4)]
    tap = TensorTap(model, names, max_bytes_per_run=1)
    plan = tap._plan(data[0])
    assert plan.rows is None and plan.segments is not None and len(plan.segments) >= 3
    assert all("wt" not in s.inputs and "cond" not in s.inputs for s in plan.segments)  # never cut there
    assert any("a" in s.inputs and s.requested == ("branch",) for s in plan.segments)  # the If reads 'a'
    assert tap._sizes and max(tap._sizes.values())["nzf"] > 0  # measured by onnxruntime
    pieces = {cap: [p for _, p in iterate_chunks(model, names, data, cap)] for cap in (1, None)}
    assert len(pieces[1]) > len(pieces[None]) == 2 * len(data)  # the graph input, then one run per batch
    for cap, parts in pieces.items():
        values: dict[str, list[np.ndarray]] = {}
        for part in parts:
            for name, value in part.items():
                values.setdefault(name, []).append(value)
        pieces[cap] = values  # type: ignore[assignment]
    np.testing.assert_equal(pieces[1], pieces[None])  # each feed's values, in feed order
    for histogram in (False, True):
        capped = collect_statistics(model, names, data, histogram=histogram, progress=False, max_bytes_per_run=1)
        whole = collect_statistics(model, names, data, histogram=histogram, progress=False, max_bytes_per_run=None)
        for name in names:
            assert compute(capped[name], 8, "tf") == compute(whole[name], 8, "tf"), name
