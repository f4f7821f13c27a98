"""A MatMul with a constant weight and the bias Add after it become one Gemm (FP32-exact).

Exporters write a linear layer on a sequence (``x[..., K] @ W[K, N] + b``) as MatMul then Add: the
quantizer then sees two tensors where the layer has one, and rounds twice: the MatMul's output to
8 bits (onnxruntime's QLinearMatMul must write it), then the sum again, with the bias itself an
8-bit constant. As a Gemm the bias is an int32 at the accumulator's scale and the layer has one output
encoding (onnxruntime: one QGemm). Gemm takes 2-D input, so an N-D ``x`` is reshaped to ``[-1, K]``
and the result back (data movement: the reshapes share the encodings of what they move). Measured on
the corpus (output SQNR vs FP32, exact QDQ semantics): khmer_segmenter 39.55 -> 40.73 dB,
dnsmos_p808 45.7 -> 48.0 dB (MOS MAE 0.0100 -> 0.0075), dnsmos 29.7 -> 30.7 dB.

Left as they are: a layer whose result the model returns (``returned_linears``, the walk
``keep-output-heads-float`` makes: it decides those by the MatMul's input rank and weight); an input of
unknown rank or a weight that is not a constant 2-D float tensor.
"""

from __future__ import annotations

import numpy as np

from graph_ir import Graph, Op
from qpasses.core.analyses import Shapes
from qpasses.core.context import PassContext
from qpasses.core.pass_base import Pass, PassResult
from qpasses.passes.equalize.linear_layer import bias_add_of
from qpasses.passes.fallback.output_heads import returned_linears


def _bias_vector(graph: Graph, add: Op, mm_out: str, n: int) -> np.ndarray | None:
    const = next(i for i in add.inputs if i != mm_out)
    value = graph.tensors[const].data
    if value is None or value.dtype != np.float32 or not np.isfinite(value).all():
        return None
    return np.broadcast_to(value.reshape(-1), (n,)).astype(np.float32)


def fold_matmul_biases(graph: Graph, shapes: Shapes) -> list[str]:
    """Rewrite every MatMul + bias Add that qualifies; returns the MatMul names."""
    opset = graph.opset()
    heads = returned_linears(graph)  # keep-output-heads-float's call, on the MatMul as the exporter wrote it
    done = []
    for mm in [op for op in graph.ops if op.op_type == "MatMul" and op.is_standard and len(op.inputs) == 2]:
        add = bias_add_of(graph, mm)
        w = graph.tensors.get(mm.inputs[1])
        weight = w.data if w is not None else None  # decoded once
        if add is None or weight is None or weight.dtype != np.float32 or mm.name in heads:
            continue
        k, n = weight.shape
        x, wname, out = mm.inputs[0], mm.inputs[1], add.outputs[0]
        shape = shapes.shape(x)
        if shape is None or len(shape) < 2:
            continue
        static = all(isinstance(d, int) and d > 0 for d in shape[:-1])
        # Reshape takes its shape as an input from opset 5, Slice its bounds from opset 10.
        if len(shape) > 2 and (opset < 5 or (not static and opset < 10)):
            continue
        bias = _bias_vector(graph, add, mm.outputs[0], n)
        if bias is None:
            continue
        name = mm.name
        graph.remove_op(add)
        graph.remove_op(mm)
        b = graph.add_initializer(graph.unique_name(f"{name}_bias"), bias).name
        if len(shape) == 2:
            graph.add_op("Gemm", [x, wname, b], [out], name=name)
        else:
            flat = graph.add_initializer(graph.unique_name(f"{name}_rows"), np.array([-1, k], np.int64)).name
            x2 = graph.add_op("Reshape", [x, flat], [graph.unique_name(f"{x}_rows")], name=f"{name}_rows").outputs[0]
            y2 = graph.add_op("Gemm", [x2, wname, b], [graph.unique_name(f"{out}_rows")], name=name).outputs[0]
            if static:
                target = np.array([*shape[:-1], n], np.int64)
                back = graph.add_initializer(graph.unique_name(f"{name}_shape"), target).name
            else:
                whole = graph.add_op("Shape", [x], 1, name=f"{name}_shape").outputs[0]
                lo = graph.add_initializer(graph.unique_name(f"{name}_lead_lo"), np.array([0], np.int64)).name
                hi = graph.add_initializer(graph.unique_name(f"{name}_lead_hi"), np.array([-1], np.int64)).name
                lead = graph.add_op("Slice", [whole, lo, hi], 1, name=f"{name}_lead").outputs[0]
                cols = graph.add_initializer(graph.unique_name(f"{name}_cols"), np.array([n], np.int64)).name
                concat = graph.add_op("Concat", [lead, cols], 1, name=f"{name}_out_shape", attributes={"axis": 0})
                back = concat.outputs[0]
            graph.add_op("Reshape", [y2, back], [out], name=f"{name}_back")
        done.append(name)
    return done


class FoldMatMulBias(Pass):
    name = "fold-matmul-bias"
    modifies_values = True  # the bias moves into the Gemm: statistics measured on the MatMul output do not hold
    description = "MatMul with a constant weight + bias Add -> Gemm (reshaped for N-D input): one rounding, int32 bias"
    preserves_semantics = True
    uses = (Shapes,)

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        done = fold_matmul_biases(graph, ctx.get(Shapes, graph))
        if done:
            self.remarks.applied(
                f"folded the bias Add of {len(done)} MatMuls into Gemms",
                done[:10],
                reason="one output encoding and an int32 bias instead of two 8-bit roundings and an 8-bit bias",
            )
        return self.result(bool(done))
