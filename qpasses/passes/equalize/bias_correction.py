"""Empirical bias correction (Nagel et al. 2019, "Data-Free Quantization", section 4.2).

Quantizing a weight shifts the expected output of its layer by ``(W_q - W) E[x]``: the
rounding errors of a channel rarely cancel. Subtracting that shift from the bias removes
the systematic part of the error. ``E[x]`` is measured per input channel on the
calibration data (the FP32 model): the pass declares the means of the weighted layers' inputs
(``ChannelMeanRequest``, at least ``num_batches`` batches), so they are measured in the read the
pass manager makes for ``calibrate`` (over all of its batches, without the samples calibrate finds
to be outliers in histogram modes), or on demand when the pass runs alone. It runs after
``encode-weights`` (the weight grids must be final) and before ``quantize`` (which derives the
int32 bias grid from the corrected bias). Zero padding is ignored in the mean, as in the paper.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from graph_ir import Graph, Op
from qpasses.core.analyses import Shapes, TopologicalOrder
from qpasses.core.context import PassContext
from qpasses.core.pass_base import Pass, PassResult
from qpasses.data.statistics import ChannelMeanRequest, measure
from qpasses.quant.encodings import Encoding, fake_quantize
from qpasses.quant.plan import QuantPlan, weighted_layer_inputs


def _candidates(graph: Graph) -> list[Op]:
    ops = []
    for op in graph.ops:
        if op.op_type not in ("Conv", "Gemm") or not op.is_standard or len(op.inputs) < 3:
            continue
        w, b = graph.tensors.get(op.inputs[1]), graph.tensors.get(op.inputs[2]) if op.inputs[2] else None
        if w is None or b is None or not isinstance(w.encoding, Encoding) or not b.is_constant:
            continue
        if op.op_type == "Gemm" and (op.attr("transA", 0) or b.shape is None or len(b.shape) != 1):
            continue
        ops.append(op)
    return ops


def output_shift(op: Op, weight: np.ndarray, error: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """Expected output change ``(W_q - W) E[x]`` per output channel."""
    if op.op_type == "Conv":
        groups = op.attr("group", 1)
        cout, cin_g = weight.shape[:2]
        per_tap = error.sum(axis=tuple(range(2, weight.ndim))).reshape(groups, cout // groups, cin_g)
        return np.einsum("goc,gc->go", per_tap, mean.reshape(groups, cin_g)).reshape(cout)
    scale = op.attr("alpha", 1.0) / (op.attr("beta", 1.0) or 1.0)  # Y = alpha A B + beta C
    return scale * (error @ mean if op.attr("transB", 0) else mean @ error)


class BiasCorrection(Pass):
    name = "bias-correction"
    description = "subtract the expected output shift of quantized weights from Conv/Gemm biases"
    uses = (QuantPlan,)
    preserves = (TopologicalOrder, Shapes, QuantPlan)
    modifies_values = True  # the biases

    @dataclass
    class Options:
        num_batches: int = 8  # at least: means measured with calibrate's statistics cover all of its batches
        batch_size: int = 16

    def _request(self, inputs: Sequence[str]) -> ChannelMeanRequest:
        return ChannelMeanRequest(tuple(inputs), batches=self.options.num_batches, batch_size=self.options.batch_size)

    def statistics(self, graph: Graph, ctx: PassContext) -> Sequence[ChannelMeanRequest]:
        # Ahead of encode-weights no weight has its encoding yet: every weighted layer's input may be needed.
        return () if ctx.calibration_data is None else (self._request(weighted_layer_inputs(graph)),)

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        ops = [op for op in _candidates(graph) if graph.tensors[op.inputs[0]].dtype in (0, 1)]
        if not ops:
            self.remarks.missed("no Conv/Gemm with a quantized weight and a constant bias")
            return self.result(False)
        shared = {op.inputs[2] for op in ops if len(graph.uses(op.inputs[2])) > 1}
        ops = [op for op in ops if op.inputs[2] not in shared]
        for name in sorted(shared):
            self.remarks.missed("bias not corrected", [name], reason="the bias is shared by several ops")
        request = self._request([op.inputs[0] for op in ops])
        stats = measure(graph, ctx, [request])
        means = {name: m.mean for name, m in stats[request].items()}
        covered = stats.covered(request)
        source = "calibration" if covered is None else f"{covered} batches"
        corrected = []
        for op in ops:
            mean = means.get(op.inputs[0])
            if mean is None:
                self.remarks.missed("bias not corrected", [op.name], reason="its input could not be measured")
                continue
            w = graph.tensors[op.inputs[1]]
            weight = w.constant_data().astype(np.float64)
            error = fake_quantize(weight, w.encoding).astype(np.float64) - weight
            try:
                shift = output_shift(op, weight, error, mean)
            except ValueError as exc:  # channel counts that do not line up (unusual layouts)
                self.remarks.missed("bias not corrected", [op.name], reason=str(exc))
                continue
            bias = graph.tensors[op.inputs[2]]
            old = bias.constant_data()
            bias.set_data((old.astype(np.float64) - shift).astype(old.dtype))
            corrected.append(op.name)
        if corrected:
            self.remarks.applied(f"corrected {len(corrected)} biases from input means ({source})", corrected[:10])
        return self.result(bool(corrected))
