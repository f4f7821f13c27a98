"""Constants holding -inf/+inf/NaN or masking sentinels (|x| >= 1e30) stay float, with what they mask.

No integer grid holds an infinity: quantizing ``Max(x, -inf)`` or ``Where(mask, x, -inf)`` would
turn the mask into a finite number (or fail), changing what the model computes. A sentinel such as
float32 min (-3.4e38, what HF exporters put in attention-mask biases) is finite but just as bad: the
masked scores ``Add(scores, mask * -3.4e38)`` get a quantizer whose range is ~1e38, so every real
score rounds to 0 (unidic_tagger, an ALBERT tagger: tag agreement 0.60). So the constant stays
float, and so do the tensors the mask flows into through the masking ops (Add/Sub/Mul/Div/Where/
Max/Min/Neg and data movement), up to and including the first op that brings the range back
(Softmax, Exp, ReduceMax, ...): they are small, and an integer reader would re-quantize them on the
huge range.
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto

from graph_ir import Graph
from qpasses.core.context import PassContext
from qpasses.core.pass_base import Pass, PassResult
from qpasses.quant.keep_float import FLOAT32, keep_float

# |x| at or above this is a masking sentinel, not a value (float32 max is 3.4e38; real weights stay < 1e6).
HUGE = 1e30
# Ops through which a masking value flows on to their output.
MASKING = frozenset({"Add", "Sub", "Mul", "Div", "Where", "Max", "Min", "Neg", "Cast"})


def _masking_constant(data: np.ndarray | None) -> bool:
    if data is None or not data.size:
        return False
    finite = np.isfinite(data)
    return not finite.all() or bool((np.abs(data[finite].astype(np.float64)) >= HUGE).any())


def non_finite_constants(graph: Graph) -> list[str]:
    """Float constants holding inf/NaN or a masking sentinel (|x| >= 1e30)."""
    names = []
    for name, t in graph.tensors.items():
        if not t.is_constant or t.dtype not in (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE):
            continue
        if _masking_constant(t.data):
            names.append(name)
    return names


def _clamped_away(graph: Graph, op, const: str) -> bool:  # noqa: ANN001
    """``Max(x, -big)`` / ``Min(x, +big)``: a clamp that lets no sentinel through to its output."""
    if op.op_type not in ("Max", "Min"):
        return False
    data = graph.tensors[const].data
    values = data[~np.isnan(data)] if data is not None else np.array([])
    return bool(values.size) and (bool((values < 0).all()) if op.op_type == "Max" else bool((values > 0).all()))


def masked_flow(graph: Graph, const: str) -> list[str]:
    """The tensors a masking constant flows into: through masking ops and data movement, then the
    output of the first op past them (Softmax, ReduceMax, ...), which an integer kernel would
    otherwise read on the masked range."""
    from qpasses.quant.plan import DATA_MOVEMENT

    out: dict[str, None] = {}
    todo = [const]
    while todo:
        name = todo.pop()
        for op in graph.consumers(name):
            carries = (op.op_type in MASKING or op.op_type in DATA_MOVEMENT) and not (
                name == const and _clamped_away(graph, op, const)
            )
            for o in op.outputs:
                if o and o not in out and not graph.tensors[o].is_constant:
                    out[o] = None
                    if carries:
                        todo.append(o)
    return list(out)


class KeepNonFiniteFloat(Pass):
    name = "keep-nonfinite-float"
    description = (
        "keep constants with inf/NaN or masking sentinels (|x| >= 1e30) float, with the tensors "
        "they mask: no integer grid holds them"
    )
    preserves_semantics = True

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        consts = non_finite_constants(graph)
        marked = keep_float(graph, consts, "non-finite constant", precision=FLOAT32)
        for name in marked:
            data = graph.tensors[name].constant_data()
            peak = data.flat[np.argmax(np.abs(data))]
            what = "inf/NaN" if not np.isfinite(data).all() else f"a masking sentinel ({peak:.3g})"
            readers = ", ".join(f"{op.op_type} '{op.name}'" for op in graph.consumers(name))
            self.remarks.applied(
                "kept float", [name], reason=f"holds {what} (read by {readers}); no integer grid holds it"
            )
        for name in consts:
            flow = keep_float(
                graph, masked_flow(graph, name), "masked by a non-finite/sentinel constant", precision=FLOAT32
            )
            if flow:
                self.remarks.applied(
                    f"kept {len(flow)} tensors masked by '{name}' float",
                    flow[:10],
                    reason="they carry the mask value: a quantizer on their range (~1e38 or "
                    "inf) rounds every real value to 0; kept up to the op that brings the "
                    "range back (Softmax, ReduceMax, ...)",
                )
        return self.result(False)
