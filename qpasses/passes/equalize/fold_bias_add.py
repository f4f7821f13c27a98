"""Fold a constant per-channel Add after a Conv/ConvTranspose into the layer's bias.

Exporters (paddle2onnx, some TF converters) write ``Conv(x, W)`` and add the bias with a separate
``Add(conv, reshape(b))``. Left apart, the quantizer sees two tensors where the model has one: the
bias-less conv output gets its own 8-bit encoding (a second rounding, on a range shifted by the
bias) and the bias becomes an 8-bit per-tensor constant instead of an int32 bias at the
accumulator's scale. onnxruntime's ``quant_pre_process`` folds the pair (``ConvAddFusion``);
this pass does the same, before batch-norm folding so a following BN folds too.
"""

from __future__ import annotations

import numpy as np

from graph_ir import Graph, Op
from qpasses.core.context import PassContext
from qpasses.core.pass_base import Pass, PassResult
from qpasses.passes.equalize.linear_layer import LayerError, LinearLayer

CONV_TYPES = ("Conv", "ConvTranspose")


def _channel_vector(array: np.ndarray, rank: int, channels: int) -> np.ndarray | None:
    """``array`` as a [channels] vector when, broadcast against a rank-``rank`` NC... tensor, it
    varies along axis 1 only and does not grow the output; else None."""
    if array.ndim > rank:
        return None
    shape = (1,) * (rank - array.ndim) + tuple(array.shape)
    if any(d != 1 for i, d in enumerate(shape) if i != 1) or shape[1] not in (1, channels):
        return None
    return np.broadcast_to(array.reshape(-1).astype(np.float64), (channels,)).copy()


def _bias_of(graph: Graph, add: Op) -> tuple[LinearLayer, np.ndarray] | None:
    """(the Conv as a layer, [C] bias) when ``add`` adds a constant per-channel vector to a Conv only it reads."""
    if add.op_type != "Add" or not add.is_standard or len(add.inputs) != 2:
        return None
    for data, const in (add.inputs, add.inputs[::-1]):
        conv = graph.producer(data)
        t = graph.tensors.get(const)
        if conv is None or conv.op_type not in CONV_TYPES or not conv.is_standard or t is None or not t.is_constant:
            continue
        bias = t.data  # decoded once: ``data`` reads the initializer on every access
        if bias is None or not np.issubdtype(bias.dtype, np.floating):
            continue
        if len(graph.uses(data)) != 1 or graph.is_graph_output(data):
            return None
        w = graph.tensors.get(conv.inputs[1]) if len(conv.inputs) > 1 else None
        weight = w.data if w is not None and w.is_constant else None
        if weight is None or weight.dtype != bias.dtype:
            return None
        try:
            layer = LinearLayer.load(graph, conv)
        except LayerError:
            return None
        vec = _channel_vector(bias, weight.ndim, layer.out_channels)
        return None if vec is None else (layer, vec)
    return None


def fold_bias_adds(graph: Graph) -> list[str]:
    """Fold every foldable bias Add; the names of the Adds removed."""
    folded = []
    for add in [op for op in graph.topological_order() if op.op_type == "Add"]:
        found = _bias_of(graph, add)
        if found is None:
            continue
        layer, vec = found
        layer.bias = layer.bias + vec
        layer.bias_dirty = True
        layer.commit()
        out = add.outputs[0]
        graph.remove_op(add)
        graph.set_output(layer.op, 0, out)  # the Conv now writes the Add's result (its name, its readers)
        folded.append(add.name)
    return folded


class FoldBiasAdd(Pass):
    name = "fold-bias-add"
    modifies_values = True  # folded biases (graph edits): statistics measured before do not hold after
    description = "fold a constant per-channel Add after Conv/ConvTranspose into the layer's bias"
    preserves_semantics = True

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        folded = fold_bias_adds(graph)
        if folded:
            self.remarks.applied(f"folded {len(folded)} bias Adds into their Conv", folded[:10])
        return self.result(bool(folded))
