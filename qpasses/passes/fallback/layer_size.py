"""How big a layer is next to the model: the share of the Conv/Gemm/MatMul weight elements it holds.

Analyses that keep a layer's input or output float let the layer run in float (an op is all-float or
all-integer in onnxruntime); they do that only for a layer whose weight is a small share of the
model's, whose MACs are then a small share too wherever it is applied (a head, a front-end filter).
"""

from __future__ import annotations

import math

from graph_ir import Graph, Op

SMALL_LAYER_SHARE = 0.01  # of the model's Conv/Gemm/MatMul weight elements


def weight_elements(graph: Graph, op: Op) -> int:
    """Elements of a Conv/Gemm/MatMul's constant weight (0: none)."""
    from qpasses.quant.plan import WEIGHTED

    if op.op_type not in WEIGHTED or len(op.inputs) < 2 or not op.inputs[1]:
        return 0
    t = graph.tensors[op.inputs[1]]
    dims = [d for d in (t.shape or ()) if isinstance(d, int)] if t.is_constant else []
    return math.prod(dims) if dims and len(dims) == len(t.shape or ()) else 0


def small_layer(graph: Graph, op: Op, share: float = SMALL_LAYER_SHARE) -> bool:
    """A weighted layer whose weight is under ``share`` of the model's: a few MACs wherever it is applied."""
    own = weight_elements(graph, op)
    return own > 0 and own < share * sum(weight_elements(graph, o) for o in graph.ops)
