"""Remove ops whose results nobody reads, and weights nobody uses."""

from __future__ import annotations

from graph_ir import Graph
from qpasses.core.context import PassContext
from qpasses.core.pass_base import Pass, PassResult


class DeadCodeElimination(Pass):
    name = "dce"
    modifies_values = True  # graph edits: statistics measured before do not hold after
    description = "remove ops whose outputs are unused and initializers nobody reads"
    preserves_semantics = True

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        ops = graph.remove_dead_ops()
        inits = graph.remove_unused_initializers()
        if ops or inits:
            self.remarks.applied(f"removed {ops} dead ops and {inits} unused initializers")
        return self.result(bool(ops or inits))
