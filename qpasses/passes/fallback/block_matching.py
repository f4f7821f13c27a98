"""What the decomposed-block recognizers share: the ``Block`` a match becomes, and the checks of
constants and operands their analyzers run (one-element constants near an exact value, the operand
a walk did not come through, tensors private to a block, reduce axes).

Apart from the recognizers (``norm_block_patterns``, ``activation_block_patterns``) and
``find_blocks`` (``block_patterns``) so each imports only this.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from graph_ir import Graph, Op
from qpasses.core.analyses import Shapes
from qpasses.core.patterns import Match

MATCH_RTOL = 1e-3  # exporters round constants (0.7978846, 1.4142135...)
MAX_EPS = 1e-2


@dataclass
class Block:
    """One matched block: its ops (in order; the last writes ``y``), input ``x`` and fusion data."""

    kind: str
    ops: list[Op]
    x: str
    y: str
    constants: list[tuple[str, float, float]] = field(default_factory=list)  # (what, found, exact)
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def internals(self) -> list[str]:
        """The tensors the block's ops write, but its output ``y``."""
        return [o for op in self.ops for o in op.outputs if o and o != self.y]


Analyzer = Callable[[Graph, Match], "Block | str"]


# --- constants and operands ------------------------------------------------------------------------


def scalar(graph: Graph, name: str) -> float | None:
    """The value of a one-element constant (a scalar, or [1] / [1, 1] shaped), else None."""
    t = graph.tensors.get(name) if name else None
    if t is None or not t.is_constant:
        return None
    data = t.data
    if data is None or data.size != 1 or data.dtype.kind not in "fiu":
        return None
    return float(data.astype(np.float64).ravel()[0])


def near(value: float | None, expected: float, rtol: float = MATCH_RTOL) -> bool:
    return value is not None and abs(value - expected) <= rtol * abs(expected)


def checked_constant(what: str, found: float | None, exact: float) -> tuple[str, float, float]:
    """A matched constant, for the fusion's exactness check (found is None only if never checked)."""
    return what, math.nan if found is None else found, exact


def fmt(value: float | None) -> str:
    return "a non-constant" if value is None else f"{value:.7g}"


def other_operand(op: Op, walked: str) -> tuple[int, str]:
    """(slot, name) of a binary op's operand other than the walked tensor."""
    slot = 1 if op.inputs[0] == walked else 0
    return slot, op.inputs[slot] if slot < len(op.inputs) else ""


def walked_from(prev: Op) -> str:
    return prev.outputs[0]


def why_not_private(graph: Graph, name: str, readers: list[Op]) -> str | None:
    """Why ``name`` is not private to the block (read only by ``readers``), or None."""
    if graph.is_graph_output(name):
        return f"{name} is a graph output"
    ids = {op.id for op in readers}
    outside = [op.name for op in graph.consumers(name) if op.id not in ids]
    return f"{name} is also read by {', '.join(outside)}" if outside else None


def producer_of(graph: Graph, name: str, op_type: str) -> Op | None:
    op = graph.producer(name)
    return op if op is not None and op.op_type == op_type and op.is_standard else None


def reduce_axes(graph: Graph, op: Op) -> tuple[int, ...] | None | str:
    """Reduce axes (attribute, or input from opset 13/18); None: all axes; str: why unusable."""
    if op.attr("keepdims", 1) != 1:
        return f"{op.op_type} '{op.name}' drops the reduced axes (keepdims=0)"
    if len(op.inputs) > 1 and op.inputs[1]:
        t = graph.tensors[op.inputs[1]]
        if not t.is_constant or t.data is None:
            return f"{op.op_type} '{op.name}' has non-constant axes"
        axes = tuple(int(a) for a in np.asarray(t.data).ravel())
    else:
        axes = tuple(op.attr("axes", ()) or ())
    if not axes:
        return (
            f"{op.op_type} '{op.name}' reduces nothing (noop_with_empty_axes)"
            if op.attr("noop_with_empty_axes", 0)
            else None
        )
    return axes


def same_axes(a: tuple[int, ...] | None, b: tuple[int, ...] | None, rank: int | None) -> bool:
    if a is None or b is None:
        return a == b
    if rank is None:
        return sorted(a) == sorted(b)
    return sorted(x % rank for x in a) == sorted(x % rank for x in b)


def tensor_rank(graph: Graph, shapes: Shapes | None, name: str) -> int | None:
    shape = shapes.shape(name) if shapes is not None else graph.tensors[name].shape
    return None if shape is None else len(shape)


def constant_operand(graph: Graph, op: Op) -> str | None:
    """``where`` for an optional Mul(gamma)/Add(beta): exactly one operand is a constant."""
    consts = [n for n in op.inputs[:2] if n and graph.tensors[n].is_constant]
    return None if len(consts) == 1 and len(op.inputs) == 2 else f"'{op.name}' has no constant operand"


def scalar_operand(graph: Graph, op: Op) -> str | None:
    """``where`` for an anchor Add/Mul/Div: one operand is a scalar constant (3, sqrt(2)...)."""
    if len(op.inputs) == 2 and sum(scalar(graph, n) is not None for n in op.inputs) == 1:
        return None
    return f"'{op.name}' has no scalar constant operand"


def failure(result: Block | str) -> str | None:
    return result if isinstance(result, str) else None


def checker(analyze: Analyzer) -> Callable[[Graph, Match], str | None]:
    return lambda graph, m: failure(analyze(graph, m))
