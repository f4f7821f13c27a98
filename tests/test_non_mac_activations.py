"""keep-non-mac-activations-float: on ``ort``/``ort-vnni``, quantizers sit only where an integer
Conv/Gemm/MatMul reads or writes.

Truth: onnxruntime (the FP32 model, the optimized QDQ model's integer kernels) and the lowered graph.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from qdq_checks import output_sqnr, quantized_tensors

from qpasses.passes.fallback.non_mac_activations import KeepNonMacActivationsFloat
from qpasses.quant.config import QuantConfig
from qpasses.quantize import quantize_model
from qpasses.runtime.integer_compute import integer_mac_share

T, D = 16, 32


def tanh_mlp(seed: int = 0) -> onnx.ModelProto:
    """x -> MatMul(w1) = a -> Add(b1) = ab -> Tanh = t -> Mul(t, 2) = m -> MatMul(w2) = y. One channel of
    the offset is 12 (Tanh saturates it), so an 8-bit grid on ``ab`` is coarse for the channels that matter."""
    rng = np.random.default_rng(seed)
    w1 = (rng.standard_normal((D, D)) / np.sqrt(D)).astype(np.float32)
    # a per-position offset (not a bias vector: fold-matmul-bias leaves the MatMul and the Add apart)
    b1 = (0.3 * rng.standard_normal((T, D))).astype(np.float32)
    b1[:, 0] = 12.0
    w2 = (rng.standard_normal((D, D)) / np.sqrt(D)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w1"], ["a"], name="mm1"),
            helper.make_node("Add", ["a", "b1"], ["ab"], name="bias"),
            helper.make_node("Tanh", ["ab"], ["t"], name="act"),
            helper.make_node("Mul", ["t", "two"], ["m"], name="scale"),
            helper.make_node("MatMul", ["m", "w2"], ["y"], name="mm2"),
        ],
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", T, D])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [
            numpy_helper.from_array(w1, "w1"),
            numpy_helper.from_array(b1, "b1"),
            numpy_helper.from_array(np.array(2.0, np.float32), "two"),
            numpy_helper.from_array(w2, "w2"),
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def feeds(n: int, seed: int = 1) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((2, T, D)).astype(np.float32)} for _ in range(n)]


def _output_sqnr(fp32: onnx.ModelProto, model: onnx.ModelProto) -> float:
    return output_sqnr(fp32, model, feeds(4, seed=9))


def _quantize(model: onnx.ModelProto, **kw: object) -> object:
    options = {"target": "ort", "progress": False, "auto_fallback": False, **kw}
    return quantize_model(model, feeds(8), QuantConfig(per_channel=True), **options)


def test_only_mac_inputs_and_outputs_arequantized_tensors(monkeypatch: pytest.MonkeyPatch) -> None:
    model = tanh_mlp()
    result = _quantize(model)
    quantized = quantized_tensors(result.model)
    assert {"x", "a", "m"} <= quantized  # what the MatMuls read and write
    # Only mm2 reads m: it quantizes m itself, and the bias Add, the Tanh and the Mul run in float.
    assert not {"ab", "t"} & quantized
    assert integer_mac_share(result.model, feeds(1)[0]).share == 1.0  # both MatMuls stay integer kernels
    (remark,) = [r for r in result.report.remarks if r.pass_name == KeepNonMacActivationsFloat.name]
    assert remark.nodes == ("ab", "t")
    monkeypatch.setattr(KeepNonMacActivationsFloat, "run", lambda self, graph, ctx: self.result(False))
    without = _quantize(model)
    assert {"ab", "t"} <= quantized_tensors(without.model)
    good, bad = _output_sqnr(model, result.model), _output_sqnr(model, without.model)
    assert good - bad > 1.0, (good, bad)


@pytest.mark.parametrize("target", [None, "htp"])
def test_default_and_quantized_only_targets_keep_every_quantizer(target: str | None) -> None:
    result = _quantize(tanh_mlp(), target=target)
    assert {"x", "a", "ab", "t", "m"} <= set(result.encodings.activations)
    assert not [r for r in result.report.remarks if r.pass_name == KeepNonMacActivationsFloat.name]


def test_quantize_outputs_keeps_the_outputsquantized_tensors() -> None:
    model = tanh_mlp()
    model.graph.node.append(helper.make_node("Sigmoid", ["y"], ["p"], name="head"))
    model.graph.output[0].name = "p"
    assert not {"p", "p_fp"} & quantized_tensors(_quantize(model).model)
    # A quantized output is written by its producer as p_fp, then quantized to p.
    assert "p_fp" in quantized_tensors(_quantize(model, quantize_outputs=True).model)
