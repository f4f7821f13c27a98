"""Re-store an existing QDQ model's int8 tensors as uint8 on the same grid (portable onnxruntime).

For models quantized by any tool (onnxruntime's quantizer defaults to int8 weights, some to int8
activations): onnxruntime's x86 u8s8/s8s8 kernels without VNNI saturate int16 pair sums, its u8u8
kernels cannot. Each int8 value ``q`` with zero point ``z`` becomes ``q + 128`` with ``z + 128``:
``(q - z) * scale`` is unchanged, so exact QDQ semantics are unchanged bit for bit.
"""

from __future__ import annotations

import numpy as np
import onnx

from graph_ir import Graph, Op
from qpasses.core.context import PassContext
from qpasses.core.pass_base import Pass, PassResult


def _int8_constant(graph: Graph, name: str) -> np.ndarray | None:
    if not name or name not in graph.tensors:
        return None
    data = graph.tensors[name].data if graph.tensors[name].is_constant else None
    return data if data is not None and data.dtype == np.int8 else None


def _shifted(graph: Graph, name: str, data: np.ndarray, made: dict[str, str]) -> str:
    """The uint8 twin of an int8 constant (one per constant, shared by every reader)."""
    if name not in made:
        shifted = (data.astype(np.int16) + 128).astype(np.uint8)
        made[name] = graph.add_initializer(graph.unique_name(f"{name}_u8"), shifted).name
    return made[name]


class PortableStorage(Pass):
    name = "portable-storage"
    modifies_values = True  # re-stored integers: statistics measured before do not hold after
    description = "store int8 Q/DQ tensors as uint8 (zero point + 128): same values, no int16 saturation on x86"
    preserves_semantics = True

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        weights = activations = 0
        skipped: list[str] = []
        self._made: dict[str, str] = {}
        for op in list(graph.ops):
            if op.op_type == "DequantizeLinear" and op.is_standard and len(op.inputs) >= 3:
                if self._weight(graph, op):
                    weights += 1
            elif op.op_type == "QuantizeLinear" and op.is_standard and len(op.inputs) >= 3:
                changed = self._activation(graph, op)
                if changed is None:
                    skipped.append(op.name)
                activations += bool(changed)
        if skipped:
            self.remarks.missed(
                "int8 activation kept",
                skipped[:10],
                reason="its quantized value is read by something other than DequantizeLinear",
            )
        if weights or activations:
            graph.remove_unused_initializers()
            self.remarks.applied(f"stored {weights} int8 constants and {activations} int8 activations as uint8")
        return self.result(bool(weights or activations))

    def _weight(self, graph: Graph, dq: Op) -> bool:
        data, zp = _int8_constant(graph, dq.inputs[0]), _int8_constant(graph, dq.inputs[2])
        if data is None or zp is None:
            return False
        graph.set_input(dq, 0, _shifted(graph, dq.inputs[0], data, self._made))
        graph.set_input(dq, 2, _shifted(graph, dq.inputs[2], zp, self._made))
        return True

    def _activation(self, graph: Graph, q: Op) -> bool | None:
        """True: re-stored; False: not int8; None: int8 but read by a non-DQ op (kept)."""
        zp = _int8_constant(graph, q.inputs[2])
        if zp is None or graph.tensors[q.inputs[0]].is_constant:
            return False
        out = q.outputs[0]
        readers = graph.consumers(out)
        if graph.is_graph_output(out) or any(
            r.op_type != "DequantizeLinear"
            or r.inputs[0] != out
            or len(r.inputs) < 3
            or _int8_constant(graph, r.inputs[2]) is None
            for r in readers
        ):
            return None
        new_zp = _shifted(graph, q.inputs[2], zp, self._made)
        graph.set_input(q, 2, new_zp)
        for r in readers:
            # The DQ may have its own (equal-valued) zero point; give it the same shift.
            r_zp = _int8_constant(graph, r.inputs[2])
            graph.set_input(
                r,
                2,
                new_zp
                if r.inputs[2] == q.inputs[2] or r_zp is None
                else _shifted(graph, r.inputs[2], r_zp, self._made),
            )
        t = graph.tensors[out]
        if t.value_info is not None:
            t.set_type(onnx.TensorProto.UINT8, t.shape)
        return True
