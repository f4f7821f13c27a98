"""Keep chosen tensors out of 8-bit quantization, the way a user's float override would.

Analyses that find tensors 8 bits cannot carry (non-finite constants, shape arithmetic, mixed
ranges, the inside of decomposed normalizations) mark them here before ``annotate-precision``:
float32, or int16 on a target that runs only integer kernels. A user's own override always wins.
The reason is kept in ``meta["auto_precision"]`` for reports.
"""

from __future__ import annotations

from typing import Any

from graph_ir import Graph
from qpasses.quant.precision_type import Precision

FLOAT32 = Precision("float", 32)
INT16 = Precision("int", 16)


def kept_precision(target: Any) -> Precision | None:
    """float32, or int16 where the target needs a quantized model (constants too: no float there); None
    where it runs no activation above 8 bits either (HTA): nothing higher to keep a tensor in."""
    if target is None or not getattr(target, "needs_quantized", False):
        return FLOAT32
    return INT16 if 16 in getattr(target, "activation_bitwidths", (16,)) else None


def with_readers(graph: Graph, names: list[str]) -> list[str]:
    """``names`` and the outputs of the ops reading them (through data-movement ops): an integer
    reader would re-quantize a float tensor on its own range, which is what keeping it float avoids."""
    from qpasses.quant.plan import DATA_MOVEMENT

    out = dict.fromkeys(names)
    todo = list(names)
    while todo:
        for op in graph.consumers(todo.pop()):
            for o in op.outputs:
                if o and o not in out and not graph.tensors[o].is_constant:
                    out[o] = None
                    if op.op_type in DATA_MOVEMENT:
                        todo.append(o)
    return list(out)


def user_override(graph: Graph, name: str) -> bool:
    """The user gave this tensor a precision or an encoding (overrides file): automatic choices leave it."""
    t = graph.tensors[name]
    given = t.meta.get("precision_source") == "override" or t.meta.get("encoding_source") == "override"
    return given and "auto_precision" not in t.meta


def keep_float(
    graph: Graph, names: list[str], reason: str, target: Any = None, precision: Precision | None = None
) -> list[str]:
    """Mark ``names`` (skipping user overrides); returns the names marked. On a target with nothing above
    8 bits none is marked: each keeps the reason in ``meta["higher_unavailable"]`` (``annotate-precision``
    names them in one remark)."""
    chosen = precision or kept_precision(target)
    marked = []
    for name in names:
        t = graph.tensors.get(name)
        if t is None or user_override(graph, name):
            continue
        if chosen is None:
            t.meta["higher_unavailable"] = reason
            continue
        t.precision = chosen
        t.meta["precision_source"] = "override"
        t.meta["auto_precision"] = reason
        marked.append(name)
    return marked
