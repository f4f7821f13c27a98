"""Identity ops and no-op Casts leave the graph before quantization (default structural stage)."""

from __future__ import annotations

import failure_class_models as fc
import numpy as np
import onnx

from qpasses.core import verification
from qpasses.quant.config import QuantConfig
from qpasses.quantize import quantize_model
from qpasses.runtime.integer_compute import integer_mac_share


def _quantize(model: onnx.ModelProto):
    return quantize_model(model, fc.feeds(model, 4), QuantConfig(per_channel=True), progress=False)


def test_shared_weight_behind_identity_is_quantized_and_casts_get_no_quantizer() -> None:
    model = fc.identity_and_noop_casts()
    result = _quantize(model)
    qdq = result.model
    ops = [n.op_type for n in qdq.graph.node]
    assert "Identity" not in ops
    assert [n.name for n in qdq.graph.node if n.op_type == "Cast"] == ["output_cast"]  # names the graph output
    quantized = {n.input[0] for n in qdq.graph.node if n.op_type == "QuantizeLinear"}
    assert "h_cast" not in quantized and "h" not in quantized  # Relu's output carries the one quantizer
    producers = {o: n for n in qdq.graph.node for o in n.output}
    weights = [producers[n.input[1]] for n in qdq.graph.node if n.op_type == "MatMul"]
    assert [w.op_type for w in weights] == ["DequantizeLinear", "DequantizeLinear"]
    assert weights[0].input[0] == weights[1].input[0]  # one int8 weight, read by both
    # Both MatMuls read the one quantized weight: onnxruntime runs both as integer kernels.
    feeds = fc.feeds(model, 1)
    assert integer_mac_share(qdq, feeds[0]).share == 1.0
    ref = verification.exact_session(model).run(None, feeds[0])[0]
    got = verification.exact_session(qdq).run(None, feeds[0])[0]
    assert 10 * np.log10(np.sum(ref**2) / np.sum((ref - got) ** 2)) > 25
    assert any("no-op Casts" in r.message for r in result.report.remarks if r.pass_name == "remove-identity")


def test_a_real_cast_stays() -> None:
    model = fc.identity_and_noop_casts()
    model.graph.node[1].attribute[0].i = onnx.TensorProto.FLOAT16  # float -> float16 changes values
    model.graph.node[1].name = "real_cast"
    relu = model.graph.node[2]
    relu.op_type, relu.name = "Cast", "back"
    relu.attribute.append(onnx.helper.make_attribute("to", onnx.TensorProto.FLOAT))
    qdq = _quantize(model).model
    assert {"real_cast", "back"} <= {n.name for n in qdq.graph.node}
