"""Record ONNX shape inference results as value_info on the IR tensors."""

from __future__ import annotations

from graph_ir import Graph
from qpasses.core.analyses import Shapes
from qpasses.core.context import PassContext
from qpasses.core.pass_base import Pass, PassResult


class InferShapes(Pass):
    name = "infer-shapes"
    description = "annotate activations with inferred dtypes and shapes (value_info)"
    uses = (Shapes,)
    preserves_semantics = True

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        shapes = ctx.get(Shapes, graph)
        added = 0
        for name, (dtype, shape) in shapes.types.items():
            t = graph.tensors.get(name)
            if t is None or t.is_constant or name in graph.inputs or name in graph.outputs:
                continue
            if t.value_info is None and dtype:
                t.set_type(dtype, shape)
                added += 1
        if added:
            self.remarks.applied(f"annotated {added} tensors with inferred types")
            graph.touch()
        return self.result(bool(added))
