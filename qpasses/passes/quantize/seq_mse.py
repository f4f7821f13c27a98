"""SeqMSE: choose each weight channel's range by the error it causes in the layer's output.

Min-max weight encodings spend the grid on each channel's largest weight; at 4 bits clipping a
few outliers usually lowers the layer's output error far more than it costs. For each
Conv/ConvTranspose/Gemm/MatMul with a constant weight, in topological order, the candidates
``k/N x`` the symmetric min-max range (k = 1..N; k = N *is* min-max, so the result is never worse
than min-max on the data) are scored by the loss between the FP32 output and the output with
fake-quantized weights, summed per output channel over the calibration batches. Each channel
keeps its best candidate and the encoding is frozen (``meta["encoding_source"] = "seq-mse"``,
which ``encode-weights`` leaves alone).

Layer inputs (AIMET's ``inp_symmetry``): ``symqt`` feeds both sides what the model computes with
the already-frozen weights fake-quantized (activations stay float, as in AIMET); ``symfp`` feeds
both sides the FP32 inputs; ``asym`` compares the FP32 output on FP32 inputs with the quantized
output on quantized inputs. onnxruntime only *captures* inputs: once per layer (once per run of
layers that do not feed each other), or once in all for FP32 inputs. The FP32 inputs and the feeds
themselves are a ``CaptureRequest`` the pass declares: the pass manager captures them in the read it
makes for the passes around on the same values (seq-mse only annotates weights, so calibrate sees
the same ones). Candidates are then scored in numpy, vectorised over candidates and channels, instead
of AIMET's onnxruntime run of a cut out layer per candidate.
"""

from __future__ import annotations

import itertools
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final

import numpy as np
from onnx import TensorProto
from tqdm import tqdm

from graph_ir import Graph, Op
from qpasses.core.analyses import ConstantData, Shapes, TopologicalOrder
from qpasses.core.context import PassContext
from qpasses.core.errors import EncodingError, PassError
from qpasses.core.pass_base import Pass, PassResult
from qpasses.data.sessions import unavailable_tensors
from qpasses.data.statistics import CaptureRequest, capture, measure
from qpasses.data.weight_swap import SwappedWeights
from qpasses.passes.quantize.layer_kernels import Unsupported, constant_bias, make_kernel
from qpasses.passes.quantize.seq_mse_search import Layer, LayerResult, SeqMseResults, search_layer, upstream_layers
from qpasses.quant.encodings import Encoding, fake_quantize, validate_bitwidth
from qpasses.quant.plan import QuantPlan, WeightSpec
from qpasses.quant.precision_type import tensor_precision

SYMMETRIES: Final = ("asym", "symfp", "symqt")
LOSSES: Final = ("mse", "l1", "sqnr")
SUPPORTED: Final = ("Conv", "ConvTranspose", "Gemm", "MatMul")

_EPS: Final = 1e-20


# --- the pass ---------------------------------------------------------------------------------------


class SeqMSE(Pass):
    name = "seq-mse"
    description = "SeqMSE: per-channel weight ranges searched layer by layer on calibration data"
    uses = (QuantPlan,)
    preserves = (TopologicalOrder, Shapes, ConstantData, QuantPlan)

    @dataclass
    class Options:
        num_batches: int = 4
        num_candidates: int = 20
        # AIMET defaults to symqt; asym measured better on every model here (+6.6 dB W4A8 on
        # digits_cnn where symqt lost 2.4 dB: per-layer greedy search can't see cross-layer
        # error cancellation, while asym compares against the FP32 output and compensates).
        inp_symmetry: str = "asym"
        loss_fn: str = "mse"
        exclude: list[str] = field(default_factory=list)
        weight_bw: int = 8
        per_channel: bool = True
        batch_size: int = 16
        progress: bool = True

    def _check_options(self) -> None:
        o = self.options
        if o.inp_symmetry not in SYMMETRIES:
            raise PassError(
                f"pass 'seq-mse': unknown inp_symmetry {o.inp_symmetry!r} (expected one of {', '.join(SYMMETRIES)})"
            )
        if o.loss_fn not in LOSSES:
            raise PassError(f"pass 'seq-mse': unknown loss_fn {o.loss_fn!r} (expected one of {', '.join(LOSSES)})")
        for key in ("num_batches", "num_candidates", "batch_size"):
            if getattr(o, key) < 1:
                raise PassError(f"pass 'seq-mse': {key} must be >= 1, got {getattr(o, key)}")
        validate_bitwidth(o.weight_bw, "weight")

    def _capture(self, graph: Graph, names: Sequence[str]) -> CaptureRequest:
        """The first ``num_batches`` batches of ``names`` and of the graph inputs (the feeds of the quantized model)."""
        o = self.options
        feeds = [n for n in graph.inputs if not graph.tensors[n].is_constant]
        return CaptureRequest((*feeds, *names), batches=o.num_batches, batch_size=o.batch_size)

    def _declared(self, graph: Graph) -> CaptureRequest:
        """Ahead of annotate-precision: the input of every layer that could be searched (FP32 inputs only)."""
        inputs: list[str] = []
        if self.options.inp_symmetry != "symqt":
            for op in graph.ops:
                if op.op_type in SUPPORTED and op.is_standard and len(op.inputs) > 1 and op.inputs[0]:
                    w = graph.tensors.get(op.inputs[1])
                    if w is not None and w.is_constant and w.dtype == TensorProto.FLOAT:
                        inputs.append(op.inputs[0])
        return self._capture(graph, inputs)

    def statistics(self, graph: Graph, ctx: PassContext) -> Sequence[CaptureRequest]:
        return () if ctx.calibration_data is None else (self._declared(graph),)

    def _layers(self, graph: Graph, order: Sequence[Op], weights: dict[str, WeightSpec]) -> list[Layer]:
        """Supported ops in topological order; the others get a 'missed' remark saying why."""
        o = self.options
        excluded = set(o.exclude)
        unknown = excluded - {op.name for op in order}
        if unknown:
            self.remarks.missed("excluded ops not found", sorted(unknown), reason="no op of that name")
        layers: list[Layer] = []
        for op in order:
            if op.op_type not in SUPPORTED or not op.is_standard or len(op.inputs) < 2:
                continue
            name = op.inputs[1]
            spec = weights.get(name)
            if spec is None:
                continue  # no constant float weight: nothing to encode
            t = graph.tensors[name]
            precision = tensor_precision(t)  # annotate-precision / precision overrides
            bits = precision.bitwidth if precision is not None and not precision.is_float else o.weight_bw
            reason = ""
            if op.name in excluded:
                reason = "excluded by the exclude option"
            elif spec.op != op.name:
                reason = f"weight '{name}' is shared; it is searched for {spec.op}"
            elif spec.axis is None:
                reason = f"weight '{name}' is shared by layers with different output-channel axes"
            elif t.meta.get("encoding_source") == "override":
                reason = "weight encoding given by the overrides file"
            elif precision is not None and precision.is_float:
                reason = f"the weight is annotated {precision}"
            elif not 4 <= bits <= 16:
                reason = f"{bits}-bit weights are outside SeqMSE's 4-16 bit grids"
            elif not op.inputs[0]:
                reason = "no data input"
            elif any(c.op_type == "BatchNormalization" for out in op.outputs[:1] for c in graph.consumers(out)):
                # Folding it later would rescale the weight under the frozen encoding.
                reason = "a BatchNormalization follows: run fold-batchnorm before seq-mse"
            if reason or spec.axis is None:  # an axis of None has its reason above
                self.remarks.missed("not searched", [op.name], reason=reason)
                continue
            data = np.asarray(t.data)
            try:
                kernel = make_kernel(op, data.shape)
            except Unsupported as exc:
                self.remarks.missed("not searched", [op.name], reason=f"unsupported {op.op_type}: {exc}")
                continue
            bias = constant_bias(graph, op, data.shape, kernel)
            layers.append(Layer(op.name, op.op_type, op.inputs[0], name, data, bias, kernel, spec.axis, bits))
        return layers

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        self._check_options()
        o = self.options
        plan = ctx.get(QuantPlan, graph).plan
        target = ctx.target
        per_channel = o.per_channel and (target is None or getattr(target, "per_channel_weights", True))
        if o.per_channel and not per_channel:
            self.remarks.missed("per-channel search disabled", reason=f"target {target.name} is per-tensor only")
        order = ctx.get(TopologicalOrder, graph).order
        layers = self._layers(graph, order, plan.weights)
        if not layers:
            self.remarks.analysis("no supported layers to search")
            return self.result(False)

        model = graph.to_onnx()
        missing = unavailable_tensors(model, [layer.input for layer in layers])
        for layer in [la for la in layers if la.input in missing]:
            self.remarks.missed("not searched", [layer.op], reason=f"input '{layer.input}' is {missing[layer.input]}")
        layers = [la for la in layers if la.input not in missing]
        if not layers:
            return self.result(False)

        symmetry = o.inp_symmetry
        # FP32 inputs do not depend on any choice: one capture for all, with the feeds (taken: freed as used).
        need = self._capture(graph, [la.input for la in layers] if symmetry != "symqt" else [])
        stats = measure(graph, ctx, [need])
        fp = stats.take(need)
        stats.take(self._declared(graph))  # what was captured ahead for layers not searched
        inputs = [n for n in graph.inputs if n in fp]
        feeds = [{n: fp[n][b] for n in inputs} for b in range(len(fp[inputs[0]]) if inputs else 0)]
        quantized = SwappedWeights(model) if symmetry != "symfp" else None
        if quantized is not None:
            # Weights with overridden encodings are already decided: the quantized model uses them.
            for name in plan.weights:
                t = graph.tensors[name]
                if t.meta.get("encoding_source") == "override" and isinstance(t.encoding, Encoding):
                    try:
                        quantized.set(name, fake_quantize(np.asarray(t.data, np.float32), t.encoding))
                    except EncodingError:
                        pass  # a layout mismatch is reported by the lowering, not here
        last_use = {la.input: i for i, la in enumerate(layers)}
        masks = upstream_layers(graph, order, layers)

        results: dict[str, LayerResult] = {}
        bar = tqdm(
            total=len(layers), desc="seq-mse", unit="layer", file=sys.stderr, disable=not o.progress, leave=False
        )
        try:
            start = 0
            while start < len(layers):
                # Layers whose inputs do not depend on the not-yet-frozen ones share one capture.
                stop = start + 1
                while stop < len(layers) and not masks.get(layers[stop].input, 0) & ((1 << stop) - (1 << start)):
                    stop += 1
                group = layers[start:stop]
                captured: dict[str, list[np.ndarray]] = {}
                if quantized is not None:
                    captured = capture(quantized.model, feeds, list(dict.fromkeys(la.input for la in group)))
                for i, layer in enumerate(group, start):
                    if symmetry == "symqt":
                        x_fp, x_q = captured[layer.input], None
                    elif symmetry == "symfp":
                        x_fp, x_q = fp[layer.input], None
                    else:
                        x_fp, x_q = fp[layer.input], captured[layer.input]
                    res = search_layer(
                        layer, x_fp, x_q, num_candidates=o.num_candidates, loss_fn=o.loss_fn, per_channel=per_channel
                    )
                    self._freeze(graph, layer, res)
                    if quantized is not None:
                        quantized.set(layer.weight, fake_quantize(layer.data.astype(np.float32), res.encoding))
                    if last_use[layer.input] == i:
                        fp.pop(layer.input, None)
                    results[layer.op] = res
                    bar.update()
                start = stop
        finally:
            bar.close()
        ctx.artifacts.put(SeqMseResults(results))
        samples = sum(len(v) for f in feeds for v in itertools.islice(f.values(), 1) if np.ndim(v))
        self.remarks.applied(
            f"searched {len(results)} layers ({o.num_candidates} candidates, {o.inp_symmetry}, "
            f"{o.loss_fn}) on {samples} samples in {len(feeds)} batches"
        )
        return self.result(bool(results))

    def _freeze(self, graph: Graph, layer: Layer, res: LayerResult) -> None:
        t = graph.tensors[layer.weight]
        t.encoding = res.encoding
        t.meta["encoding_source"] = "seq-mse"
        gain = 10.0 * math.log10((res.minmax_mse + _EPS) / (res.mse + _EPS))
        fr = np.asarray(res.fractions)
        loss = self.options.loss_fn
        self.remarks.applied(
            f"{layer.bitwidth}-bit {layer.op_type} weight: output MSE {res.mse:.4g} vs min-max {res.minmax_mse:.4g} "
            f"({gain:+.2f} dB), {loss} loss {res.loss:.4g} vs {res.minmax_loss:.4g}; "
            f"range {fr.min():.2f}-{fr.max():.2f} x min-max (mean {fr.mean():.2f})",
            [layer.op],
        )
