"""A summary of a model for ``qpasses inspect``: what a quantization engineer checks first."""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

import onnx

from graph_ir import Graph

CONTROL_FLOW = ("If", "Loop", "Scan")
_FLOAT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE)


def inspect_graph(graph: Graph) -> dict[str, Any]:
    ops = graph.ops
    histogram = Counter(op.op_type if not op.domain else f"{op.domain}.{op.op_type}" for op in ops)
    inits = graph.initializers()
    const_nodes = [op for op in ops if op.op_type == "Constant"]
    weights = graph.constants()
    params = sum(math.prod(shape) for t in weights if (shape := t.static_shape) is not None)
    activations = [
        name
        for op in ops
        if op.op_type != "Constant"
        for name in op.outputs
        if name and graph.tensors[name].dtype in (*_FLOAT_TYPES, 0)
    ]
    float_inputs = [n for n in graph.inputs if graph.tensors[n].dtype in _FLOAT_TYPES]
    float_weights = [t.name for t in weights if t.dtype in _FLOAT_TYPES]
    return {
        "ir_version": graph.ir_version,
        "opsets": {(imp.domain or "ai.onnx"): imp.version for imp in graph.shell.opset_import},
        "inputs": [_io(graph, n) for n in graph.inputs],
        "outputs": [_io(graph, n) for n in graph.outputs],
        "num_ops": len(ops),
        "op_histogram": dict(histogram.most_common()),
        "weights": {"initializers": len(inits), "constant_nodes": len(const_nodes), "parameters": params},
        "quantizable_tensors": {
            "activations": len(activations) + len(float_inputs),
            "weights": len(float_weights),
        },
        "control_flow_ops": [
            f"{op.name} ({op.op_type}, captures {len(op.captures)})" for op in ops if op.op_type in CONTROL_FLOW
        ],
        "functions": [f"{f.domain}.{f.name}" for f in graph.shell.functions],
        "already_quantized": any(op.op_type in ("QuantizeLinear", "DequantizeLinear") for op in ops),
    }


def _io(graph: Graph, name: str) -> str:
    t = graph.tensors[name]
    dtype = onnx.TensorProto.DataType.Name(t.dtype) if t.dtype else "?"
    shape = "?" if t.shape is None else "[" + ", ".join("?" if d is None else str(d) for d in t.shape) + "]"
    return f"{name}: {dtype}{shape}"


def format_inspection(info: dict[str, Any]) -> str:
    lines = [
        f"ir_version {info['ir_version']}, opsets " + ", ".join(f"{d} {v}" for d, v in info["opsets"].items()),
        "inputs:  " + "; ".join(info["inputs"]),
        "outputs: " + "; ".join(info["outputs"]),
        f"ops: {info['num_ops']}",
    ]
    lines += [f"  {k:<24} {v}" for k, v in info["op_histogram"].items()]
    w = info["weights"]
    lines.append(
        f"weights: {w['initializers']} initializers, {w['constant_nodes']} Constant nodes, {w['parameters']} parameters"
    )
    q = info["quantizable_tensors"]
    lines.append(f"quantizable tensors: {q['activations']} activations, {q['weights']} weights")
    lines.append("control flow: " + (", ".join(info["control_flow_ops"]) or "none"))
    if info["functions"]:
        lines.append("functions: " + ", ".join(info["functions"]))
    if info["already_quantized"]:
        lines.append("note: the model already contains QuantizeLinear/DequantizeLinear")
    return "\n".join(lines)
