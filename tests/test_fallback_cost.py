"""What the automatic fallback and the parity check cost: forward passes and memory, not seconds.

The fallback bisects for the harmful quantizer instead of trying every one, skips itself when the
parity check already measured the same batches above the floor, and the parity check reads every
activation's integers on one sample, not on a whole batch.
"""

from __future__ import annotations

import math
from collections.abc import Sized

import failure_class_models as fc
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from qdq_checks import quantized_tensors

import qpasses.quantize as quantize_module
from qpasses.data.evaluation import SHAPE_MISMATCH_DB
from qpasses.quant.config import QuantConfig
from qpasses.quant.encodings_io import to_json
from qpasses.quantize import quantize_model
from qpasses.runtime import tensor_sensitivity
from qpasses.runtime.parity import split_first_sample
from qpasses.runtime.tensor_sensitivity import most_harmful

NAMES = [f"t{i}" for i in range(100)]


def _additive(gains: dict[str, float], base: float = 10.0):
    """A score that rises by each kept-float tensor's gain (noise sources that add up), counting calls."""
    calls: list[int] = []

    def without(group):
        calls.append(1)
        return base + sum(gains.get(t, 0.01) for t in group)

    return without, calls


def test_bisection_finds_the_dominant_quantizer_in_log_steps() -> None:
    without, calls = _additive({"t73": 12.0})
    assert most_harmful(NAMES, without, need=11.0) == "t73"
    assert len(calls) <= 2 * math.ceil(math.log2(len(NAMES)))


def test_bisection_gives_up_at_once_when_no_half_buys_enough() -> None:
    without, calls = _additive({})  # every quantizer costs a little: 100 x 0.01 dB
    assert most_harmful(NAMES, without, need=10.0 + 1.0) is None
    assert len(calls) == 2


def test_bisection_follows_the_larger_gain_among_several() -> None:
    without, _ = _additive({"t5": 3.0, "t60": 9.0, "t61": 0.5})
    assert most_harmful(NAMES, without, need=11.0) == "t60"


def test_fallback_is_not_measured_again_when_parity_saw_the_floor(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the fallback re-measured what the parity check measured")

    monkeypatch.setattr("qpasses.quantize.fallback_tensors", refuse)
    model = fc.question_mark_dims()
    result = quantize_model(model, fc.feeds(model, 2, shape=(2, 3, 8, 8)), QuantConfig(), progress=False)
    assert result.parity is not None and min(o.exact_db for o in result.parity.outputs) >= 20.0
    assert result.fallback == []


def _long_outlier_model(steps: int = 60) -> onnx.ModelProto:
    """fc.outlier_intermediate with ``2 * steps`` more quantized activations after its one harmful tensor."""
    model = fc.outlier_intermediate()
    g = model.graph
    g.node[-1].output[0] = "y0"
    g.initializer.extend(
        [onnx.numpy_helper.from_array(np.float32(1.01), "k"), onnx.numpy_helper.from_array(np.float32(0.01), "b")]
    )
    prev = "y0"
    for i in range(steps):
        last = i == steps - 1
        g.node.extend(
            [
                helper.make_node("Mul", [prev, "k"], [f"m{i}"], name=f"mul{i}"),
                helper.make_node("Add", [f"m{i}", "b"], ["y" if last else f"a{i}"], name=f"add{i}"),
            ]
        )
        prev = f"a{i}"
    return model


def test_fallback_still_localizes_below_the_floor(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _long_outlier_model()
    runs: list[int] = []
    real_run = tensor_sensitivity.SwitchableQDQ.run

    def counted(self, feed, on):  # noqa: ANN001, ANN202
        runs.append(1)
        return real_run(self, feed, on)

    monkeypatch.setattr(tensor_sensitivity.SwitchableQDQ, "run", counted)
    given: list[object] = []
    real_fallback = quantize_module.fallback_tensors

    def recorded(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        given.append(kwargs.get("before"))
        return real_fallback(*args, **kwargs)

    monkeypatch.setattr(quantize_module, "fallback_tensors", recorded)
    result = quantize_model(model, fc.feeds(model, 4), QuantConfig(per_channel=True), progress=False)
    assert [s.tensor for s in result.fallback] == ["lifted"]
    # The all-quantized score is the parity check's (same batches), not measured again
    assert len(given) == 1 and isinstance(given[0], float) and given[0] < 20.0
    remark = next(r for r in result.report.remarks if r.pass_name == "auto-fallback")
    assert f"worst output SQNR vs FP32 {given[0]:.1f} dB" in (remark.reason or "")
    # report.txt says what the fallback cost (its scoring and the second run), as it does for every pass
    (record,) = [rec for rec in result.report.records if rec.name == "auto-fallback"]
    assert record.modified and record.seconds > 0 and remark in record.remarks
    assert "pass auto-fallback: modified in" in result.report.format()
    quantizers = len(tensor_sensitivity.SwitchableQDQ(result.model).tensors) + 1  # 'lifted' is float there
    assert quantizers > 100
    # One greedy round keeps 'lifted' and the output is above the floor: a bisection scored on the parity
    # check's batches (a quarter of the 4 one-sample feeds: one) running one half of each split (the other's
    # noise inferred) but both halves of the first, the trial, and one run of 'lifted' alone;
    # not one run per quantizer, nor two per split. Before it, the range-clipping search: every candidate
    # clipped (one run; none clipped is the parity check's) and the first split of its flips (two), none
    # lifting the spiked output.
    assert result.parity is not None and result.parity.samples == 1
    assert result.clipped == []
    assert len(runs) <= math.ceil(math.log2(quantizers)) + 4 + 3


def test_the_callers_float_tensors_and_clipped_ranges_hold_when_the_fallback_acts() -> None:
    """``keep_float_tensors`` / ``clip_ranges`` given to quantize_model reach both runs; the fallback's
    own choices are added (the second run used to get the keyword twice: a TypeError)."""
    model = _long_outlier_model()
    feeds = fc.feeds(model, 4)
    plain = quantize_model(model, feeds, QuantConfig(per_channel=True), progress=False)
    result = quantize_model(
        model, feeds, QuantConfig(per_channel=True), progress=False, keep_float_tensors=["m3"], clip_ranges={"m5": 0.9}
    )
    assert [s.tensor for s in result.fallback] == ["lifted"]
    assert "m3" in quantized_tensors(plain.model) and "m3" not in quantized_tensors(result.model)
    acts, before = result.encodings.activations, plain.encodings.activations
    assert acts["m5"].scale[0] == pytest.approx(0.9 * before["m5"].scale[0], rel=1e-6)


def test_fp32_model_runs_once_for_the_checks_and_the_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    """The parity check's FP32 outputs serve the fallback's scoring and the second run's check: one FP32
    session in all (not three)."""
    from qpasses.core import verification

    sessions: list[bool] = []
    real_session = verification.runtime_session

    def recorded(model, **kwargs):  # noqa: ANN001, ANN003, ANN202
        proto = model if isinstance(model, onnx.ModelProto) else onnx.load_from_string(model)
        sessions.append(not any(n.op_type == "QuantizeLinear" for n in proto.graph.node))
        return real_session(model, **kwargs)

    monkeypatch.setattr(verification, "runtime_session", recorded)
    model = _long_outlier_model(steps=4)
    result = quantize_model(model, fc.feeds(model, 4), QuantConfig(per_channel=True), progress=False)
    assert [s.tensor for s in result.fallback] == ["lifted"]  # two runs, each with its parity check
    assert sessions.count(True) == 1


def _run_starts(monkeypatch: pytest.MonkeyPatch, events: Sized) -> list[int]:
    """``quantize_once`` patched to note ``len(events)`` as each run starts (what the runs before it did)."""
    starts: list[int] = []
    real_once = quantize_module.quantize_once

    def once(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        starts.append(len(events))
        return real_once(*args, **kwargs)

    monkeypatch.setattr(quantize_module, "quantize_once", once)
    return starts


def test_fallback_run_does_not_verify_the_structural_stage_again(monkeypatch: pytest.MonkeyPatch) -> None:
    """The second run rebuilds the first run's structural stage (same model, passes, data): the numeric
    check of its rewrites ran once, in the first run."""
    from qpasses.core import pass_manager

    model = _long_outlier_model(steps=4)
    model.graph.node.insert(1, helper.make_node("Identity", ["c"], ["c_id"], name="exporter_identity"))
    for node in model.graph.node[2:]:
        node.input[:] = ["c_id" if i == "c" else i for i in node.input]
    checks: list[str] = []
    real_check = pass_manager.verification.compare_with
    monkeypatch.setattr(
        pass_manager.verification,
        "compare_with",
        lambda before, after, name, **kw: checks.append(name) or real_check(before, after, name, **kw),
    )
    runs = _run_starts(monkeypatch, checks)
    result = quantize_model(model, fc.feeds(model, 4), QuantConfig(per_channel=True), progress=False)
    assert [s.tensor for s in result.fallback] == ["lifted"] and len(runs) == 2
    assert "remove-identity" in checks[: runs[1]]  # the first run verified the rewrite
    assert checks[runs[1] :] == []  # the second did not again


def test_fallback_run_reads_the_first_runs_statistics(monkeypatch: pytest.MonkeyPatch) -> None:
    """The second quantization (tensors kept float) measures nothing: every graph state it collects on
    is the first run's, by content."""
    import qpasses.data.statistics as statistics_module

    reads: list[int] = []
    real_collect = statistics_module.collect
    monkeypatch.setattr(statistics_module, "collect", lambda *a, **k: reads.append(1) or real_collect(*a, **k))
    real_once = quantize_module.quantize_once
    starts = _run_starts(monkeypatch, reads)
    model = _long_outlier_model(steps=4)
    result = quantize_model(model, fc.feeds(model, 4), QuantConfig(per_channel=True), progress=False)
    assert [s.tensor for s in result.fallback] == ["lifted"]
    assert len(starts) == 2 and starts[1] > 0  # the first run read the data
    assert len(reads) == starts[1]  # the second did not
    # The same encodings as a run that measures afresh
    config = QuantConfig(per_channel=True)
    fresh = real_once(model, fc.feeds(model, 4), config, progress=False, keep_float_tensors=["lifted"])
    assert to_json(fresh.encodings) == to_json(result.encodings)


def _model(batch: int | str) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 4])
    return helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y]))


def test_parity_probe_is_one_sample_of_a_free_batch() -> None:
    feed = {"x": np.ones((8, 4), np.float32)}
    assert split_first_sample(_model("N"), feed)[0]["x"].shape == (1, 4)
    assert split_first_sample(_model(8), feed)[0]["x"].shape == (8, 4)  # a fixed batch of 8 cannot be cut


def test_parity_runs_the_probe_sample_apart_from_the_rest_of_its_batch() -> None:
    feed = {"x": np.arange(32, dtype=np.float32).reshape(8, 4)}
    first, rest = split_first_sample(_model("N"), feed)
    assert rest is not None
    np.testing.assert_array_equal(np.concatenate([first["x"], rest["x"]]), feed["x"])
    assert first["x"].shape == (1, 4) and rest["x"].shape == (7, 4)
    assert split_first_sample(_model(8), feed) == (feed, None)
    one = {"x": feed["x"][:1]}
    assert split_first_sample(_model("N"), one) == (one, None)  # one row: nothing left to run apart


def _data_dependent_length_model() -> onnx.ModelProto:
    """y = x @ W, then only the values above 0.1 (Compress): the output's length depends on rounding."""
    rng = np.random.default_rng(0)
    w = onnx.numpy_helper.from_array(rng.normal(size=(16, 16)).astype(np.float32) * 0.3, "w")
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["y"], name="mm"),
        helper.make_node("Reshape", ["y", "flat"], ["yf"], name="flatten"),
        helper.make_node("Greater", ["yf", "thr"], ["keep"], name="gt"),
        helper.make_node("Compress", ["yf", "keep"], ["out"], name="select", axis=0),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["K"])],
        [
            w,
            onnx.numpy_helper.from_array(np.array([-1], np.int64), "flat"),
            onnx.numpy_helper.from_array(np.float32(0.1), "thr"),
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_fallback_is_not_attempted_when_output_lengths_differ(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("SQNR cannot rank quantizers when an output's length differs")

    monkeypatch.setattr(quantize_module, "fallback_tensors", refuse)
    model = _data_dependent_length_model()
    rng = np.random.default_rng(1)
    feeds = [{"x": rng.normal(size=(8, 16)).astype(np.float32)} for _ in range(4)]
    result = quantize_model(model, feeds, QuantConfig(), progress=False)
    assert result.parity is not None
    assert [o.exact_db for o in result.parity.outputs] == [SHAPE_MISMATCH_DB]
    remark = next(r for r in result.report.remarks if r.pass_name == "auto-fallback")
    assert remark.kind == "missed" and remark.nodes == ("out",) and "shapes differ" in (remark.reason or "")
    assert result.fallback == []


class _FakeSwitchable:
    """Outputs = 1 + the sum of each active quantizer's noise, orthogonal patterns (noise powers add):
    ``amplitude[t][b]`` is tensor t's noise RMS on batch b (feed {"b": b})."""

    def __init__(self, amplitude: dict[str, list[float]]) -> None:
        self.tensors = list(amplitude)
        self.amplitude = amplitude
        q, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(1000, len(amplitude))))
        self.patterns = {t: q[:, i] * np.sqrt(1000) for i, t in enumerate(amplitude)}

    def run(self, feed: dict[str, np.ndarray], on: list[str]) -> list[np.ndarray]:
        b = int(feed["b"])
        return [1.0 + sum((self.amplitude[t][b] * self.patterns[t] for t in on), np.zeros(1000))]


class _Ones:
    def run(self, names: object, feed: object) -> list[np.ndarray]:
        return [np.ones(1000)]


def _fallback_with(monkeypatch: pytest.MonkeyPatch, amplitude: dict[str, list[float]]) -> list[str]:
    monkeypatch.setattr(tensor_sensitivity, "SwitchableQDQ", lambda model: _FakeSwitchable(amplitude))
    monkeypatch.setattr(tensor_sensitivity.verification, "runtime_session", lambda model: _Ones())
    feeds = [{"b": np.array(b)} for b in range(4)]
    chosen, _, _ = tensor_sensitivity.fallback_tensors(None, None, feeds, 20.0, 8)  # type: ignore[arg-type]
    return [s.tensor for s in chosen]


def test_fallback_bisects_on_every_checked_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    """'a' is the worst quantizer on the first batch only, 'b' on the three others and pooled: 'b' goes first."""
    small = {f"s{i}": [0.02] * 4 for i in range(8)}
    chosen = _fallback_with(monkeypatch, {"a": [0.3, 0, 0, 0], "b": [0, 0.2, 0.2, 0.2], **small})
    assert chosen[:1] == ["b"], chosen


def test_fallback_keeps_a_mild_quantizer_that_lifts_the_output_above_the_floor(monkeypatch: pytest.MonkeyPatch) -> None:
    """All on: 19.4 dB; 'c' alone 23.7 dB (not harmful by itself), yet without it 21.4 dB: above the floor."""
    small = {f"s{i}": [0.03] * 4 for i in range(8)}
    assert _fallback_with(monkeypatch, {"c": [0.065] * 4, **small}) == ["c"]
    # Spread evenly, no one quantizer lifts the output 1 dB: none is kept
    assert _fallback_with(monkeypatch, {f"s{i}": [0.05] * 4 for i in range(12)}) == []


def test_scorer_pools_finite_values_only() -> None:
    """A NaN in the reference or an inf in the output leaves that element out, as the signal does."""
    ref = np.array([1.0, np.nan, 2.0, 3.0], np.float32)
    got = np.array([1.5, 0.0, np.inf, 2.0], np.float32)
    scorer = tensor_sensitivity.Scorer([[ref]])
    noise = scorer.noise([[got]])
    assert noise is not None and noise[0] == pytest.approx(0.5**2 + 1.0**2)
    assert scorer.signal[0] == pytest.approx(1.0 + 4.0 + 9.0)
    finite_ref = np.random.default_rng(0).standard_normal(10_000).astype(np.float32)
    finite_got = finite_ref + np.float32(0.01) * np.random.default_rng(1).standard_normal(10_000).astype(np.float32)
    exact = float(np.sum((finite_got.astype(np.float64) - finite_ref.astype(np.float64)) ** 2))
    summed = tensor_sensitivity.Scorer([[finite_ref]]).noise([[finite_got]])  # in float32, one pass
    assert summed is not None and summed[0] == pytest.approx(exact, rel=1e-4)


def test_a_model_too_large_to_score_is_left_with_a_remark(monkeypatch: pytest.MonkeyPatch) -> None:
    """Its scoring sessions would take the model serialized (protobuf's 2 GB limit): no fallback, no crash."""
    monkeypatch.setattr(quantize_module, "_SCORABLE_BYTES", 1_000)  # the small model stands in for a large one
    model = fc.outlier_intermediate()
    result = quantize_model(model, fc.feeds(model, 4), QuantConfig(per_channel=True), progress=False)
    assert result.fallback == [] and result.clipped == []
    remark = next(r for r in result.report.remarks if r.pass_name == "auto-fallback")
    assert remark.kind == "missed" and "1.8 GB" in (remark.reason or "")
