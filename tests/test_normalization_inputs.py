"""keep-normalization-inputs-float: a LayerNorm's input (the residual stream) and output stay float.

Truth: the FP32 model in onnxruntime (output SQNR with and without the pass) and the lowered graph
(which tensors have quantizers, which ops still run as integer kernels).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from qdq_checks import output_sqnr, quantized_tensors

from qpasses.passes.fallback.normalization_inputs import KeepNormalizationInputsFloat
from qpasses.quant.config import QuantConfig
from qpasses.quantize import quantize_model
from qpasses.runtime.integer_compute import integer_mac_share

PASS = KeepNormalizationInputsFloat.name
TOKENS, DIM = 8, 16


def post_ln_block(seed: int = 0, *, residual: bool = True) -> onnx.ModelProto:
    """x -> MatMul -> Add(s, .) = r -> LayerNorm = ln -> MatMul -> Relu -> MatMul -> Add(ln, .) = r2 ->
    LayerNorm = y: a post-LN transformer block; ``s`` is the residual stream from earlier blocks.
    ``residual=False``: the first LayerNorm reads the MatMul's output directly (no Add)."""
    rng = np.random.default_rng(seed)

    def weight(name: str) -> onnx.TensorProto:
        return numpy_helper.from_array((rng.standard_normal((DIM, DIM)) / np.sqrt(DIM)).astype(np.float32), name)

    def norm(name: str) -> list[onnx.TensorProto]:
        return [
            numpy_helper.from_array((1 + 0.1 * rng.standard_normal(DIM)).astype(np.float32), f"{name}_g"),
            numpy_helper.from_array((0.1 * rng.standard_normal(DIM)).astype(np.float32), f"{name}_b"),
        ]

    nodes = [helper.make_node("MatMul", ["x", "w1"], ["a"], name="mm1")]
    if residual:
        nodes.append(helper.make_node("Add", ["s", "a"], ["r"], name="res1"))
    nodes += [
        helper.make_node("LayerNormalization", ["r" if residual else "a", "ln1_g", "ln1_b"], ["ln"], name="ln1"),
        helper.make_node("MatMul", ["ln", "w2"], ["h"], name="mm2"),
        helper.make_node("Relu", ["h"], ["h2"], name="relu"),
        helper.make_node("MatMul", ["h2", "w3"], ["f"], name="mm3"),
        helper.make_node("Add", ["ln", "f"], ["r2"], name="res2"),
        helper.make_node("LayerNormalization", ["r2", "ln2_g", "ln2_b"], ["y"], name="ln2"),
    ]
    graph = helper.make_graph(
        nodes,
        "post_ln",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["N", TOKENS, DIM]) for n in ("x", "s")[: 1 + residual]],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", TOKENS, DIM])],
        [weight("w1"), weight("w2"), weight("w3"), *norm("ln1"), *norm("ln2")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def stream_feeds(n: int, seed: int = 1, *, residual: bool = True) -> list[dict[str, np.ndarray]]:
    """Tokens ``x``, and a residual stream ``s`` with one outlier channel (40x the others), as
    transformers' residual streams have."""
    rng = np.random.default_rng(seed)
    feeds = []
    for _ in range(n):
        s = rng.standard_normal((2, TOKENS, DIM)).astype(np.float32)
        s[..., 0] *= 40.0
        feed = {"x": rng.standard_normal((2, TOKENS, DIM)).astype(np.float32), "s": s}
        feeds.append(feed if residual else {"x": feed["x"]})
    return feeds


def _quantize(model: onnx.ModelProto, residual: bool = True, **kw: object):
    calib = stream_feeds(8, residual=residual)
    return quantize_model(model, calib, QuantConfig(per_channel=True), progress=False, **kw)


def _sqnr(fp32: onnx.ModelProto, other: onnx.ModelProto) -> float:
    return output_sqnr(fp32, other, stream_feeds(8, seed=7))


def _remarks(result, kind: str) -> list:  # noqa: ANN001
    return [r for r in result.report.remarks if r.pass_name == PASS and r.kind == kind]


def test_residual_stream_stays_float_and_matmuls_stay_integer(monkeypatch: pytest.MonkeyPatch) -> None:
    model = post_ln_block()
    result = _quantize(model, auto_fallback=False)
    quantized = quantized_tensors(result.model)
    assert not {"r", "r2", "y"} & quantized  # the normalizations' inputs and outputs
    # The skip connection adds the float LayerNorm output; the MatMul reading it quantizes it itself.
    res2 = next(n for n in result.model.graph.node if n.name == "res2")
    assert "ln" in res2.input
    assert {"x", "ln", "h2"} <= quantized
    assert integer_mac_share(result.model, stream_feeds(1)[0]).share == 1.0
    (remark,) = _remarks(result, "applied")
    assert "kept 2 normalization inputs and outputs in float32" in remark.message
    assert remark.nodes == ("r", "r2")

    monkeypatch.setattr(KeepNormalizationInputsFloat, "run", lambda self, graph, ctx: self.result(False))
    without = _quantize(model, auto_fallback=False)
    assert {"r", "r2"} <= quantized_tensors(without.model)
    good, bad = _sqnr(model, result.model), _sqnr(model, without.model)
    # The outlier channel sets r's 8-bit scale: the other channels keep a few levels through the
    # LayerNorm. Measured: 22.5 dB with the pass, 18.7 dB without.
    assert good - bad > 3, (good, bad)


def test_normalization_reading_a_matmul_staysquantized_tensors() -> None:
    result = _quantize(post_ln_block(residual=False), residual=False, auto_fallback=False)
    quantized = quantized_tensors(result.model)
    assert "a" in quantized and "r2" not in quantized  # a float output would make mm1 run in float
    (missed,) = _remarks(result, "missed")
    assert missed.nodes == ("a",) and "Conv/MatMul/Gemm" in (missed.reason or "")
    assert integer_mac_share(result.model, stream_feeds(1, residual=False)[0]).share == 1.0


def test_quantized_only_target_keeps_the_stream_in_int16() -> None:
    result = _quantize(post_ln_block(), auto_fallback=False, target="htp")
    acts = result.encodings.activations
    assert acts["r"].bitwidth == 16 and acts["r2"].bitwidth == 16
    assert acts["h2"].bitwidth == 8
    assert any("int16" in r.message for r in _remarks(result, "applied"))
