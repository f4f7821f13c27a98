"""Pass ``insert-converts``: the conversions of a mixed-precision graph, as onnxruntime runs them.

Runs after ``quantize``. Each op runs in its annotated precision; where it reads a tensor
produced in another one, the conversion goes on that edge only:

- int8 <-> int16: requantize, ``DequantizeLinear(a) -> QuantizeLinear(b) -> DequantizeLinear(b)``
  with ``b`` the same range on the reader's grid (lowering derived bias scales from ``b`` too);
- int -> float: nothing to add, the reader already takes the ``DequantizeLinear`` output;
- float -> int: ``QuantizeLinear -> DequantizeLinear`` with the encoding calibrated for the
  float tensor (the annotation asked calibration for one at the reader's bitwidth);
- float32 <-> float16: ``Cast`` (see ``qpasses.passes.quantize.float16_lowering``: float16 ops also get
  float16 weights).

Float tensors are added to the exported encodings as ``dtype: float`` entries, so the file
re-applied as overrides reproduces the same mixed-precision model.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from onnx import TensorProto

from graph_ir import Graph, Op
from qpasses.core.analyses import Shapes
from qpasses.core.context import PassContext
from qpasses.core.pass_base import Pass, PassResult
from qpasses.passes.cleanup.opset_upgrade import upgrade_opset
from qpasses.passes.quantize.float16_lowering import lower_float16
from qpasses.quant.encodings import Encoding
from qpasses.quant.encodings_file import EncodingsFile, PrecisionOverride
from qpasses.quant.int_storage import integer_tensor_proto, stored_qparams, uint8_storage
from qpasses.quant.plan import DATA_MOVEMENT
from qpasses.quant.precision_type import FLOAT16, requantized, tensor_precision
from qpasses.targets.quantizable_ops import activation_slots, op_precision, quantizable

_BITS: dict[int, tuple[int, bool]] = {
    TensorProto.INT8: (8, True),
    TensorProto.UINT8: (8, False),
    TensorProto.INT16: (16, True),
    TensorProto.UINT16: (16, False),
    TensorProto.INT4: (4, True),
    TensorProto.UINT4: (4, False),
}


def _encoding_from_qparams(graph: Graph, q: Op) -> Encoding | None:
    """The encoding of a per-tensor QuantizeLinear already in the graph (for models quantized elsewhere)."""
    scale, zp = (graph.tensors[n] for n in q.inputs[1:3])
    if scale.data is None or zp.data is None or scale.data.size != 1 or zp.dtype not in _BITS:
        return None
    bits, signed = _BITS[zp.dtype]
    offset = -int(zp.data.reshape(-1)[0]) - (2 ** (bits - 1) if signed else 0)
    return Encoding(bits, (float(scale.data.reshape(-1)[0]),), (offset,), signed and offset == -(2 ** (bits - 1)))


class InsertConverts(Pass):
    name = "insert-converts"
    modifies_values = True  # Convert ops: statistics measured before do not hold after
    description = "conversions where precisions differ: int8<->int16 requantize, float<->int Q/DQ, fp16<->fp32 Cast"

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        encodings = ctx.artifacts.get(EncodingsFile)
        known = dict(encodings.activations) if encodings is not None else {}
        self._raise_opset(graph)
        exported = self._export_floats(graph, ctx)
        requants: list[str] = []
        quants: list[str] = []
        missed: list[str] = []
        made: dict[tuple[str, int], str] = {}
        for op in list(graph.ops):
            want = op_precision(graph, op) if quantizable(op) else None
            if want is None or want.is_float or want.is_int32:
                continue
            for slot in activation_slots(op):
                name = op.inputs[slot] if slot < len(op.inputs) else ""
                if not name or graph.tensors[name].is_constant:
                    continue
                dequantized = self._dequantized(graph, name, known)
                label = name
                if dequantized is not None:
                    source, label = dequantized
                    if source.bitwidth == want.bitwidth:
                        continue
                    enc, kind = requantized(source, want.bitwidth), requants
                else:
                    p = tensor_precision(graph.tensors[name])
                    if p is None or not p.is_float:
                        continue  # fused intermediate or a tensor left unquantized: nothing to convert
                    found = self._float_encoding(graph, name)
                    if found is None:
                        missed.append(op.name)
                        continue
                    enc, kind = requantized(found, want.bitwidth), quants
                key = (name, want.bitwidth)
                if key not in made:
                    made[key] = self._qdq(graph, name, enc, want.bitwidth, uint8_storage(ctx.target))
                    kind.append(f"{label}->int{want.bitwidth}")
                graph.set_input(op, slot, made[key])
        if requants:
            self.remarks.applied(
                f"requantized {len(requants)} tensors between int bitwidths (DQ -> Q -> DQ)", requants[:10]
            )
        if quants:
            self.remarks.applied(f"quantized {len(quants)} float tensors read by int ops (Q -> DQ)", quants[:10])
        if missed:
            self.remarks.missed(
                "float input of an int op left float",
                missed[:10],
                reason="no encoding for the conversion (not calibrated and not overridden)",
            )
        fp16 = None
        if any(tensor_precision(t) == FLOAT16 for t in graph.tensors.values()):
            shapes = ctx.get(Shapes, graph)
            fp16 = lower_float16(graph, {n: t.dtype or shapes.dtype(n) for n, t in graph.tensors.items()})
            if fp16.ops:
                self.remarks.applied(
                    f"{len(fp16.ops)} ops run in float16 ({fp16.constants} constants stored as "
                    f"float16, {fp16.casts} Casts)",
                    fp16.ops[:10],
                )
        return self.result(bool(requants or quants or exported or (fp16 and fp16.ops)))

    def _raise_opset(self, graph: Graph) -> None:
        """Requantizing into int16 needs opset 21 even when lowering did not (all-int8 encodings)."""
        bitwidths = {
            p.bitwidth for op in graph.ops if quantizable(op) and (p := op_precision(graph, op)) and not p.is_float
        }
        if (
            graph.opset() < 21
            and any(bw <= 4 or 8 < bw <= 16 for bw in bitwidths)
            and any(op.op_type == "QuantizeLinear" for op in graph.ops)
        ):
            before = graph.opset()
            upgrade_opset(graph, 21)
            self.remarks.applied(f"raised opset {before} -> {graph.opset()} for int16 conversions")

    def _dequantized(self, graph: Graph, name: str, known: Mapping[str, object]) -> tuple[Encoding, str] | None:
        """The encoding and tensor behind ``DequantizeLinear(QuantizeLinear(t))`` (None for anything else)."""
        dq = graph.producer(name)
        if dq is None or dq.op_type != "DequantizeLinear":
            return None
        q = graph.producer(dq.inputs[0])
        if q is None or q.op_type != "QuantizeLinear":
            return None
        for key in (q.inputs[0], name):
            enc = known.get(key)
            if isinstance(enc, Encoding):
                return enc, key
        enc = _encoding_from_qparams(graph, q)
        return None if enc is None else (enc, q.inputs[0])

    def _float_encoding(self, graph: Graph, name: str) -> Encoding | None:
        """A float tensor's calibrated encoding, or its data-movement source's (shared encodings)."""
        while True:
            t = graph.tensors[name]
            if isinstance(t.encoding, Encoding):
                return t.encoding
            producer = graph.producer(name)
            if producer is None or producer.op_type not in DATA_MOVEMENT or not producer.inputs:
                return None
            name = producer.inputs[0]

    def _qdq(self, graph: Graph, name: str, enc: Encoding, bitwidth: int, portable: bool) -> str:
        qp = stored_qparams(enc, portable)
        label = f"{name}_int{bitwidth}"
        scale = graph.add_initializer(graph.unique_name(f"{label}_scale"), qp.scale.astype(np.float32)).name
        zp = graph.unique_name(f"{label}_zero_point")
        graph.add_initializer(zp, integer_tensor_proto(zp, qp.zero_point, qp.elem_type))
        q = graph.add_op(
            "QuantizeLinear", [name, scale, zp], [graph.unique_name(f"{label}_q")], name=f"{label}_QuantizeLinear"
        )
        dq = graph.add_op(
            "DequantizeLinear",
            [q.outputs[0], scale, zp],
            [graph.unique_name(f"{label}_dq")],
            name=f"{label}_DequantizeLinear",
        )
        return dq.outputs[0]

    def _export_floats(self, graph: Graph, ctx: PassContext) -> int:
        """Float tensors chosen by override, rule or float mode go into the encodings file as dtype float."""
        encodings = ctx.artifacts.setdefault(EncodingsFile)
        added = 0
        for name, t in graph.tensors.items():
            p = tensor_precision(t)
            source = t.meta.get("precision_source")
            if p is None or not p.is_float or source in (None, "fallback", "float-op"):
                continue
            if t.is_constant:
                if source not in ("override", "rule"):
                    continue
                section = encodings.params
            else:
                section = encodings.activations
            if name not in section:
                section[name] = PrecisionOverride(p.bitwidth, "float")
                added += 1
        return added
