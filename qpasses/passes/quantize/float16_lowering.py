"""Make the ops annotated float16 actually run in float16 in the ONNX model.

Which inputs and outputs change type is read from the ONNX op schemas (the inputs bound to a
type parameter that allows float16 and the outputs bound to the same parameter), so ops like
Resize keep their float32 ``scales`` and Shape keeps its int64 output. Constants of float16 ops
are stored as float16; activations crossing between float16 and float32 ops get a Cast. Graph
inputs and outputs keep their float32 type, so the model's interface does not change.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto

from graph_ir import Graph, Op
from qpasses.quant.precision_type import FLOAT16 as FP16_PRECISION
from qpasses.targets.quantizable_ops import op_precision

FLOAT, FLOAT16 = TensorProto.FLOAT, TensorProto.FLOAT16
_QDQ = ("QuantizeLinear", "DequantizeLinear")


@dataclass
class Float16Report:
    ops: list[str] = field(default_factory=list)
    casts: int = 0
    constants: int = 0


def _schema(op: Op, opset: int) -> onnx.defs.OpSchema | None:
    try:
        return onnx.defs.get_schema(op.op_type, opset, op.domain)
    except onnx.defs.SchemaError:
        return None


def _formal(
    params: Sequence[onnx.defs.OpSchema.FormalParameter],
    index: int,
) -> onnx.defs.OpSchema.FormalParameter | None:
    if index < len(params):
        return params[index]
    if params and params[-1].option == onnx.defs.OpSchema.FormalParameterOption.Variadic:
        return params[-1]
    return None


def _typed_slots(op: Op, schema: onnx.defs.OpSchema) -> tuple[set[int], set[int]]:
    """(input slots, output indices) whose type parameter allows float16 and is shared by both."""
    allowed = {c.type_param_str: set(c.allowed_type_strs) for c in schema.type_constraints}
    half = {p for p, types in allowed.items() if "tensor(float16)" in types}
    formal_ins = {i: f for i in range(len(op.inputs)) if (f := _formal(schema.inputs, i)) is not None}
    ins = {i for i, f in formal_ins.items() if f.type_str in half}
    bound = {formal_ins[i].type_str for i in ins}
    outs = {i for i in range(len(op.outputs)) if (f := _formal(schema.outputs, i)) is not None and f.type_str in bound}
    return ins, outs


def lower_float16(graph: Graph, dtype_of: dict[str, int]) -> Float16Report:
    """Rewrite types for every op whose precision is float16. ``dtype_of``: current element types."""
    report = Float16Report()
    opset = graph.opset()
    plans: dict[int, tuple[set[int], set[int]]] = {}
    for op in graph.ops:
        if op.op_type in _QDQ or op_precision(graph, op) != FP16_PRECISION or (op.may_have_subgraphs and op.subgraphs):
            continue  # control flow keeps float32: its bodies are typed separately
        schema = _schema(op, opset)
        if schema is None:
            continue
        ins, outs = _typed_slots(op, schema)
        if op.op_type == "Cast" and op.attr("to") == FLOAT:
            op.set_attr("to", FLOAT16)
            outs = {0}
        ins = {i for i in ins if op.inputs[i] and dtype_of.get(op.inputs[i]) in (FLOAT, FLOAT16)}
        if op.op_type != "Cast" and not ins:
            continue
        plans[op.id] = (ins, outs)
        report.ops.append(op.name)
    if not plans:
        return report
    types = dict(dtype_of)
    for op_id, (_, outs) in plans.items():
        op = graph.op_by_id(op_id)
        for i in outs:
            if op.outputs[i] and types.get(op.outputs[i]) in (FLOAT, FLOAT16, None):
                types[op.outputs[i]] = FLOAT16
    _keep_float_outputs(graph, types, report)
    casts: dict[tuple[str, int], str] = {}
    replaced: set[str] = set()
    for op in list(graph.ops):
        plan = plans.get(op.id)
        if plan is None and op.op_type == "Cast":
            continue  # a Cast reads any type
        for slot, name in enumerate(op.inputs):
            if not name:
                continue
            want = FLOAT16 if plan is not None and slot in plan[0] else FLOAT
            have = types.get(name)
            if have not in (FLOAT, FLOAT16) or have == want:
                continue
            t = graph.tensors[name]
            if t.is_constant and want == FLOAT16:
                in_place = name not in graph.inputs and all(
                    r.id in plans and s in plans[r.id][0] for r, s in graph.uses(name)
                )
                new = _half_constant(graph, name, casts, in_place)
                replaced.add(name)
                report.constants += 1
            else:
                new = _cast(graph, name, want, casts)
            types[new] = want
            graph.set_input(op, slot, new)
        for name in list(op.captures):
            if types.get(name) == FLOAT16:  # a subgraph reads an outer float16 tensor: it expects float32
                new = _cast(graph, name, FLOAT, casts)
                types[new] = FLOAT
                graph.replace_use(op, -1 - op.captures.index(name), new)
    report.casts += sum(1 for _, to in casts if to in (FLOAT, FLOAT16))
    for name, elem in types.items():
        out = graph.tensors.get(name)
        if elem == FLOAT16 and out is not None and not out.is_constant and name not in graph.outputs:
            out.set_type(FLOAT16, out.shape)
    for name in replaced:
        if (
            name in graph.tensors
            and not graph.uses(name)
            and graph.tensors[name].initializer is not None
            and name not in graph.inputs
            and not graph.is_graph_output(name)
        ):
            graph.remove_tensor(name)
    graph.remove_dead_ops()
    return report


def _keep_float_outputs(graph: Graph, types: dict[str, int], report: Float16Report) -> None:
    """A graph output computed in float16 is renamed; a Cast writes the float32 original name."""
    for name in list(graph.outputs):
        if types.get(name) != FLOAT16:
            continue
        value_info = graph.tensors[name].value_info
        inner = graph.rename_tensor(name, graph.unique_name(f"{name}_fp16")).name
        graph.outputs = [name if o == inner else o for o in graph.outputs]
        graph.add_op("Cast", [inner], [name], name=f"{name}_Cast_float", attributes={"to": FLOAT})
        graph.tensors[name].value_info = value_info
        types[inner], types[name] = FLOAT16, FLOAT
        report.casts += 1


def _cast(graph: Graph, name: str, to: int, cache: dict[tuple[str, int], str]) -> str:
    key = (name, to)
    if key not in cache:
        suffix = "fp16" if to == FLOAT16 else "fp32"
        op = graph.add_op(
            "Cast", [name], [graph.unique_name(f"{name}_{suffix}")], name=f"{name}_Cast_{suffix}", attributes={"to": to}
        )
        cache[key] = op.outputs[0]
    return cache[key]


def _half_constant(graph: Graph, name: str, cache: dict[tuple[str, int], str], in_place: bool) -> str:
    """Float16 data for a constant: in place (keeping its name) when only float16 ops read it."""
    key = (name, -FLOAT16)
    if key not in cache:
        data = np.asarray(graph.tensors[name].data, dtype=np.float32).astype(np.float16)
        if in_place:
            graph.tensors[name].set_data(data)
            cache[key] = name
        else:
            cache[key] = graph.add_initializer(graph.unique_name(f"{name}_fp16"), data).name
    return cache[key]
