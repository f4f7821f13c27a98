"""keep-depthwise-inputs-float and calibrate's reader-aware ranges (qpasses.quant.live_range).

Truth: numpy re-implementations of the rounding (a grid over the range calibrate measured), the
FP32 model in onnxruntime, and the lowered graph (which ops keep quantizers).
"""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from qdq_checks import output_sqnr, quantized_tensors

import graph_ir
from qpasses.core import verification
from qpasses.data.evaluation import sqnr_db
from qpasses.passes.fallback.depthwise_inputs import KeepDepthwiseInputsFloat, predicted_sqnr_db
from qpasses.quant.config import QuantConfig
from qpasses.quant.live_range import clamp_range, live_interval
from qpasses.quantize import quantize_model
from qpasses.runtime.integer_compute import integer_mac_share

C, HW = 4, 12


def _model(nodes: list, inits: list, opset: int = 14) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "m",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", C, HW, HW])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def amplifying_depthwise(seed: int = 0) -> onnx.ModelProto:
    """x -> 1x1 Conv -> HardSwish = h -> depthwise 3x3 Conv = d -> HardSwish -> 1x1 Conv = y. The 1x1
    Conv leaves channel 0 of ``h`` 50x smaller than the others, and the depthwise weights give it 50x
    the gain (what batch-norm folding writes): its output channel drowns in h's 8-bit rounding."""
    rng = np.random.default_rng(seed)
    scale = np.array([0.02, 1.0, 1.0, 1.0], np.float32)
    w1 = (np.eye(C, dtype=np.float32) + 0.1 * rng.standard_normal((C, C)).astype(np.float32)) * scale[:, None]
    dw = rng.standard_normal((C, 1, 3, 3)).astype(np.float32) / 3
    dw[0] *= 50.0
    w3 = (rng.standard_normal((C, C)) / 2).astype(np.float32)
    inits = [
        numpy_helper.from_array(w1.reshape(C, C, 1, 1), "w1"),
        numpy_helper.from_array(dw, "dw"),
        numpy_helper.from_array(w3.reshape(C, C, 1, 1), "w3"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], name="pw1"),
        helper.make_node("HardSwish", ["c1"], ["h"], name="hs1"),
        helper.make_node("Conv", ["h", "dw"], ["d"], name="dwconv", group=C, pads=[1, 1, 1, 1]),
        helper.make_node("HardSwish", ["d"], ["h2"], name="hs2"),
        helper.make_node("Conv", ["h2", "w3"], ["y"], name="pw2"),
    ]
    return _model(nodes, inits)


def feeds(n: int, seed: int = 1) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": (2 * rng.standard_normal((2, C, HW, HW))).astype(np.float32)} for _ in range(n)]


def _output_sqnr(fp32: onnx.ModelProto, model: onnx.ModelProto) -> float:
    return output_sqnr(fp32, model, feeds(4, seed=9))


def _with_outputs(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    out.graph.output.extend(helper.make_empty_tensor_value_info(n) for n in names)
    return out


def test_prediction_matches_the_rounding_it_predicts() -> None:
    """The predicted SQNR of the depthwise output equals, within 1.5 dB, what rounding h to its
    calibrated 8-bit grid and running the Conv in numpy gives."""
    model = amplifying_depthwise()
    sess = verification.exact_session(_with_outputs(model, ["h", "d"]))
    runs = [sess.run(["h", "d"], f) for f in feeds(8)]
    h = np.concatenate([r[0] for r in runs])
    d = np.concatenate([r[1] for r in runs])
    lo, hi = min(float(h.min()), 0.0), max(float(h.max()), 0.0)
    step = (hi - lo) / 255
    zero = round(-lo / step)
    hq = (np.clip(np.round(h / step) + zero, 0, 255) - zero) * step
    dw = numpy_helper.to_array(model.graph.initializer[1])
    conv = helper.make_model(
        helper.make_graph(
            [helper.make_node("Conv", ["h", "dw"], ["d"], group=C, pads=[1, 1, 1, 1])],
            "dw",
            [helper.make_tensor_value_info("h", TensorProto.FLOAT, None)],
            [helper.make_tensor_value_info("d", TensorProto.FLOAT, None)],
            [numpy_helper.from_array(dw, "dw")],
        ),
        opset_imports=[helper.make_opsetid("", 14)],
    )
    measured = sqnr_db(d, verification.exact_session(conv).run(None, {"h": hq.astype(np.float32)})[0])
    power = np.square(d.astype(np.float64)).mean(axis=(0, 2, 3))
    predicted = predicted_sqnr_db(dw, power, step)
    assert abs(predicted - measured) < 1.5, (predicted, measured)
    assert predicted < 20  # the model is built to need the pass


def test_amplifying_depthwise_runs_float_and_the_output_improves(monkeypatch: pytest.MonkeyPatch) -> None:
    model = amplifying_depthwise()
    calib = feeds(8)
    result = quantize_model(model, calib, QuantConfig(per_channel=True), progress=False, auto_fallback=False)
    quantized = quantized_tensors(result.model)
    dwconv = next(n for n in result.model.graph.node if n.name == "dwconv")
    assert "h" not in quantized and dwconv.input[0] == "h"  # the depthwise Conv reads float
    assert {"x", "h2"} <= quantized  # the 1x1 Convs stay integer
    share = integer_mac_share(result.model, calib[0])
    assert 0 < share.share < 1 and {op.name for op in share.float_ops} == {"dwconv"}
    (remark,) = [r for r in result.report.remarks if r.pass_name == KeepDepthwiseInputsFloat.name]
    assert remark.nodes == ("dwconv",) and "predicted output SQNR dwconv" in (remark.reason or "")
    monkeypatch.setattr(KeepDepthwiseInputsFloat, "run", lambda self, graph, ctx: self.result(False))
    without = quantize_model(model, calib, QuantConfig(per_channel=True), progress=False, auto_fallback=False)
    assert {"h", "d"} <= quantized_tensors(without.model)
    good, bad = _output_sqnr(model, result.model), _output_sqnr(model, without.model)
    assert good - bad > 3, (good, bad)  # measured: 32.1 dB with the pass, 28.5 dB without


def test_balanced_depthwise_stays_integer() -> None:
    model = amplifying_depthwise()
    for init in model.graph.initializer:  # equal channels, equal gains
        if init.name in ("w1", "dw"):
            w = numpy_helper.to_array(init).copy()
            w[0] = w[1]
            init.CopyFrom(numpy_helper.from_array(w, init.name))
    result = quantize_model(model, feeds(8), QuantConfig(per_channel=True), progress=False, auto_fallback=False)
    assert {"h", "d"} <= quantized_tensors(result.model)
    assert integer_mac_share(result.model, feeds(1)[0]).share == 1.0


def test_quantized_only_target_gets_int16() -> None:
    result = quantize_model(
        amplifying_depthwise(), feeds(8), QuantConfig(per_channel=True), target="htp", progress=False
    )
    acts = result.encodings.activations
    assert acts["h"].bitwidth == 16 and acts["d"].bitwidth == 16 and acts["h2"].bitwidth == 8


# --- reader-aware ranges ---------------------------------------------------------------------------


def _readers_model(readers: list[onnx.NodeProto], opset: int = 14, inits: list | None = None) -> graph_ir.Graph:
    nodes = [helper.make_node("Conv", ["x", "w"], ["t"], name="conv"), *readers]
    w = numpy_helper.from_array(np.ones((C, C, 1, 1), np.float32), "w")
    model = _model(nodes, [w, *(inits or [])], opset)
    del model.graph.output[:]
    model.graph.output.extend(helper.make_empty_tensor_value_info(o) for n in readers for o in n.output)
    return graph_ir.load(model)


def test_live_interval_per_reader() -> None:
    relu = helper.make_node("Relu", ["t"], ["r"])
    hswish = helper.make_node("HardSwish", ["t"], ["s"])
    assert live_interval(_readers_model([relu]), "t") == (0.0, math.inf)
    assert live_interval(_readers_model([hswish]), "t") == (-3.0, math.inf)
    assert live_interval(_readers_model([relu, hswish]), "t") == (-3.0, math.inf)  # the hull
    lo, hi = (
        numpy_helper.from_array(np.array(-1.0, np.float32), "lo"),
        numpy_helper.from_array(np.array(6.0, np.float32), "hi"),
    )
    clip = helper.make_node("Clip", ["t", "lo", "hi"], ["c"])
    assert live_interval(_readers_model([clip], inits=[lo, hi]), "t") == (-1.0, 6.0)
    clip6 = helper.make_node("Clip", ["t"], ["c"], min=0.0, max=6.0)
    assert live_interval(_readers_model([clip6], opset=6), "t") == (0.0, 6.0)
    data_bound = helper.make_node("Clip", ["t", "r"], ["c"])  # its minimum comes from data
    assert live_interval(_readers_model([relu, data_bound]), "t") is None
    sigmoid = helper.make_node("Sigmoid", ["t"], ["g"])  # never constant: every value matters
    assert live_interval(_readers_model([hswish, sigmoid]), "t") is None
    graph = _readers_model([hswish])
    graph.outputs.append("t")
    assert live_interval(graph, "t") is None  # the model returns it whole
    assert clamp_range(-48.0, 41.0, (-3.0, math.inf)) == (-3.0, 41.0)
    assert clamp_range(-48.0, -5.0, (-3.0, math.inf)) is None  # never reaches the live part: left alone


def test_calibrate_narrows_a_hardswish_input_and_the_output_follows() -> None:
    """A Conv output spanning [-k, m] read by a HardSwish gets a grid from -3 (its readers cannot tell
    lower values apart): the HardSwish output is then closer to FP32 than with the full-range grid,
    computed here in numpy from the same FP32 values."""
    rng = np.random.default_rng(3)
    w = numpy_helper.from_array((rng.standard_normal((C, C, 1, 1)) * 4).astype(np.float32), "w")
    nodes = [helper.make_node("Conv", ["x", "w"], ["t"], name="conv"), helper.make_node("HardSwish", ["t"], ["y"])]
    model = _model(nodes, [w])
    calib = feeds(8)
    result = quantize_model(model, calib, QuantConfig(per_channel=True), progress=False, auto_fallback=False)
    enc = result.encodings.activations["t"]
    t = np.concatenate([verification.exact_session(_with_outputs(model, ["t"])).run(["t"], f)[0] for f in calib])
    assert t.min() < -10  # a long negative tail the HardSwish zeroes
    step = enc.scale[0]
    grid_min, grid_max = step * enc.offset[0], step * (255 + enc.offset[0])  # x = scale * (q + offset)
    assert abs(grid_min - -3.0) <= step, (grid_min, step)
    assert abs(grid_max - float(t.max())) <= step
    assert any(r.pass_name == "calibrate" and "narrowed 1 ranges" in r.message for r in result.report.remarks)

    def hswish(v: np.ndarray) -> np.ndarray:
        return v * np.clip(v + 3, 0, 6) / 6

    full_step = (t.max() - t.min()) / 255
    full = np.round((t - t.min()) / full_step) * full_step + t.min()
    narrow = np.clip(np.round(t / step - enc.offset[0]), 0, 255) * step + grid_min
    ref = hswish(t)
    assert sqnr_db(ref, hswish(narrow)) > sqnr_db(ref, hswish(full)) + 3
