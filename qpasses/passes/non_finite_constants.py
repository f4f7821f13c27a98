"""Constants holding -inf/+inf/NaN (attention and detection masks) stay float.

No integer grid holds an infinity: quantizing ``Max(x, -inf)`` or ``Where(mask, x, -inf)`` would
turn the mask into a finite number (or fail), changing what the model computes.
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto

from graph_ir import Graph
from qpasses.context import PassContext
from qpasses.keep_float import FLOAT32, keep_float
from qpasses.pass_base import Pass, PassResult


def non_finite_constants(graph: Graph) -> list[str]:
    names = []
    for name, t in graph.tensors.items():
        if not t.is_constant or t.dtype not in (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE):
            continue
        data = t.data
        if data is not None and data.size and not np.isfinite(data).all():
            names.append(name)
    return names


class KeepNonFiniteFloat(Pass):
    name = "keep-nonfinite-float"
    description = "keep constants with inf/NaN (masks) in float: no integer grid holds them"
    preserves_semantics = True

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        marked = keep_float(graph, non_finite_constants(graph), "non-finite constant", precision=FLOAT32)
        for name in marked:
            readers = ", ".join(f"{op.op_type} '{op.name}'" for op in graph.consumers(name))
            self.remarks.applied("kept float", [name], reason=f"holds inf/NaN (read by {readers}); "
                                 "no integer grid holds it")
        return self.result(False)
