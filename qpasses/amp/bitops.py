"""BitOps: MACs x activation bits x weight bits, the cost AMP trades against accuracy.

Counted over Conv, ConvTranspose, Gemm *and* MatMul (AIMET counts only Conv and Gemm, which
mis-measures transformer models). A MatMul of two activations counts activation bits twice.
MACs come from ONNX shape inference; a symbolic batch dimension counts as 1, and an op whose
shapes stay unknown counts 0 MACs (listed in ``MacTable.unknown``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from graph_ir import Graph, Op
from qpasses.amp.candidates import Assignment, Candidate, effective_bits
from qpasses.amp.groups import MAC_OPS, GroupPartition
from qpasses.core.analyses import Shapes
from qpasses.core.context import PassContext


def _dims(shape: tuple | None) -> list[int] | None:
    """Concrete dims; a symbolic/unknown dim counts as 1 (the batch), None if the rank is unknown."""
    if shape is None:
        return None
    return [d if isinstance(d, int) and d > 0 else 1 for d in shape]


def op_macs(graph: Graph, op: Op, shapes: Shapes) -> int | None:
    """Multiply-accumulates of one Conv/ConvTranspose/Gemm/MatMul (None when shapes are unknown)."""
    t = op.op_type
    if t in ("Conv", "ConvTranspose"):
        w = _dims(shapes.shape(op.inputs[1]))
        ref = _dims(shapes.shape(op.outputs[0] if t == "Conv" else op.inputs[0]))
        if w is None or ref is None or len(ref) < 2:
            return None
        # Conv: every output pixel of every image uses one (C_in/group x k) slice per output channel = W.size.
        # ConvTranspose: every input pixel scatters through its channel's (C_out/group x k) slice = W.size.
        return ref[0] * math.prod(ref[2:]) * math.prod(w)
    if t == "Gemm":
        a = _dims(shapes.shape(op.inputs[0]))
        y = _dims(shapes.shape(op.outputs[0]))
        if a is None or y is None or len(a) != 2 or len(y) != 2:
            return None
        k = a[0] if op.attr("transA", 0) else a[1]
        return y[0] * y[1] * k
    if t == "MatMul":
        a = _dims(shapes.shape(op.inputs[0]))
        y = _dims(shapes.shape(op.outputs[0]))
        if a is None or y is None or not a:
            return None
        return math.prod(y) * a[-1]
    return None


@dataclass(frozen=True)
class MacTable:
    """MACs per MAC op, which ops multiply two activations, and the ops whose shapes are unknown."""

    macs: Mapping[str, int]
    activation_weights: frozenset[str] = frozenset()
    unknown: tuple[str, ...] = ()
    by_group: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    def group_bitops(self, group: str, candidate: Candidate) -> float:
        """BitOps of one group at one candidate."""
        a = effective_bits(candidate.act)
        total = 0.0
        for op in self.by_group.get(group, ()):
            w = a if op in self.activation_weights else effective_bits(candidate.param)
            total += self.macs[op] * a * w
        return total

    def group_macs(self, group: str) -> int:
        return sum(self.macs[op] for op in self.by_group.get(group, ()))

    def bitops(self, assignment: Assignment) -> float:
        """Total BitOps of an assignment."""
        return sum(self.group_bitops(g, c) for g, c in assignment.items())

    def per_group(self, assignment: Assignment) -> dict[str, float]:
        return {g: self.group_bitops(g, c) for g, c in assignment.items()}


def mac_table(graph: Graph, partition: GroupPartition) -> MacTable:
    """MACs of every MAC op in a group (shape inference once)."""
    shapes = PassContext().get(Shapes, graph)
    ops = {op.name: op for op in graph.ops}
    macs: dict[str, int] = {}
    unknown: list[str] = []
    act_weights: set[str] = set()
    by_group: dict[str, tuple[str, ...]] = {}
    for group in partition:
        names = []
        for name in group.ops:
            op = ops[name]
            if op.op_type not in MAC_OPS:
                continue
            count = op_macs(graph, op, shapes)
            if count is None:
                unknown.append(name)
                count = 0
            macs[name] = count
            names.append(name)
            if len(op.inputs) > 1 and op.inputs[1] and not graph.tensors[op.inputs[1]].is_constant:
                act_weights.add(name)
        by_group[group.name] = tuple(names)
    return MacTable(macs, frozenset(act_weights), tuple(unknown), by_group)
