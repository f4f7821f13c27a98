"""Empirical bias correction (Nagel et al. 2019, "Data-Free Quantization", section 4.2).

Quantizing a weight shifts the expected output of its layer by ``(W_q - W) E[x]``: the
rounding errors of a channel rarely cancel. Subtracting that shift from the bias removes
the systematic part of the error. ``E[x]`` is measured per input channel on the
calibration data (the FP32 model; ``calibrate`` leaves the means as an artifact, otherwise
this pass reads ``num_batches`` batches itself), so this runs after ``encode-weights`` (the weight grids
must be final) and before ``quantize`` (which derives the int32 bias grid from the
corrected bias). Zero padding is ignored in the mean, as in the paper.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from graph_ir import Graph, Op
from qpasses.core.analyses import Shapes, TopologicalOrder
from qpasses.core.context import PassContext
from qpasses.core.pass_base import Pass, PassResult
from qpasses.data.tensor_tap import iterate_tensors
from qpasses.passes.quantize.calibrate import LayerInputMeans, calibration_feeds
from qpasses.quant.encodings import Encoding, fake_quantize
from qpasses.quant.plan import QuantPlan
from qpasses.quant.range_statistics import ChannelMeans


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

    @dataclass
    class Options:
        num_batches: int = 8
        batch_size: int = 16

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        ops = [op for op in _candidates(graph) if graph.tensors[op.inputs[0]].dtype in (0, 1)]
        if not ops:
            self.remarks.missed("no Conv/Gemm with a quantized weight and a constant bias")
            return self.result(False)
        shared = {op.inputs[2] for op in ops if len(graph.uses(op.inputs[2])) > 1}
        ops = [op for op in ops if op.inputs[2] not in shared]
        for name in sorted(shared):
            self.remarks.missed("bias not corrected", [name], reason="the bias is shared by several ops")
        inputs = list(dict.fromkeys(op.inputs[0] for op in ops))
        measured = ctx.artifacts.get(LayerInputMeans)
        means: dict[str, np.ndarray] = (
            dict(measured.means) if measured is not None and measured.graph_version == graph.version else {}
        )
        source = "calibration"
        if any(name not in means for name in inputs):
            means.update(self._measure(graph, ctx, [n for n in inputs if n not in means]))
            source = f"{self.options.num_batches} batches"
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

    def _measure(self, graph: Graph, ctx: PassContext, inputs: list[str]) -> dict[str, np.ndarray]:
        """Input means from the calibration data, when calibrate did not leave them."""
        means = {name: ChannelMeans() for name in inputs}
        feeds = calibration_feeds(ctx.calibration_data, graph, self.options.batch_size)
        for batch, values in enumerate(iterate_tensors(graph.to_onnx(), inputs, feeds)):
            for name, value in values.items():
                means[name].update(value)
            if batch + 1 >= self.options.num_batches:
                break
        return {n: m.mean for n, m in means.items() if m.mean is not None}
