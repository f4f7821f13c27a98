"""Small models and helpers for the mixed-precision, INT32 and FP16 tests.

The three-Conv model and the two JSON files are the spec's own example ("Mixed Precision and
FP16 Support"): tensor names data_0, conv{1,2,3}_1, conv{i}_w_0 / conv{i}_b_0.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from qpasses.core.verification import exact_session

# The spec's full override: conv1 and conv3 INT8 (8-bit biases too), conv2 FP32.
SPEC_FULL = {
    "activation_encodings": {
        "data_0": [{"bitwidth": 8, "dtype": "int"}],
        "conv1_1": [{"bitwidth": 8, "dtype": "int"}],
        "conv2_1": [{"bitwidth": 32, "dtype": "float"}],
        "conv3_1": [{"bitwidth": 8, "dtype": "int"}],
    },
    "param_encodings": {
        "conv1_w_0": [{"bitwidth": 8, "dtype": "int"}],
        "conv1_b_0": [{"bitwidth": 8, "dtype": "int"}],
        "conv2_w_0": [{"bitwidth": 32, "dtype": "float"}],
        "conv2_b_0": [{"bitwidth": 32, "dtype": "float"}],
        "conv3_w_0": [{"bitwidth": 8, "dtype": "int"}],
        "conv3_b_0": [{"bitwidth": 8, "dtype": "int"}],
    },
}

# The spec's partial override: only conv2 is named; everything else follows the defaults.
SPEC_PARTIAL = {
    "activation_encodings": {"conv2_1": [{"bitwidth": 32, "dtype": "float"}]},
    "param_encodings": {
        "conv2_w_0": [{"bitwidth": 32, "dtype": "float"}],
        "conv2_b_0": [{"bitwidth": 32, "dtype": "float"}],
    },
    "version": "0.5.0",
}


def write_json(path: Path, data: dict) -> Path:
    path.write_text(json.dumps(data))
    return path


def three_convs(seed: int = 0) -> onnx.ModelProto:
    """data_0 -> conv1 -> conv1_1 -> conv2 -> conv2_1 -> conv3 -> conv3_1, 3x3 same-padded Convs."""
    rng = np.random.default_rng(seed)
    nodes, inits, x, c_in = [], [], "data_0", 3
    for i, c_out in enumerate((8, 8, 4), 1):
        w, b, y = f"conv{i}_w_0", f"conv{i}_b_0", f"conv{i}_1"
        inits.append(numpy_helper.from_array((rng.standard_normal((c_out, c_in, 3, 3)) * 0.3).astype(np.float32), w))
        inits.append(numpy_helper.from_array((rng.standard_normal(c_out) * 0.1).astype(np.float32), b))
        nodes.append(helper.make_node("Conv", [x, w, b], [y], name=f"conv{i}", pads=[1, 1, 1, 1]))
        x, c_in = y, c_out
    graph = helper.make_graph(
        nodes,
        "three_convs",
        [helper.make_tensor_value_info("data_0", TensorProto.FLOAT, ["batch", 3, 8, 8])],
        [helper.make_tensor_value_info("conv3_1", TensorProto.FLOAT, ["batch", 4, 8, 8])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def three_conv_feeds(count: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"data_0": rng.standard_normal((2, 3, 8, 8)).astype(np.float32)} for _ in range(count)]


def run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> np.ndarray:
    sess = exact_session(model)
    return sess.run(None, feeds)[0]


def data_path(model: onnx.ModelProto, start: str) -> list[str]:
    """Op types met following input slot 0 from ``start`` to the graph output (a chain model)."""
    by_input = {n.input[0]: n for n in model.graph.node if n.input}
    path, name = [], start
    while name in by_input:
        node = by_input[name]
        path.append(node.op_type)
        name = node.output[0]
    return path


def op_counts(model: onnx.ModelProto) -> Counter[str]:
    return Counter(n.op_type for n in model.graph.node)


def requantizations(model: onnx.ModelProto) -> int:
    """DequantizeLinear -> QuantizeLinear chains (int8<->int16 converts)."""
    producer = {o: n for n in model.graph.node for o in n.output}
    return sum(
        1
        for n in model.graph.node
        if n.op_type == "QuantizeLinear"
        and producer.get(n.input[0]) is not None
        and producer[n.input[0]].op_type == "DequantizeLinear"
    )


def feeding(model: onnx.ModelProto, node_name: str, slot: int) -> tuple[str, int | None]:
    """What feeds an input of a node: ('initializer', dtype), or (producer op type, dtype of its input 0)."""
    node = next(n for n in model.graph.node if n.name == node_name)
    name = node.input[slot]
    inits = {t.name: t for t in model.graph.initializer}
    if name in inits:
        return "initializer", inits[name].data_type
    producer = next(n for n in model.graph.node if name in n.output)
    src = producer.input[0]
    return producer.op_type, inits[src].data_type if src in inits else None


def int32_model(chain: bool = False) -> onnx.ModelProto:
    """x, y -> Relu -> a, b -> Add -> c [-> Relu -> d] -> Relu -> out (INT32 tests)."""
    nodes = [
        helper.make_node("Relu", ["x"], ["a"], name="relu_a"),
        helper.make_node("Relu", ["y"], ["b"], name="relu_b"),
        helper.make_node("Add", ["a", "b"], ["c"], name="add"),
    ]
    last = "c"
    if chain:
        nodes.append(helper.make_node("Relu", ["c"], ["d"], name="relu_d"))
        last = "d"
    nodes.append(helper.make_node("Relu", [last], ["out"], name="relu_out"))
    shape = [1, 2, 4, 4]
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, shape) for n in "xy"]
    graph = helper.make_graph(nodes, "int32", inputs, [helper.make_tensor_value_info("out", TensorProto.FLOAT, shape)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def integer_feeds(count: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """Integer-valued inputs in [0, 255] holding both ends, so 8-bit encodings have scale exactly 1."""
    rng = np.random.default_rng(seed)
    feeds = []
    for _ in range(count):
        x, y = (rng.integers(0, 256, (1, 2, 4, 4)).astype(np.float32) for _ in range(2))
        x.flat[:2], y.flat[:2] = (0, 255), (0, 255)
        feeds.append({"x": x, "y": y})
    return feeds
