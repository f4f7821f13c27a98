"""Calibration: streaming statistics from one onnxruntime session, and the ``calibrate`` pass.

References are computed independently: a model exposing the tensors built with onnx.helper, run
by onnxruntime on all samples in one batch, and encodings computed from the raw values.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import graph_ir
from qpasses.calibration import collect_statistics, iterate_tensors, unavailable_tensors
from qpasses.context import PassContext
from qpasses.encodings import Encoding, compute
from qpasses.encodings_io import PrecisionOverride
from qpasses.errors import CalibrationDataError
from qpasses.passes.calibrate import Calibrate
from qpasses.quant_plan import QuantPlan
from qpasses.registry import default_registry
from qpasses.statistics import Histogram, HistogramObserver, MinMaxObserver
from qpasses.verification import runtime_session

MODELS = Path(__file__).resolve().parent.parent / "models"
DIGITS = MODELS / "digits_cnn.onnx"
CALIB = MODELS / "digits_calib.npz"


@functools.cache
def calib_x() -> np.ndarray:
    with np.load(CALIB) as data:
        return data["input"]


def feeds(batch: int, x: np.ndarray | None = None) -> list[dict[str, np.ndarray]]:
    x = calib_x() if x is None else x
    return [{"input": x[i:i + batch]} for i in range(0, len(x), batch)]


@functools.cache
def reference(names: tuple[str, ...]) -> dict[str, np.ndarray]:
    """The digits model's ``names`` on all calibration samples, from a hand-built session.

    It exposes exactly ``names``, like calibration does: onnxruntime fuses differently (and rounds
    differently in the last bit) depending on which tensors must stay visible. Calibration runs
    with every graph optimization on, so this reference does too (``runtime_session``): the model
    is FP32 (no integer kernels) and the statistics must match bit for bit.
    """
    model = onnx.load(DIGITS)
    outputs = {o.name for o in model.graph.output}
    fetch = [n for n in names if n != "input"]
    model.graph.output.extend(helper.make_empty_tensor_value_info(n) for n in fetch if n not in outputs)
    session = runtime_session(model)
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


@pytest.mark.parametrize("mode", ["enhanced", "percentile"])
def test_histogram_encodings_equal_direct_computation(mode: str) -> None:
    """One batch: the streaming histogram is the one-shot histogram of all the values."""
    graph, _ = calibrated(mode, batch_size=256)
    for name in activations(graph):
        values = plan_values()[name]
        assert graph.tensors[name].encoding == compute(Histogram.from_values(values), 8, mode), name
        if mode == "enhanced":  # the raw-values path builds the same histogram itself
            assert graph.tensors[name].encoding == compute(values, 8, mode), name
        else:  # clipping the tails never widens the min/max range
            enc, tf = graph.tensors[name].encoding, compute(values, 8, "tf")
            assert tf.min[0] - tf.scale[0] <= enc.min[0] and enc.max[0] <= tf.max[0] + tf.scale[0], name


@pytest.mark.parametrize("mode", ["enhanced", "percentile"])
def test_streaming_histograms_equal_an_observer_fed_the_same_batches(mode: str) -> None:
    graph, _ = calibrated(mode, batch_size=16)
    x = calib_x()
    for name in activations(graph):
        obs = HistogramObserver()
        for i in range(0, len(x), 16):
            obs.update(plan_values()[name][i:i + 16])
        assert graph.tensors[name].encoding == compute(obs, 8, mode), name


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


def test_fast_histogram_update_counts_like_the_observer() -> None:
    """The chunked update must bin exactly like HistogramObserver.update, through range growth on both sides."""
    rng = np.random.default_rng(0)
    model = helper.make_model(helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N"])]),
        opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    batches = [rng.standard_normal(200_000).astype(np.float32) * s + c
               for s, c in [(1, 0), (0.1, 0), (5, 3), (1, -20), (30, 0), (0.5, 0.25)]]
    batches.append(np.full(10, batches[0].max(), np.float32))  # lands exactly on the top edge
    stats = collect_statistics(model, ["y"], [{"x": b} for b in batches], histogram=True, progress=False)
    ours, expected = stats["y"], HistogramObserver()
    for b in batches:
        expected.update(b)
    assert isinstance(ours, HistogramObserver)
    a, b = ours.histogram, expected.histogram
    assert (a.lo, a.width, a.min, a.max) == (b.lo, b.width, b.min, b.max)
    np.testing.assert_array_equal(a.counts, b.counts)


def test_iterate_tensors_streams_requested_tensors() -> None:
    model = onnx.load(DIGITS)
    names = ("input", "features.1.act_out", "logits")
    seen = list(iterate_tensors(model, names, feeds(100)))
    assert [len(v["logits"]) for v in seen] == [100, 100, 56]
    np.testing.assert_array_equal(np.concatenate([v["features.1.act_out"] for v in seen]),
                                  reference(names)["features.1.act_out"])
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
        "nope": "not produced by any node of the main graph", weight: "a constant, not an activation"}
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
    graph = helper.make_graph([add], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "C"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
                              [helper.make_tensor("c", TensorProto.FLOAT, [4], [1, 2, 3, 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    good, bad = np.zeros((2, 4), np.float32), np.zeros((2, 3), np.float32)
    with pytest.raises(CalibrationDataError, match=r"batch 1: onnxruntime failed on inputs 'x' float32 \[2, 3\]"):
        collect_statistics(model, ["y"], [{"x": good}, {"x": bad}], progress=False)


def test_non_finite_activations_are_rejected() -> None:
    x = calib_x()[:32].copy()
    x[5, 0, 3, 3] = np.nan
    with pytest.raises(CalibrationDataError, match="'input' has NaN or infinite values in batch 0"):
        collect_statistics(onnx.load(DIGITS), ["input", "logits"], feeds(32, x), progress=False)
