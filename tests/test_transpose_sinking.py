"""sink-transposes (+ fold-channel-affine): layout Transposes move below elementwise ops and cancel,
so a bias / batch norm written after them folds into the Conv.

Truth: onnxruntime on the original model (FP32 equivalence), and the graph itself (which ops stay).
"""

from __future__ import annotations

import failure_class_models as fc
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import graph_ir
from qpasses.core.context import PassContext
from qpasses.core.pass_manager import PassManager
from qpasses.core.verification import exact_session
from qpasses.passes.cleanup.transpose_sinking import SinkTransposes
from qpasses.passes.equalize.fold_channel_affine import FoldChannelAffine
from qpasses.quant.config import QuantConfig
from qpasses.quantize import quantize_model


def _run(model: onnx.ModelProto, *passes) -> onnx.ModelProto:  # noqa: ANN002
    graph = graph_ir.load(model)
    PassManager(list(passes), verify="numeric").run(graph, PassContext())
    return graph.to_onnx()


def _same_outputs(a: onnx.ModelProto, b: onnx.ModelProto, feed: dict[str, np.ndarray]) -> None:
    for want, got in zip(exact_session(a).run(None, feed), exact_session(b).run(None, feed), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_layers_become_conv_relu_and_outputs_stay() -> None:
    model = fc.transposed_batchnorm_layers()
    out = _run(model, SinkTransposes(), FoldChannelAffine())
    assert [n.op_type for n in out.graph.node] == ["Conv", "Relu", "Conv", "Relu", "Softmax"]
    assert [o.name for o in out.graph.output] == ["probs"]
    _same_outputs(model, out, fc.feeds(model, 1)[0])


def _one_op(op_type: str, const: np.ndarray, *, const_first: bool = False, perm=(0, 2, 3, 1)) -> onnx.ModelProto:  # noqa: ANN001
    inputs = ["c", "t"] if const_first else ["t", "c"]
    nodes = [
        helper.make_node("Transpose", ["x"], ["t"], name="t", perm=list(perm)),
        helper.make_node(op_type, inputs if op_type not in ("Relu", "Sigmoid") else ["t"], ["y"], name="op"),
        helper.make_node("Relu", ["y"], ["z"], name="after"),
    ]
    inits = [] if op_type in ("Relu", "Sigmoid") else [numpy_helper.from_array(const.astype(np.float32), "c")]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4, 3, 5])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, None)],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


@pytest.mark.parametrize(
    ("op_type", "shape", "const_first"),
    [
        ("Add", (4,), False),  # per channel (last axis after NHWC)
        ("Sub", (4,), True),  # constant first: c - t
        ("Mul", (3, 5, 4), False),  # full rank-3 constant
        ("Div", (1, 1, 5, 1), False),  # rank 4, varies along another axis
        ("Max", (), False),  # scalar
        ("Relu", None, False),
        ("Sigmoid", None, False),
    ],
)
def test_one_elementwise_op_moves_above_the_transpose(op_type, shape, const_first) -> None:  # noqa: ANN001
    const = np.random.default_rng(0).uniform(0.5, 2.0, shape) if shape is not None else np.zeros(())
    model = _one_op(op_type, np.asarray(const), const_first=const_first)
    out = _run(model, SinkTransposes())
    assert [n.op_type for n in out.graph.node] == [op_type, "Relu", "Transpose"]  # the Relu after moves too
    feed = {"x": np.random.default_rng(1).standard_normal((2, 4, 3, 5)).astype(np.float32)}
    _same_outputs(model, out, feed)


def test_transpose_with_two_readers_or_a_growing_constant_stays() -> None:
    model = _one_op("Add", np.ones((2, 2, 3, 5, 4)))  # the constant would grow the output's rank
    out = _run(model, SinkTransposes())
    assert [n.op_type for n in out.graph.node] == ["Transpose", "Add", "Relu"]
    model = _one_op("Add", np.ones(4))
    model.graph.node.append(helper.make_node("Neg", ["t"], ["w"], name="second_reader"))
    model.graph.output.append(helper.make_tensor_value_info("w", TensorProto.FLOAT, None))
    out = _run(model, SinkTransposes())
    assert [n.op_type for n in out.graph.node][:2] == ["Transpose", "Add"]


def test_pairs_that_do_not_cancel_merge() -> None:
    nodes = [
        helper.make_node("Transpose", ["x"], ["a"], name="t1", perm=[0, 2, 3, 1]),
        helper.make_node("Transpose", ["a"], ["y"], name="t2", perm=[0, 2, 1, 3]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4, 3, 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    out = _run(model, SinkTransposes())
    assert [n.op_type for n in out.graph.node] == ["Transpose"]
    feed = {"x": np.random.default_rng(1).standard_normal((2, 4, 3, 5)).astype(np.float32)}
    _same_outputs(model, out, feed)


def test_default_quantization_rounds_each_layer_once_and_returns_float_probabilities() -> None:
    """One quantizer per layer (the Relu output), int32 biases, and the Softmax output float."""
    model = fc.transposed_batchnorm_layers()
    calib = fc.feeds(model, 4)
    result = quantize_model(model, calib, QuantConfig(per_channel=True), progress=False)
    q = result.model
    quantized = [n.input[0] for n in q.graph.node if n.op_type == "QuantizeLinear"]
    inits = {i.name for i in q.graph.initializer}
    activations = [t for t in quantized if t not in inits]
    assert activations == ["x", "h0", "h1"]  # input, then each layer's Relu output (its NCHW name): nothing else
    assert [o.name for o in q.graph.output] == ["probs"]
    assert q.graph.node[-1].op_type == "Softmax"  # the probabilities come out of the Softmax itself
    feed = fc.feeds(model, 1)[0]
    ref = exact_session(model).run(None, feed)[0]
    got = exact_session(q).run(None, feed)[0]
    assert 10 * np.log10(np.sum(ref**2) / np.sum((ref - got) ** 2)) > 30
    assert any(r.pass_name == "keep-output-heads-float" for r in result.report.remarks)
