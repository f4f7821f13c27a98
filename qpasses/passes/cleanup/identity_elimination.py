"""Bypass Identity ops and Casts to the type their input already has (exporters leave many: they hide
patterns from later passes, keep shared weights away from their readers, and each one would get its
own quantizer)."""

from __future__ import annotations

from graph_ir import Graph
from graph_ir.elements import Op
from qpasses.core.analyses import Shapes
from qpasses.core.context import PassContext
from qpasses.core.pass_base import Pass, PassResult


class IdentityElimination(Pass):
    name = "remove-identity"
    modifies_values = True  # graph edits: statistics measured before do not hold after
    description = "bypass Identity ops and no-op Casts, keeping graph output names"
    preserves_semantics = True
    uses = (Shapes,)

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        shapes = ctx.get(Shapes, graph)
        removed = []
        for op in [o for o in graph.ops if o.is_standard and _is_identity(graph, o, shapes)]:
            src, dst = op.inputs[0], op.outputs[0]
            if graph.is_graph_output(dst):
                # The interface name must stay; only the internal readers can skip the op.
                if graph.uses(dst):
                    graph.replace_all_uses(dst, src, graph_outputs=False)
                    self.remarks.missed(
                        f"kept {op.op_type} feeding a graph output",
                        [op.name],
                        reason="graph output names are part of the interface",
                    )
                continue
            graph.replace_all_uses(dst, src, graph_outputs=False)
            graph.remove_op(op)
            removed.append(op.name)
        if removed:
            self.remarks.applied(f"removed {len(removed)} Identity ops and no-op Casts", removed[:10])
        return self.result(bool(removed))


def _is_identity(graph: Graph, op: Op, shapes: Shapes) -> bool:
    if len(op.outputs) != 1 or not op.inputs or not op.inputs[0] or not op.outputs[0]:
        return False
    if op.op_type == "Identity":
        return True
    if op.op_type != "Cast":
        return False
    source = graph.tensors[op.inputs[0]].dtype or shapes.dtype(op.inputs[0])
    return bool(source) and source == op.attr("to")
