"""Fold constant per-channel Add/Sub/Mul/Div after a Conv/ConvTranspose into the layer.

Exporters write parts of a layer as separate ops: paddle2onnx adds each Conv bias with an ``Add``;
exports of TensorFlow models write batch norm as ``Sub(mean) -> Mul(gamma/std) -> Add(beta)``
(open_nsfw, once ``sink-transposes`` has moved its layout Transposes out of the way). Left apart,
the quantizer sees a tensor per op where the model has one: each gets its own 8-bit encoding (a
rounding each, on ranges shifted by the constants) and the constants become 8-bit tensors instead
of an int32 bias at the accumulator's scale. onnxruntime's ``quant_pre_process`` folds the bias Add
(``ConvAddFusion``) but not the Sub/Mul; this pass folds all four (``y = s * conv + t`` scales the
output channel's weights and bias by ``s`` and adds ``t``), before batch-norm folding so a following
BN folds too.
"""

from __future__ import annotations

import numpy as np

from graph_ir import Graph, Op
from qpasses.core.context import PassContext
from qpasses.core.pass_base import Pass, PassResult
from qpasses.passes.equalize.linear_layer import LayerError, LinearLayer

CONV_TYPES = ("Conv", "ConvTranspose")
AFFINE_TYPES = ("Add", "Sub", "Mul", "Div")


def _channel_vector(array: np.ndarray, rank: int, channels: int) -> np.ndarray | None:
    """``array`` as a [channels] vector when, broadcast against a rank-``rank`` NC... tensor, it
    varies along axis 1 only and does not grow the output; else None."""
    if array.ndim > rank:
        return None
    shape = (1,) * (rank - array.ndim) + tuple(array.shape)
    if any(d != 1 for i, d in enumerate(shape) if i != 1) or shape[1] not in (1, channels):
        return None
    return np.broadcast_to(array.reshape(-1).astype(np.float64), (channels,)).copy()


def _affine_of(graph: Graph, op: Op) -> tuple[LinearLayer, np.ndarray, np.ndarray] | None:
    """(the Conv as a layer, scale, shift): ``op`` computes ``scale * conv + shift`` per output channel
    from a Conv only it reads and a constant; None when it does not."""
    if op.op_type not in AFFINE_TYPES or not op.is_standard or len(op.inputs) != 2:
        return None
    for slot, (data, const) in enumerate((op.inputs, op.inputs[::-1])):
        conv = graph.producer(data)
        t = graph.tensors.get(const)
        if conv is None or conv.op_type not in CONV_TYPES or not conv.is_standard or t is None or not t.is_constant:
            continue
        value = t.data  # decoded once: ``data`` reads the initializer on every access
        if value is None or not np.issubdtype(value.dtype, np.floating) or not np.isfinite(value).all():
            continue
        if len(graph.uses(data)) != 1 or graph.is_graph_output(data):
            return None
        w = graph.tensors.get(conv.inputs[1]) if len(conv.inputs) > 1 else None
        weight = w.data if w is not None and w.is_constant else None
        if weight is None or weight.dtype != value.dtype:
            return None
        try:
            layer = LinearLayer.load(graph, conv)
        except LayerError:
            return None
        vec = _channel_vector(value, weight.ndim, layer.out_channels)
        if vec is None:
            return None
        ones, zeros = np.ones_like(vec), np.zeros_like(vec)
        conv_first = slot == 0
        if op.op_type == "Add":
            return layer, ones, vec
        if op.op_type == "Sub":
            return (layer, ones, -vec) if conv_first else (layer, -ones, vec)
        if op.op_type == "Mul":
            return layer, vec, zeros
        if conv_first and (vec != 0).all():  # Div(conv, c); c / conv is not affine
            return layer, 1.0 / vec, zeros
        return None
    return None


def fold_channel_affines(graph: Graph) -> list[tuple[str, str]]:
    """Fold every foldable constant Add/Sub/Mul/Div into its Conv; (op type, name) of the ops removed."""
    folded = []
    for op in [o for o in graph.topological_order() if o.op_type in AFFINE_TYPES]:
        found = _affine_of(graph, op)
        if found is None:
            continue
        layer, scale, shift = found
        if not (scale == 1).all():
            layer.scale_out(scale)
        layer.bias = layer.bias + shift
        layer.bias_dirty = True
        layer.commit()
        out = op.outputs[0]
        graph.remove_op(op)
        graph.set_output(layer.op, 0, out)  # the Conv now writes the op's result (its name, its readers)
        folded.append((op.op_type, op.name))
    return folded


class FoldChannelAffine(Pass):
    name = "fold-channel-affine"
    modifies_values = True  # folded weights and biases (graph edits): statistics measured before do not hold after
    description = "fold constant per-channel Add/Sub/Mul/Div after Conv/ConvTranspose into its weights and bias"
    preserves_semantics = True

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        folded = fold_channel_affines(graph)
        if folded:
            kinds = "/".join(sorted({kind for kind, _ in folded}))
            names = [name for _, name in folded]
            self.remarks.applied(f"folded {len(folded)} per-channel {kinds} ops into their Conv", names[:10])
        return self.result(bool(folded))
