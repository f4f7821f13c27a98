"""What the precision annotation and every pass after it ask of one op.

``quantizable`` (has an integer form), ``op_params`` (its constant weight and bias),
``activation_slots`` (the inputs a conversion may sit on) and ``op_precision`` (the precision
it runs in, once annotated). Kept apart from the annotation itself (``precision``) because the
lowering, conversion and conformance passes and AMP's groups read ops through these alone.
"""

from __future__ import annotations

from graph_ir import Graph, Op
from qpasses.quant.plan import COMPUTE, DATA_MOVEMENT, WEIGHTED
from qpasses.quant.precision_type import Precision


def quantizable(op: Op) -> bool:
    """Ops with an integer form in the quantization plan; all others run in float."""
    return op.is_standard and (op.op_type in COMPUTE or op.op_type in DATA_MOVEMENT)


def op_params(graph: Graph, op: Op) -> tuple[str | None, str | None]:
    """(weight, bias) constant names of a Conv/ConvTranspose/Gemm/MatMul, else (None, None)."""
    slots = WEIGHTED.get(op.op_type)
    if slots is None or not op.is_standard:
        return None, None
    found: list[str | None] = []
    for slot in slots:
        name = op.inputs[slot] if slot is not None and slot < len(op.inputs) else ""
        found.append(name if name and graph.tensors[name].is_constant else None)
    return found[0], found[1]


def op_precision(graph: Graph, op: Op) -> Precision | None:
    """An op runs in the precision of its (first annotated) output; None when it has none.

    An INT32 output makes an INT32 op only when the op's inputs are INT32 too; otherwise the op
    is the producer side of an INT32 override and runs at the bitwidth the output is quantized to.
    """
    for out in op.outputs:
        if out and out in graph.tensors:
            p = Precision.of(graph.tensors[out].precision)
            if p is not None and p.is_int32:
                inputs = [
                    Precision.of(graph.tensors[n].precision)
                    for n in op.inputs
                    if n and not graph.tensors[n].is_constant
                ]
                if not inputs or not all(q is not None and q.is_int32 for q in inputs):
                    return Precision("int", int(graph.tensors[out].meta.get("encoding_bw", 8)))
            if p is not None:
                return p
    return None


def activation_slots(op: Op) -> tuple[int, ...]:
    """Input slots carrying data that a conversion may sit on."""
    if op.op_type in DATA_MOVEMENT:
        return DATA_MOVEMENT[op.op_type]
    return COMPUTE.get(op.op_type, ())
