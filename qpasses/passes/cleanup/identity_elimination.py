"""Bypass Identity ops (exporters leave many; they hide patterns from later passes)."""

from __future__ import annotations

from graph_ir import Graph
from qpasses.core.context import PassContext
from qpasses.core.pass_base import Pass, PassResult


class IdentityElimination(Pass):
    name = "remove-identity"
    description = "bypass Identity ops, keeping graph output names"
    preserves_semantics = True

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        removed = []
        for op in [o for o in graph.ops if o.op_type == "Identity" and o.is_standard]:
            src, dst = op.inputs[0], op.outputs[0]
            if graph.is_graph_output(dst):
                # The interface name must stay; only the internal readers can skip the Identity.
                if graph.uses(dst):
                    graph.replace_all_uses(dst, src, graph_outputs=False)
                    self.remarks.missed(
                        "kept Identity feeding a graph output",
                        [op.name],
                        reason="graph output names are part of the interface",
                    )
                continue
            graph.replace_all_uses(dst, src, graph_outputs=False)
            graph.remove_op(op)
            removed.append(op.name)
        if removed:
            self.remarks.applied(f"removed {len(removed)} Identity ops", removed[:10])
        return self.result(bool(removed))
