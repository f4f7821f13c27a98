"""fold-channel-affine: constant per-channel Add/Sub/Mul/Div after a Conv join the Conv's weights and bias.

Truth: onnxruntime on the original model (FP32 equivalence) and the ONNX graph itself (which Adds
are gone, which stay, what quantization then sees).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import graph_ir
from qpasses.core.context import PassContext
from qpasses.core.pass_manager import PassManager
from qpasses.core.verification import exact_session
from qpasses.passes.equalize.fold_channel_affine import FoldChannelAffine
from qpasses.quant.config import QuantConfig
from qpasses.quantize import quantize_model

C = 4


def _model(
    bias_shape: tuple[int, ...] | None,
    *,
    conv_bias: bool = False,
    conv_type: str = "Conv",
    extra_reader: bool = False,
    conv_is_output: bool = False,
    bias_first: bool = False,
) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w_shape = (C, 3, 3, 3) if conv_type == "Conv" else (3, C, 3, 3)
    inits = [numpy_helper.from_array(rng.standard_normal(w_shape).astype(np.float32), "w")]
    conv_in = ["x", "w"]
    if conv_bias:
        inits.append(numpy_helper.from_array(rng.standard_normal(C).astype(np.float32), "cb"))
        conv_in.append("cb")
    nodes = [helper.make_node(conv_type, conv_in, ["c"], name="conv", pads=[1, 1, 1, 1])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]
    if bias_shape is not None:
        inits.append(numpy_helper.from_array(3 * rng.standard_normal(bias_shape).astype(np.float32), "b"))
        nodes.append(helper.make_node("Add", ["b", "c"] if bias_first else ["c", "b"], ["y"], name="add"))
    else:
        nodes.append(helper.make_node("Relu", ["c"], ["y"], name="relu"))
    if extra_reader:
        nodes.append(helper.make_node("Relu", ["c"], ["r"], name="other"))
        outputs.append(helper.make_tensor_value_info("r", TensorProto.FLOAT, None))
    if conv_is_output:
        outputs.append(helper.make_tensor_value_info("c", TensorProto.FLOAT, None))
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 8, 8])], outputs, inits
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def _fold(model: onnx.ModelProto) -> onnx.ModelProto:
    graph = graph_ir.load(model)
    PassManager([FoldChannelAffine()], verify="numeric").run(graph, PassContext())
    return graph.to_onnx()


def _feeds() -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(1).standard_normal((2, 3, 8, 8)).astype(np.float32)}


@pytest.mark.parametrize(
    ("bias_shape", "conv_bias", "conv_type", "bias_first"),
    [
        ((1, C, 1, 1), False, "Conv", False),  # paddle2onnx: Add(conv, reshape(b))
        ((C, 1, 1), True, "Conv", True),  # rank-3 constant, existing bias, constant first
        ((1, 1, 1, 1), False, "Conv", False),  # one value for every channel
        ((1, C, 1, 1), False, "ConvTranspose", False),
    ],
)
def test_folds_per_channel_bias_and_keeps_outputs(bias_shape, conv_bias, conv_type, bias_first) -> None:
    model = _model(bias_shape, conv_bias=conv_bias, conv_type=conv_type, bias_first=bias_first)
    folded = _fold(model)
    assert [n.op_type for n in folded.graph.node] == [conv_type]
    assert [o.name for o in folded.graph.output] == ["y"]
    conv = folded.graph.node[0]
    assert conv.output == ["y"] and len(conv.input) == 3
    want = exact_session(model).run(None, _feeds())[0]
    got = exact_session(folded).run(None, _feeds())[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"bias_shape": (1, 1, 8, 8)},  # varies along space, not channels
        {"bias_shape": (2, C, 1, 1)},  # varies along the batch
        {"bias_shape": (1, 1, C, 1, 1)},  # would grow the output's rank
        {"bias_shape": (1, C, 1, 1), "extra_reader": True},  # another op reads the bias-less result
        {"bias_shape": (1, C, 1, 1), "conv_is_output": True},
    ],
)
def test_leaves_other_adds_alone(kwargs) -> None:
    model = _model(**kwargs)
    folded = _fold(model)
    assert "Add" in [n.op_type for n in folded.graph.node]
    for want, got in zip(
        exact_session(model).run(None, _feeds()), exact_session(folded).run(None, _feeds()), strict=True
    ):
        np.testing.assert_allclose(got, want, rtol=1e-6)


def test_quantized_conv_has_one_output_encoding_and_an_int32_bias() -> None:
    """Default quantization: no Q/DQ on the bias-less Conv result, the bias is int32 at s_x * s_w."""
    model = _model((1, C, 1, 1))
    calib = [{"x": np.random.default_rng(i).standard_normal((2, 3, 8, 8)).astype(np.float32)} for i in range(4)]
    q = quantize_model(model, calib, QuantConfig(per_channel=True), progress=False, runtime_check=False).model
    assert "Add" not in [n.op_type for n in q.graph.node]
    quantized = {n.input[0] for n in q.graph.node if n.op_type == "QuantizeLinear"}
    assert "c" not in quantized
    inits = {i.name: numpy_helper.to_array(i) for i in q.graph.initializer}
    conv = next(n for n in q.graph.node if n.op_type == "Conv")
    bias_dq = next(n for n in q.graph.node if n.op_type == "DequantizeLinear" and n.output[0] == conv.input[2])
    assert inits[bias_dq.input[0]].dtype == np.int32


def _affine_model(op_type: str, const: np.ndarray, *, const_first: bool = False) -> onnx.ModelProto:
    model = _model(None, conv_bias=True)
    del model.graph.node[1:]  # Conv only
    model.graph.initializer.append(numpy_helper.from_array(const.astype(np.float32), "k"))
    ins = ["k", "c"] if const_first else ["c", "k"]
    model.graph.node.append(helper.make_node(op_type, ins, ["y"], name="affine"))
    return model


@pytest.mark.parametrize(
    ("op_type", "const_first"),
    [("Sub", False), ("Sub", True), ("Mul", False), ("Mul", True), ("Div", False)],
)
def test_folds_sub_mul_div_into_weights_and_bias(op_type, const_first) -> None:  # noqa: ANN001
    """y = s * conv + t per channel: Sub shifts (c - conv negates), Mul/Div scale weights and bias."""
    const = np.random.default_rng(3).uniform(0.5, 2.0, (1, C, 1, 1)) * np.array([1, -1, 1, -1]).reshape(1, C, 1, 1)
    model = _affine_model(op_type, const, const_first=const_first)
    folded = _fold(model)
    assert [n.op_type for n in folded.graph.node] == ["Conv"]
    assert folded.graph.node[0].output == ["y"]
    want = exact_session(model).run(None, _feeds())[0]
    got = exact_session(folded).run(None, _feeds())[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("op_type", "const", "const_first"),
    [
        ("Div", np.full((1, C, 1, 1), 2.0), True),  # c / conv is not affine in conv
        ("Div", np.array([1.0, 0.0, 1.0, 1.0]).reshape(1, C, 1, 1), False),  # division by zero stays as it is
        ("Mul", np.full((1, C, 8, 8), 2.0), False),  # varies along space
    ],
)
def test_leaves_non_affine_or_non_channel_ops_alone(op_type, const, const_first) -> None:  # noqa: ANN001
    model = _affine_model(op_type, const, const_first=const_first)
    folded = _fold(model)
    assert [n.op_type for n in folded.graph.node] == ["Conv", op_type]
