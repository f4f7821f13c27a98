"""Move Transposes below the elementwise ops that read them, and cancel the pairs that meet.

PyTorch exports of TensorFlow-born models (e.g. Yahoo's open_nsfw) wrap every layer in layout
Transposes: ``Conv -> Transpose(NHWC) -> Add(bias) -> Sub/Mul/Add(batch norm) -> Relu ->
Transpose(NCHW)``. The Transpose between the Conv and its per-channel constants keeps them from
folding into the Conv, so the quantizer sees five tensors where the layer has one, each with its own
rounding. Elementwise ops commute with a Transpose (a constant operand is transposed instead), so
this pass rewrites ``op(Transpose(x), c)`` as ``Transpose(op(x, c'))``; once the two Transposes
meet, they cancel (or merge into one). onnxruntime's ``quant_pre_process`` does the same
(TransposeOptimizer). FP32-exact: only constants are permuted.
"""

from __future__ import annotations

import numpy as np

from graph_ir import Graph, Op
from qpasses.core.context import PassContext
from qpasses.core.pass_base import Pass, PassResult

# Ops that act on each element alone (their other inputs broadcast constants or scalar attributes).
ELEMENTWISE_BINARY = ("Add", "Sub", "Mul", "Div", "Max", "Min", "Pow", "PRelu")
ELEMENTWISE_UNARY = (
    "Relu",
    "LeakyRelu",
    "Clip",
    "Sigmoid",
    "HardSigmoid",
    "HardSwish",
    "Tanh",
    "Neg",
    "Abs",
    "Exp",
    "Sqrt",
    "Erf",
    "Elu",
    "Selu",
    "Softplus",
)


def _perm(op: Op) -> list[int] | None:
    perm = op.attr("perm")
    return None if perm is None else [int(p) for p in perm]


def _sinkable(graph: Graph, t: Op) -> Op | None:
    """The elementwise op that alone reads Transpose ``t``'s output, when it can move above ``t``."""
    perm = _perm(t)
    out = t.outputs[0] if t.outputs else ""
    if perm is None or not out or graph.is_graph_output(out) or len(t.inputs) != 1:
        return None
    uses = graph.uses(out)
    if len(uses) != 1 or uses[0][1] < 0:
        return None
    op = uses[0][0]
    if not op.is_standard or len(op.outputs) != 1 or not op.outputs[0]:
        return None
    if op.op_type in ELEMENTWISE_UNARY:
        others = [n for n in op.inputs[1:] if n]  # Clip's min/max: scalars
        if op.inputs[0] != out or any(not _scalar_constant(graph, n) for n in others):
            return None
        return op
    if op.op_type not in ELEMENTWISE_BINARY or len(op.inputs) != 2:
        return None
    for name in op.inputs:
        if name == out:
            continue
        data = graph.tensors[name].data
        if data is None or data.ndim > len(perm) or (op.op_type == "PRelu" and name == op.inputs[0]):
            return None
    return op


def _scalar_constant(graph: Graph, name: str) -> bool:
    data = graph.tensors[name].data  # None unless a constant
    return data is not None and data.size == 1


def _sink(graph: Graph, t: Op, op: Op) -> None:
    """``op(t(x), c)`` -> ``t(op(x, c'))``, keeping ``op``'s output name (its readers, graph outputs)."""
    perm = _perm(t)
    assert perm is not None
    x, moved, result = t.inputs[0], t.outputs[0], op.outputs[0]
    inverse = list(np.argsort(perm))
    inputs: list[str] = []
    replaced: list[str] = []
    for name in op.inputs:
        data = graph.tensors[name].data if name and name != moved and op.op_type in ELEMENTWISE_BINARY else None
        if name == moved:
            inputs.append(x)
        elif data is not None and data.size > 1:  # a scalar broadcasts alike in every layout
            full = data.reshape((1,) * (len(perm) - data.ndim) + data.shape).transpose(inverse)
            inputs.append(graph.add_initializer(graph.unique_name(f"{name}_transposed"), full).name)
            replaced.append(name)
        else:
            inputs.append(name)
    attributes = dict(op.attributes)
    op_type, name = op.op_type, op.name
    graph.remove_op(op)
    graph.remove_op(t)
    inner_out = graph.unique_name(f"{result}_untransposed")
    inner = graph.add_op(op_type, inputs, [inner_out], name=name, attributes=attributes)
    graph.add_op("Transpose", inner.outputs, [result], name=t.name, attributes={"perm": perm})
    for name in replaced:  # the constant in the old layout, unless something else reads it
        if graph.tensors[name].initializer is not None and not graph.uses(name) and not graph.is_graph_output(name):
            graph.remove_tensor(name)


def _merge(graph: Graph, first: Op, second: Op) -> bool:
    """Transpose ``second`` reading Transpose ``first``: cancel the pair (identity) or merge it."""
    p1, p2 = _perm(first), _perm(second)
    if p1 is None or p2 is None or len(p1) != len(p2):
        return False
    combined = [p1[k] for k in p2]
    out = second.outputs[0]
    identity = combined == list(range(len(combined)))
    if identity and graph.is_graph_output(out):
        return False  # the output name is the interface: one Transpose stays to write it
    source = first.inputs[0]
    if identity:
        graph.replace_all_uses(out, source, graph_outputs=False)
        graph.remove_op(second)
    else:
        name = second.name
        graph.remove_op(second)
        graph.add_op("Transpose", [source], [out], name=name, attributes={"perm": combined})
    if not graph.uses(first.outputs[0]) and not graph.is_graph_output(first.outputs[0]):
        graph.remove_op(first)
    internal = graph.producer(source) is not None and not graph.is_graph_output(source)
    if identity and internal and source not in graph.inputs:
        # The source holds the model's tensor ``out`` (same values, same layout): it takes its name, so
        # encodings and overrides name tensors of the original model.
        graph.rename_tensor(source, out)
    return True


def sink_transposes(graph: Graph) -> tuple[int, int]:
    """Sink every Transpose as far as elementwise ops allow; (ops moved above a Transpose, pairs merged)."""
    moved = merged = 0
    changed = True
    while changed:
        changed = False
        gone: set[int] = set()
        for t in [op for op in graph.topological_order() if op.op_type == "Transpose" and op.is_standard]:
            if t.id in gone or not t.outputs:
                continue
            readers = [op for op, slot in graph.uses(t.outputs[0]) if slot >= 0]
            if len(readers) == 1 and readers[0].op_type == "Transpose" and readers[0].is_standard:
                if _merge(graph, t, readers[0]):
                    gone |= {t.id, readers[0].id}
                    merged += 1
                    changed = True
                continue
            op = _sinkable(graph, t)
            if op is not None:
                _sink(graph, t, op)
                gone |= {t.id, op.id}
                moved += 1
                changed = True
    return moved, merged


class SinkTransposes(Pass):
    name = "sink-transposes"
    modifies_values = True  # graph edits: statistics measured before do not hold after
    description = "move Transposes below elementwise ops (transposing their constants) and cancel pairs that meet"
    preserves_semantics = True

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        moved, merged = sink_transposes(graph)
        if moved or merged:
            self.remarks.applied(
                f"moved {moved} elementwise ops above their Transpose; {merged} Transpose pairs cancelled or merged"
            )
        return self.result(bool(moved or merged))
