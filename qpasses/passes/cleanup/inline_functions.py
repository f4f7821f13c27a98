"""Inline model-local functions so the ops inside them can be seen (and quantized) by passes.

Exporters wrap blocks (attention, MLPs...) in FunctionProtos; every pass here works on the
main graph, so a call to a local function would otherwise be an opaque op that stays float.
"""

from __future__ import annotations

import onnx.inliner

from graph_ir import Graph
from qpasses.core.context import PassContext
from qpasses.core.errors import PassError
from qpasses.core.pass_base import Pass, PassResult
from qpasses.passes.cleanup.opset_upgrade import replace_keeping_annotations


class InlineFunctions(Pass):
    name = "inline-functions"
    modifies_values = True  # graph edits: statistics measured before do not hold after
    description = "inline model-local functions into the main graph"
    preserves_semantics = True

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        local = {(f.domain, f.name) for f in graph.shell.functions}
        calls = [op.name for op in graph.ops if (op.domain, op.op_type) in local]
        if not calls:
            return self.result(False)
        try:
            inlined = onnx.inliner.inline_local_functions(graph.to_onnx())
        except Exception as exc:  # the inliner reports malformed functions with bare C++ errors
            raise PassError(f"cannot inline the model-local functions: {exc}") from None
        replace_keeping_annotations(graph, inlined)
        self.remarks.applied(f"inlined {len(calls)} calls of {len(local)} local functions", calls[:10])
        return self.result(True)
