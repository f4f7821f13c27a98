"""Lower encodings to a QDQ model that onnxruntime runs.

- activations: QuantizeLinear -> DequantizeLinear after the producer; every reader
  (graph outputs included, by renaming the producer's output) reads the dequantized value;
- data-movement outputs reuse their input's scale/zero point (shared initializers);
- weights and float params are stored already quantized (int8/int4/uint8...) + DequantizeLinear;
  8-bit tensors as uint8 when the target asks for portable storage (``int_storage``);
- biases of Conv/ConvTranspose/Gemm are stored as int32 with scale = s_in x s_w (the weight
  scale is raised where the int32 range would overflow, never lowered).

The encodings that were lowered (keyed by FP32 tensor names) are left in
an ``EncodingsFile`` artifact for export.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from graph_ir import Graph
from qpasses.core.context import PassContext
from qpasses.core.pass_base import Pass, PassResult
from qpasses.passes.cleanup.opset_upgrade import upgrade_opset
from qpasses.quant.encodings import Encoding
from qpasses.quant.encodings_file import EncodingsFile, Entry
from qpasses.quant.int_storage import integer_tensor_proto, stored_integers, stored_qparams, uint8_storage
from qpasses.quant.plan import QuantPlan, QuantPlanData
from qpasses.quant.precision_type import encoding_bitwidth, is_float, requantized, tensor_precision
from qpasses.quant.range_search import bias_encoding, compute
from qpasses.targets.quantizable_ops import op_precision


def required_opset(encodings: list[Encoding]) -> int:
    """Per-channel Q/DQ needs opset 13; 4-bit and 16-bit Q/DQ need 21."""
    need = 10
    for e in encodings:
        if e.axis is not None:
            need = max(need, 13)
        if e.bitwidth <= 4 or 8 < e.bitwidth <= 16:
            need = max(need, 21)
    return need


class QDQLowering(Pass):
    name = "quantize"
    modifies_values = True  # Q/DQ pairs: statistics measured before do not hold after
    description = "lower encodings to QuantizeLinear/DequantizeLinear (int weights, int32 bias)"

    @dataclass
    class Options:
        bias_bw: int = 32

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        if any(op.op_type in ("QuantizeLinear", "DequantizeLinear") for op in graph.ops):
            self.remarks.missed(
                "model already contains QuantizeLinear/DequantizeLinear; only tensors not next to them are quantized"
            )
        # Raise the opset first (it rebuilds the graph), then plan on the final graph.
        need = required_opset([t.encoding for t in graph.tensors.values() if isinstance(t.encoding, Encoding)])
        if any(bw <= 4 or 8 < bw <= 16 for t in graph.tensors.values() if (bw := t.meta.get("encoding_bw"))):
            need = max(need, 21)  # annotated int16 (or int4) activations, calibrated or converted later
        if graph.opset() < need:
            before = graph.opset()
            upgrade_opset(graph, need)
            self.remarks.applied(f"raised opset {before} -> {graph.opset()} for the Q/DQ features used")
        plan = ctx.get(QuantPlan, graph).plan
        tensors = graph.tensors
        self._portable = uint8_storage(ctx.target)
        act_enc = self._activation_encodings(graph, plan)
        missing = [n for n in plan.activations if n not in act_enc]
        if missing:
            self.remarks.missed(
                f"{len(missing)} activations have no encoding and stay float",
                missing[:10],
                reason="not calibrated and not overridden (float fallback)",
            )
        for name, reason in plan.skipped:
            self.remarks.missed("not quantized", [name], reason=reason)

        bias_enc, weight_enc = self._bias_encodings(graph, plan, act_enc)
        for name in (*plan.weights, *plan.params):
            if name not in weight_enc and tensors[name].encoding is not None:
                weight_enc[name] = tensors[name].encoding

        if not (act_enc or weight_enc or bias_enc):
            self.remarks.missed("nothing to quantize (no encodings)")
            return self.result(False)

        activations: dict[str, Entry] = {}
        qparams: dict[str, tuple[str, str]] = {}
        for name in plan.quantized_activations:
            root = plan.root(name)
            if root not in act_enc or is_float(tensors[name]):
                continue  # annotated float: its encoding only serves insert-converts
            enc = act_enc[root]
            if root not in qparams:
                qparams[root] = self._qparam_initializers(graph, root, enc)
            self._quantize_activation(graph, name, qparams[root])
            activations[name] = enc

        params: dict[str, Entry] = {}
        for name, enc in {**weight_enc, **bias_enc}.items():
            # Narrow biases keep the spec's signed storage (no fused kernel reads them).
            self._quantize_constant(graph, name, enc, self._portable and name not in bias_enc)
            params[name] = enc
        graph.remove_dead_ops()
        ctx.artifacts.put(EncodingsFile(activations=activations, params=params))
        self.remarks.applied(
            f"inserted Q/DQ on {len(activations)} activations ({len(qparams)} distinct encodings), "
            f"quantized {len(weight_enc)} weights/params and {len(bias_enc)} biases"
        )
        return self.result(True)

    # --- encodings derived at lowering time --------------------------------------------------------
    def _activation_encodings(self, graph: Graph, plan: QuantPlanData) -> dict[str, Encoding]:
        """Calibrated encodings, re-gridded where the precision annotation asked for another bitwidth."""
        out: dict[str, Encoding] = {}
        regridded = []
        for name in plan.activations:
            t = graph.tensors[name]
            if t.encoding is None:
                continue
            bitwidth = encoding_bitwidth(t, t.encoding.bitwidth)
            if bitwidth != t.encoding.bitwidth:
                t.encoding = requantized(t.encoding, bitwidth)
                regridded.append(name)
            out[name] = t.encoding
        if regridded:
            self.remarks.applied(
                f"re-gridded {len(regridded)} activation encodings to their annotated bitwidth",
                regridded[:10],
                reason="calibrated at another bitwidth than the precision",
            )
        return out

    def _bias_encodings(
        self, graph: Graph, plan: QuantPlanData, act_enc: dict[str, Encoding]
    ) -> tuple[dict[str, Encoding], dict[str, Encoding]]:
        bias_enc: dict[str, Encoding] = {}
        weight_enc: dict[str, Encoding] = {}
        ops = {op.name: op for op in graph.ops} if plan.biases else {}
        for name, spec in plan.biases.items():
            in_enc = act_enc.get(plan.root(spec.input))
            w = weight_enc.get(spec.weight) or graph.tensors[spec.weight].encoding
            if in_enc is None or w is None:
                self.remarks.missed("bias left float", [spec.op], reason="its input or weight has no encoding")
                continue
            # The op reads its input converted to its own bitwidth (insert-converts derives the same grid).
            op_p = op_precision(graph, ops[spec.op]) if spec.op in ops else None
            if op_p is not None and not op_p.is_float and op_p.bitwidth <= 16:
                in_enc = requantized(in_enc, op_p.bitwidth)
            bias_p = tensor_precision(graph.tensors[name])
            bias_bw = bias_p.bitwidth if bias_p is not None and not bias_p.is_float else self.options.bias_bw
            bias = graph.tensors[name]
            if bias.meta.get("encoding_source") == "override" and isinstance(bias.encoding, Encoding):
                bias_enc[name] = bias.encoding
                continue
            b = bias.constant_data().astype(np.float64)
            if bias_bw < 32:
                # Too few levels for scale = s_in x s_w: forcing it would crush the weight scales
                # (every weight rounding to 0). Narrow biases get their own range, as QNN does.
                bias_enc[name] = compute(b, bias_bw, "symmetric", role="bias")
                continue
            if w.axis is not None and b.shape != (w.num_channels,):
                self.remarks.missed(
                    "bias left float",
                    [spec.op],
                    reason=f"bias shape {b.shape} does not match {w.num_channels} weight channels",
                )
                continue
            enc, new_w = bias_encoding(b, in_enc.scale[0], w, bias_bw)
            if new_w is not w:
                self.remarks.applied(
                    "raised weight scale so the bias fits", [spec.op], reason=f"{bias_bw}-bit bias would overflow"
                )
            bias_enc[name] = enc
            weight_enc[spec.weight] = new_w
        return bias_enc, weight_enc

    # --- rewriting -----------------------------------------------------------------------------------
    def _qparam_initializers(self, graph: Graph, root: str, enc: Encoding) -> tuple[str, str]:
        qp = stored_qparams(enc, self._portable)
        scale = graph.add_initializer(graph.unique_name(f"{root}_scale"), qp.scale.astype(np.float32))
        zp_name = graph.unique_name(f"{root}_zero_point")
        graph.add_initializer(zp_name, integer_tensor_proto(zp_name, qp.zero_point, qp.elem_type))
        return scale.name, zp_name

    def _quantize_activation(self, graph: Graph, name: str, qparams: tuple[str, str]) -> None:
        scale, zp = qparams
        producer = graph.producer(name)
        if graph.is_graph_output(name) and producer is not None:
            # Keep the interface name: the producer now writes <name>_fp and the DQ writes <name>,
            # which its readers and the graph output keep reading.
            pre = graph.unique_name(f"{name}_fp")
            graph.set_output(producer, producer.outputs.index(name), pre)
            # The annotations describe the producer's (float) result: they go with it.
            src, dst = graph.tensors[name], graph.tensors[pre]
            dst.encoding, dst.precision, dst.meta = src.encoding, src.precision, src.meta
            src.encoding, src.precision, src.meta = None, None, {}
            if src.value_info is not None:
                dst.set_type(src.dtype, src.shape)
            q = graph.add_op(
                "QuantizeLinear", [pre, scale, zp], [graph.unique_name(f"{name}_q")], name=f"{name}_QuantizeLinear"
            )
            graph.add_op("DequantizeLinear", [q.outputs[0], scale, zp], [name], name=f"{name}_DequantizeLinear")
            return
        readers = graph.uses(name)
        if not readers:
            return
        q = graph.add_op(
            "QuantizeLinear", [name, scale, zp], [graph.unique_name(f"{name}_q")], name=f"{name}_QuantizeLinear"
        )
        dq = graph.add_op(
            "DequantizeLinear",
            [q.outputs[0], scale, zp],
            [graph.unique_name(f"{name}_dq")],
            name=f"{name}_DequantizeLinear",
        )
        for op, slot in readers:
            graph.replace_use(op, slot, dq.outputs[0])

    def _quantize_constant(self, graph: Graph, name: str, enc: Encoding, portable: bool) -> None:
        t = graph.tensors[name]
        data = t.constant_data()
        qp = stored_qparams(enc, portable)
        q = stored_integers(data, enc, portable)
        axis = enc.axis
        if axis is not None and data.ndim == 1:
            axis = 0
        stored_name = graph.unique_name(f"{name}_quantized")
        stored = graph.add_initializer(stored_name, integer_tensor_proto(stored_name, q, qp.elem_type))
        scale = graph.add_initializer(graph.unique_name(f"{name}_scale"), qp.scale.astype(np.float32))
        zp_name = graph.unique_name(f"{name}_zero_point")
        zp = graph.add_initializer(zp_name, integer_tensor_proto(zp_name, qp.zero_point, qp.elem_type))
        attrs = {"axis": axis} if axis is not None else {}
        dq = graph.add_op(
            "DequantizeLinear",
            [stored.name, scale.name, zp.name],
            [graph.unique_name(f"{name}_dq")],
            name=f"{name}_DequantizeLinear",
            attributes=attrs,
        )
        for op, slot in graph.uses(name):
            if op is not dq:
                graph.replace_use(op, slot, dq.outputs[0])
        if (
            not graph.uses(name)
            and not graph.is_graph_output(name)
            and name not in graph.inputs
            and t.initializer is not None
        ):
            graph.remove_tensor(name)
