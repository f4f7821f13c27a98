"""Small models for the AMP tests (builders only; no tests here).

``sensitive_chain``: conv1 -> relu -> conv2 -> conv3 where only conv2 is sensitive: one huge weight
(on an input channel that is always zero, so it changes no output and no activation range)
makes its per-tensor 8-bit weight grid round every other weight to zero; 16-bit keeps them.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from qpasses.core.verification import exact_session


def _init(name: str, array: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(array.astype(np.float32), name)


def sensitive_chain(seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    w1 = rng.standard_normal((8, 4, 3, 3)) * 0.3
    b1 = rng.standard_normal(8) * 0.1
    w1[7], b1[7] = 0.0, -1.0  # channel 7 of conv1's Relu output is always 0
    w2 = rng.standard_normal((8, 8, 1, 1)) * 0.3
    w2[:, 7] = 1000.0  # the outlier: multiplies that zero channel
    b2 = rng.standard_normal(8) * 0.1
    w3 = rng.standard_normal((4, 8, 1, 1)) * 0.3
    b3 = rng.standard_normal(4) * 0.1
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2"),
        helper.make_node("Conv", ["c2", "w3", "b3"], ["y"], name="conv3"),
    ]
    inits = [_init(n, a) for n, a in (("w1", w1), ("b1", b1), ("w2", w2), ("b2", b2), ("w3", w3), ("b3", b3))]
    graph = helper.make_graph(
        nodes,
        "sensitive",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4, 8, 8])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def chain_feeds(count: int, seed: int = 0, batch: int = 4) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((batch, 4, 8, 8)).astype(np.float32)} for _ in range(count)]


def mixed_ops() -> onnx.ModelProto:
    """Groups to find: input joins conv_a; a weight shared by two Convs; Add+Relu fused; MatMul of activations."""
    rng = np.random.default_rng(1)
    nodes = [
        helper.make_node("Reshape", ["x", "shape"], ["xr"], name="reshape_in"),
        helper.make_node("Conv", ["xr", "wa", "ba"], ["a"], name="conv_a", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["a"], ["ar"], name="relu_a"),
        helper.make_node("MaxPool", ["ar"], ["p"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["p", "ws"], ["s1"], name="conv_s1", pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["p", "ws"], ["s2"], name="conv_s2", pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["s1", "s2"], ["sum"], name="add"),
        helper.make_node("Relu", ["sum"], ["sr"], name="relu_add"),
        helper.make_node("Reshape", ["sr", "shape2"], ["m"], name="reshape_m"),
        helper.make_node("MatMul", ["m", "m_t"], ["mm"], name="matmul_act"),
        helper.make_node("Transpose", ["m"], ["m_t"], name="transpose", perm=[0, 2, 1]),
        helper.make_node("Gemm", ["g_in", "wg", "bg"], ["out"], name="gemm", transB=1),
        helper.make_node("Flatten", ["mm"], ["g_in"], name="flatten"),
    ]
    inits = [
        numpy_helper.from_array(np.array([1, 3, 8, 8], np.int64), "shape"),
        _init("wa", rng.standard_normal((4, 3, 3, 3))),
        _init("ba", rng.standard_normal(4)),
        _init("ws", rng.standard_normal((4, 4, 3, 3))),
        numpy_helper.from_array(np.array([1, 4, 16], np.int64), "shape2"),
        _init("wg", rng.standard_normal((5, 16))),
        _init("bg", rng.standard_normal(5)),
    ]
    # Topologically sorted: the Transpose must come before the MatMul, the Flatten before the Gemm.
    order = [0, 1, 2, 3, 4, 5, 6, 7, 8, 10, 9, 12, 11]
    graph = helper.make_graph(
        [nodes[i] for i in order],
        "mixed_ops",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 192])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 5])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def mixed_feeds(count: int = 4) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(2)
    return [{"x": rng.standard_normal((1, 192)).astype(np.float32)} for _ in range(count)]


def requantizations(model: onnx.ModelProto) -> int:
    """DequantizeLinear -> QuantizeLinear chains: the int8<->int16 conversions (QNN Converts)."""
    producer = {o: n for n in model.graph.node for o in n.output}
    return sum(
        1
        for n in model.graph.node
        if n.op_type == "QuantizeLinear"
        and producer.get(n.input[0]) is not None
        and producer[n.input[0]].op_type == "DequantizeLinear"
    )


def op_counts(model: onnx.ModelProto) -> Counter[str]:
    return Counter(n.op_type for n in model.graph.node)


def run(model: onnx.ModelProto | bytes | str, feed: dict[str, np.ndarray]) -> np.ndarray:
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else model
    return exact_session(source).run(None, feed)[0]
