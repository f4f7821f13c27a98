"""Empirical bias correction: the quantized layer's mean output error goes to ~0 (checked in onnxruntime)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import graph_ir
from qpasses.core.context import PassContext
from qpasses.core.pass_manager import PassManager
from qpasses.core.verification import exact_session
from qpasses.passes import default_registry
from qpasses.quant.config import QuantConfig
from qpasses.quantize import quantize_model

RNG = np.random.default_rng(0)


@pytest.fixture(autouse=True)
def _fresh_rng() -> None:
    """Each test draws the same data whatever ran before it (xdist and -k change the order)."""
    global RNG
    RNG = np.random.default_rng(0)


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    return exact_session(model).run(None, {"x": x})[0]


def _model(kind: str) -> onnx.ModelProto:
    if kind == "gemm":
        w = RNG.normal(0, 0.3, (16, 32)).astype(np.float32)
        b = RNG.normal(0, 0.1, 16).astype(np.float32)
        node = helper.make_node("Gemm", ["x", "w", "b"], ["y"], transB=1, name="fc")
        x_vi, y_vi = ([None, 32], [None, 16])
    else:
        groups = 8 if kind == "depthwise" else 1
        w = RNG.normal(0, 0.3, (8, 8 // groups, 3, 3)).astype(np.float32)
        b = RNG.normal(0, 0.1, 8).astype(np.float32)
        node = helper.make_node("Conv", ["x", "w", "b"], ["y"], group=groups, pads=[1, 1, 1, 1], name="conv")
        x_vi, y_vi = ([None, 8, 6, 6], [None, 8, 6, 6])
    graph = helper.make_graph(
        [node],
        kind,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_vi)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_vi)],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _data(model: onnx.ModelProto, n: int = 64) -> np.ndarray:
    shape = [n] + [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim[1:]]
    # Strongly non-zero-mean inputs (post-ReLU-like): the case where rounding errors shift outputs.
    return np.abs(RNG.normal(1.0, 1.0, shape)).astype(np.float32)


@pytest.mark.parametrize("kind", ["gemm", "conv", "depthwise"])
def test_mean_output_error_removed(kind: str) -> None:
    model = _model(kind)
    x = _data(model)
    feeds = [{"x": x[i : i + 16]} for i in range(0, len(x), 16)]
    ref = _run(model, x).astype(np.float64)
    axes = (0,) if kind == "gemm" else (0, 2, 3)
    # Weights at 4 bits per tensor so the rounding shift is large; 16-bit activations keep their noise small.
    config = QuantConfig(weight_bw=4, act_bw=16)
    shift = {}
    for bc in (False, True):
        q = quantize_model(model, feeds, config, bias_correction=bc, progress=False, quantize_outputs=True).model
        err = _run(q, x) - ref
        if kind != "gemm":
            err = err[:, :, 1:-1, 1:-1]  # zero padding is outside the correction's model
        shift[bc] = np.abs(err.mean(axis=axes)).max()
    assert shift[True] < 0.25 * shift[False], shift


def test_works_with_a_one_shot_generator() -> None:
    """calibrate leaves the input means, so a generator of feeds (readable once) is enough."""
    model = _model("gemm")
    x = _data(model)
    result = quantize_model(
        model,
        ({"x": x[i : i + 16]} for i in range(0, 64, 16)),
        QuantConfig(weight_bw=4),
        progress=False,
        quantize_outputs=True,
    )
    applied = [r.message for r in result.report.remarks if r.pass_name == "bias-correction"]
    assert applied == ["corrected 1 biases from input means (calibration)"]


def test_pass_measures_means_itself_without_calibrate() -> None:
    model = _model("conv")
    x = _data(model)
    g = graph_ir.from_onnx(model)
    b_before = g.tensors["b"].data.copy()
    reg = default_registry()
    ctx = PassContext(calibration_data=[{"x": x}])
    PassManager([reg.create_pass("encode-weights", weight_bw=4), reg.create_pass("bias-correction")]).run(g, ctx)
    # Independent expectation: shift = sum over (cin, kh, kw) of (W_q - W) * E[x per channel].
    w = numpy_helper.to_array(model.graph.initializer[0]).astype(np.float64)
    enc = g.tensors["w"].encoding
    step, offset = enc.scale[0], enc.offset[0]
    wq = (np.clip(np.rint(w / step) - offset, 0, 15) + offset) * step
    expected = b_before - np.einsum("oikl,i->o", wq - w, x.astype(np.float64).mean(axis=(0, 2, 3)))
    np.testing.assert_allclose(g.tensors["b"].data, expected, rtol=1e-5, atol=1e-6)


def test_seq_mse_turns_default_bias_correction_off() -> None:
    model = _model("gemm")
    x = _data(model)
    result = quantize_model(model, [{"x": x}], QuantConfig(weight_bw=4, per_channel=True), seq_mse=True, progress=False)
    assert "bias-correction" not in [r.name for r in result.report.records]
