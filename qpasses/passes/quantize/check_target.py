"""Pass ``check-target``: report, as missed remarks, every op the target cannot run as annotated."""

from __future__ import annotations

from graph_ir import Graph
from qpasses.core.context import PassContext
from qpasses.core.pass_base import Pass, PassResult
from qpasses.passes.quantize.conformance import check_conformance


class CheckTarget(Pass):
    name = "check-target"
    description = "list ops the target (ctx.target) cannot run with their annotated precisions"

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        if ctx.target is None:
            return self.result(False)
        findings = check_conformance(graph, ctx.target)
        for f in findings:
            self.remarks.missed(f"target {ctx.target.name} cannot run this op as annotated", [f.op], reason=f.reason)
        if not findings:
            self.remarks.analysis(f"every op conforms to target {ctx.target.name}")
        return self.result(False)
