"""The automatic fallback's range clipping: narrower activation grids where the outputs gain.

Truth here: errors measured by quantizing real values (not the cost model the search uses), the
FP32 model's outputs in onnxruntime on held-out data, and the scales of an unclipped run.
"""

from __future__ import annotations

import failure_class_models as fc
import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from qdq_checks import output_sqnr

from qpasses.core import verification
from qpasses.core.errors import PassError
from qpasses.quant.config import QuantConfig
from qpasses.quantize import quantize_model, quantize_once
from qpasses.runtime.range_clipping import FACTORS, clip_factor, with_clips
from qpasses.runtime.tensor_sensitivity import SwitchableQDQ


def _real_error(values: np.ndarray, step: float, zero_point: int, factor: float) -> float:
    """Mean squared error of quantizing ``values`` to uint8 with ``step * factor`` (zero point kept)."""
    s = step * factor
    q = np.clip(np.rint(values / s) + zero_point, 0, 255)
    return float(np.mean(((q - zero_point) * s - values) ** 2))


def _levels(values: np.ndarray, step: float, zero_point: int) -> np.ndarray:
    q = np.clip(np.rint(values / step) + zero_point, 0, 255).astype(np.int64)
    return np.bincount(q, minlength=256)


def test_clip_factor_narrows_a_long_tail_and_the_real_error_drops() -> None:
    rng = np.random.default_rng(0)
    values = rng.laplace(0.0, 1.0, 200_000)  # the full range reaches ~12 scales: the bulk gets few levels
    step = (values.max() - values.min()) / 255
    zero_point = int(round(-values.min() / step))
    factor = clip_factor(_levels(values, step, zero_point), 0, zero_point)
    assert factor < 1.0
    # Measured by quantizing the values themselves (the search weighs clipping 3x, as tf_enhanced: it
    # stops short of the least squared error, 0.75 here, on purpose)
    assert _real_error(values, step, zero_point, factor) < 0.8 * _real_error(values, step, zero_point, 1.0)


def test_clip_factor_keeps_a_range_the_values_fill() -> None:
    values = np.random.default_rng(1).uniform(-3.0, 5.0, 100_000)
    step, zero_point = 8.0 / 255, round(3.0 / (8.0 / 255))
    assert clip_factor(_levels(values, step, zero_point), 0, zero_point) == 1.0
    assert clip_factor(np.zeros(256, np.int64), 0, 0) == 1.0  # no values: nothing to gain


def _scales(model: onnx.ModelProto) -> dict[str, float]:
    """Per-tensor scale of each activation quantizer, by the FP32 tensor it reads."""
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    return {
        n.input[0]: float(inits[n.input[1]])
        for n in model.graph.node
        if n.op_type == "QuantizeLinear" and n.input[0] not in inits and inits[n.input[1]].ndim == 0
    }


def test_auto_fallback_clips_the_long_tail_instead_of_keeping_it_float() -> None:
    model = fc.long_tail_tanh()
    calib, test = fc.tail_feeds(8), fc.tail_feeds(8, seed=5)
    plain = quantize_model(model, calib, QuantConfig(per_channel=True), progress=False, auto_fallback=False)
    result = quantize_model(model, calib, QuantConfig(per_channel=True), progress=False)
    assert output_sqnr(model, plain.model, test) < 20.0  # below the floor: the fallback runs
    clipped = {c.tensor: c.factor for c in result.clipped}
    assert "t" in clipped and result.fallback == []  # no tensor left float: the MatMuls stay integer
    before, after = _scales(plain.model), _scales(result.model)
    assert after.keys() == before.keys()
    for name, factor in clipped.items():
        assert factor in FACTORS and after[name] == pytest.approx(before[name] * factor, rel=1e-6)
    assert output_sqnr(model, result.model, test) > output_sqnr(model, plain.model, test) + 1.0  # held-out data
    assert any("clipped" in r.message for r in result.report.remarks if r.pass_name == "auto-fallback")
    assert f"auto-fallback: {len(clipped)} activation ranges clipped" in result.summary()


def test_a_tensor_a_global_max_reads_is_never_clipped() -> None:
    """The row maximum is the tail itself: clipping 't' would cut what 'peak' returns."""
    model = fc.long_tail_tanh(with_peak=True)
    calib, test = fc.tail_feeds(8), fc.tail_feeds(8, seed=5)
    plain = quantize_model(model, calib, QuantConfig(per_channel=True), progress=False, auto_fallback=False)
    result = quantize_model(model, calib, QuantConfig(per_channel=True), progress=False)
    assert "t" not in {c.tensor for c in result.clipped}
    for j in range(2):  # neither output worse on held-out data than without the fallback
        assert output_sqnr(model, result.model, test, j) >= output_sqnr(model, plain.model, test, j) - 0.1


def test_switch_chooses_between_the_grid_and_the_clipped_one() -> None:
    model = fc.long_tail_tanh()
    feed = fc.tail_feeds(1, seed=3)[0]
    lowered = quantize_model(model, fc.tail_feeds(4), progress=False, auto_fallback=False).model
    switchable = SwitchableQDQ(lowered, {"t": 0.5})
    assert switchable.tensors == ["t"]
    same = verification.exact_session(lowered).run(None, feed)[0]
    clipped = verification.exact_session(with_clips(lowered, {"t": 0.5})).run(None, feed)[0]
    assert np.array_equal(switchable.run(feed, [])[0], same)
    np.testing.assert_allclose(switchable.run(feed, ["t"])[0], clipped, rtol=0, atol=1e-5)
    assert not np.allclose(same, clipped)


def test_clip_ranges_option_scales_the_calibrated_grid() -> None:
    model = fc.long_tail_tanh()
    calib = fc.tail_feeds(4)
    plain = _scales(quantize_once(model, calib, progress=False).model)
    half = _scales(quantize_once(model, calib, clip_ranges={"t": 0.5}, progress=False).model)
    assert half["t"] == pytest.approx(plain["t"] * 0.5, rel=1e-6)
    assert half["x"] == plain["x"]
    with pytest.raises(PassError, match="tensor=factor"):
        quantize_once(model, calib, clip_ranges={"t": 1.5}, progress=False)


def test_only_8_and_16_bit_integer_grids_are_candidates() -> None:
    """A float8 quantizer next to a uint8 one: the search reads the integer one and skips the other."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(2)
    feeds = [{"x": rng.standard_normal((64, 1024)).astype(np.float32)} for _ in range(4)]
    feeds[0]["x"][0, 0] = -12.0  # one value in 262,144 sets the range: 8 bits pay for it everywhere else
    step = 12.0 / 127
    inits = [
        numpy_helper.from_array(np.float32(step), "s"),
        numpy_helper.from_array(np.uint8(128), "zp_u8"),
        helper.make_tensor("zp_f8", TensorProto.FLOAT8E4M3FN, [], [0.0]),
    ]
    nodes = [
        helper.make_node("Relu", ["x"], ["a"]),
        helper.make_node("Neg", ["x"], ["b"]),
        helper.make_node("QuantizeLinear", ["a", "s", "zp_f8"], ["a_q"]),
        helper.make_node("DequantizeLinear", ["a_q", "s", "zp_f8"], ["a_dq"]),
        helper.make_node("QuantizeLinear", ["b", "s", "zp_u8"], ["b_q"]),
        helper.make_node("DequantizeLinear", ["b_q", "s", "zp_u8"], ["b_dq"]),
        helper.make_node("Add", ["a_dq", "b_dq"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "grids",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [64, 1024])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [64, 1024])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    from qpasses.runtime.range_clipping import clip_factors

    found = clip_factors(model, feeds)
    assert set(found) == {"b"} and found["b"] < 1.0  # the lone extreme of the uint8 one is clipped
