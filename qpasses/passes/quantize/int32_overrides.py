"""Pass ``int32-overrides``: run ops whose inputs and outputs are all overridden to INT32 in INT32.

The spec's rewrite: ``DequantizeLinear -> Cast(to INT32) -> op -> Cast(to FLOAT) -> QuantizeLinear``.
This pass runs before calibration and inserts the Casts; the float tensors on the outer side of
them are marked ``meta["int32_boundary"]`` and quantized at their activation bitwidth, so lowering
adds the DequantizeLinear/QuantizeLinear. Chains of INT32 ops stay INT32 between them. Ops with
weights or bias, and ops only partly overridden, are refused: the spec supports neither.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from onnx import TensorProto

from graph_ir import Graph, Op
from qpasses.core.context import PassContext
from qpasses.core.errors import PassError
from qpasses.core.pass_base import Pass, PassResult
from qpasses.quant.precision_type import Precision, tensor_precision
from qpasses.targets.descriptor import TargetDescriptor
from qpasses.targets.quantizable_ops import activation_slots

_SKIP = ("Constant", "QuantizeLinear", "DequantizeLinear", "Cast")


@dataclass(frozen=True)
class _Int32Op:
    op: Op
    aux: tuple[int, ...]  # slots of float constants that are not data (Clip bounds): cast to int32


def _is_int32(graph: Graph, name: str) -> bool:
    p = tensor_precision(graph.tensors[name])
    return p is not None and p.is_int32


def _annotated(graph: Graph, name: str) -> bool:
    t = graph.tensors[name]
    return not t.is_constant and tensor_precision(t) is not None


def find_int32_ops(graph: Graph, target: TargetDescriptor | None = None) -> list[_Int32Op]:
    """Ops overridden to INT32, after checking the spec's conditions (errors name the op)."""
    found: list[_Int32Op] = []
    for op in graph.ops:
        if op.op_type in _SKIP:
            continue
        ins = [n for n in op.inputs if n and _annotated(graph, n)]
        outs = [n for n in op.outputs if n and _annotated(graph, n)]
        ins32 = [n for n in ins if _is_int32(graph, n)]
        outs32 = [n for n in outs if _is_int32(graph, n)]
        if not ins32 or not outs32:
            continue  # producer or consumer of an INT32 tensor: it stays as it is
        where = f"INT32 override of op {op.name} ({op.op_type})"
        if len(ins32) != len(ins) or len(outs32) != len(outs):
            missing = [n for n in (*ins, *outs) if n not in ins32 and n not in outs32]
            raise PassError(
                f"{where}: only partly overridden, {', '.join(missing)} not INT32 "
                "(override all inputs and outputs of the op)"
            )
        data_slots = activation_slots(op)
        params = [
            n
            for s, n in enumerate(op.inputs)
            if n and s in data_slots and graph.tensors[n].is_constant and graph.tensors[n].dtype == TensorProto.FLOAT
        ]
        if params:
            raise PassError(f"{where}: ops with weights or bias cannot run in INT32 (it reads {', '.join(params)})")
        if target is not None and not target.supports_int32(op.op_type):
            raise PassError(f"{where}: target {target.name} cannot run {op.op_type} in INT32")
        aux = tuple(
            s
            for s, n in enumerate(op.inputs)
            if n and graph.tensors[n].is_constant and graph.tensors[n].dtype == TensorProto.FLOAT
        )
        found.append(_Int32Op(op, aux))
    return found


class Int32Overrides(Pass):
    name = "int32-overrides"
    description = "rewrite ops overridden to INT32 as DequantizeLinear -> Cast(INT32) -> op -> Cast(FLOAT) -> Q"

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        ops = find_int32_ops(graph, ctx.target)
        if not ops:
            return self.result(False)
        ids = {item.op.id for item in ops}
        casts: dict[str, str] = {}
        for item in ops:
            self._cast_inputs(graph, item, ids, casts)
            self._cast_outputs(graph, item.op, ids)
        names = [item.op.name for item in ops]
        self.remarks.applied(f"{len(ops)} ops run in INT32 between Cast ops", names[:10])
        return self.result(True)

    def _cast_inputs(self, graph: Graph, item: _Int32Op, ids: set[int], casts: dict[str, str]) -> None:
        op = item.op
        for slot, name in enumerate(op.inputs):
            if not name:
                continue
            if slot in item.aux:
                const = graph.add_initializer(
                    graph.unique_name(f"{name}_int32"), np.round(graph.tensors[name].constant_data()).astype(np.int32)
                )
                graph.set_input(op, slot, const.name)
                if (
                    not graph.uses(name)
                    and graph.tensors[name].initializer is not None
                    and not graph.is_graph_output(name)
                    and name not in graph.inputs
                ):
                    graph.remove_tensor(name)
                continue
            if not _is_int32(graph, name):
                continue
            producer = graph.producer(name)
            if producer is not None and producer.id in ids:
                continue  # already INT32: the previous op of the chain writes it
            if name not in casts:
                cast = graph.add_op(
                    "Cast",
                    [name],
                    [graph.unique_name(f"{name}_int32")],
                    name=f"{name}_Cast_int32",
                    attributes={"to": TensorProto.INT32},
                )
                casts[name] = cast.outputs[0]
                _mark_boundary(graph, name)
            graph.set_input(op, slot, casts[name])

    def _cast_outputs(self, graph: Graph, op: Op, ids: set[int]) -> None:
        for out in list(op.outputs):
            if not out or not _is_int32(graph, out):
                continue
            float_readers = [r for r in graph.consumers(out) if r.id not in ids]
            kept = graph.tensors[out]
            saved = (kept.encoding, dict(kept.meta), kept.precision, kept.value_info)
            inner = graph.rename_tensor(out, graph.unique_name(f"{out}_int32"))
            inner.set_type(TensorProto.INT32, inner.shape)
            inner.encoding, inner.meta = None, {"precision_source": "override"}
            if not float_readers and not graph.is_graph_output(inner.name):
                continue
            cast = graph.add_op(
                "Cast", [inner.name], [out], name=f"{out}_Cast_float", attributes={"to": TensorProto.FLOAT}
            )
            outer = graph.tensors[out]
            outer.encoding, outer.meta, outer.precision, outer.value_info = saved
            for reader, slot in graph.uses(inner.name):
                if reader is not cast and reader.id not in ids:
                    graph.replace_use(reader, slot, out)
            graph.outputs = [out if o == inner.name else o for o in graph.outputs]
            _mark_boundary(graph, out)


def _mark_boundary(graph: Graph, name: str) -> None:
    """The float side of a Cast: quantized at the activation bitwidth the annotation chose for it."""
    t = graph.tensors[name]
    t.precision = Precision("int", int(t.meta.get("encoding_bw", 8)))
    t.meta["int32_boundary"] = True
