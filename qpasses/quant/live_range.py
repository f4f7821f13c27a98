"""The part of a tensor's range its readers can tell apart: an encoding need not spend levels elsewhere.

A tensor read only by activations that are constant beyond a bound carries no information there:
``HardSwish(x) = 0`` for every ``x <= -3``, ``Relu(x) = 0`` for ``x <= 0``, ``Clip`` is constant outside
its bounds. PP-LCNet's Conv outputs read by a HardSwish reach -48 (slanet_plus): its readers cannot
tell -48 from -3, so the grid can start at -3 and its step is up to 2x finer for the same outputs.
With ``keep-depthwise-inputs-float``, slanet_plus 0.892 / 0.893 -> 0.927 / 0.919 structure-token
agreement (exact / default session). HardSigmoid (constant outside [-beta/alpha, (1-beta)/alpha]) is
left out: its squeeze-excitation gates gained nothing measurable on the corpus, and on ppocr_det the
narrower gates moved the automatic fallback off the tensor it keeps float (IoU 0.973 -> 0.964).

``live_interval`` is the hull of the readers' non-constant intervals (the encoding's range is
intersected with it); None when any reader, or the graph's output list, needs the whole range.
"""

from __future__ import annotations

import math

import numpy as np

from graph_ir import Graph, Op


def _constant(graph: Graph, name: str) -> float | None:
    t = graph.tensors.get(name) if name else None
    data = t.data if t is not None and t.is_constant else None
    return float(np.asarray(data).reshape(-1)[0]) if data is not None and np.size(data) == 1 else None


def reader_interval(graph: Graph, op: Op, name: str) -> tuple[float, float] | None:
    """The input interval outside which ``op``'s output is constant (None: every value matters)."""
    if not op.is_standard or not op.inputs or op.inputs[0] != name or name in op.inputs[1:]:
        return None
    if op.op_type == "Relu":
        return 0.0, math.inf
    if op.op_type == "HardSwish":
        return -3.0, math.inf
    if op.op_type == "Clip":
        if len(op.inputs) > 1 or op.attr("min") is None and op.attr("max") is None:  # opset 11+: inputs
            lo = _constant(graph, op.inputs[1]) if len(op.inputs) > 1 and op.inputs[1] else -math.inf
            hi = _constant(graph, op.inputs[2]) if len(op.inputs) > 2 and op.inputs[2] else math.inf
            if lo is None or hi is None:
                return None  # bounds computed from data
        else:
            lo, hi = float(op.attr("min", -math.inf)), float(op.attr("max", math.inf))
        return (lo, hi) if lo < hi else None
    return None


def live_interval(graph: Graph, name: str) -> tuple[float, float] | None:
    """The hull of the intervals ``name``'s readers tell apart; None when some reader (or the model's
    output) needs every value."""
    if graph.is_graph_output(name):
        return None
    readers = graph.consumers(name)
    if not readers:
        return None
    lo, hi = math.inf, -math.inf
    for op in readers:
        interval = reader_interval(graph, op, name)
        if interval is None:
            return None
        lo, hi = min(lo, interval[0]), max(hi, interval[1])
    return lo, hi


def clamp_range(lo: float, hi: float, live: tuple[float, float]) -> tuple[float, float] | None:
    """[lo, hi] intersected with ``live``; None when that leaves nothing to encode (the data never
    reaches the live interval: then the full range is as good as any)."""
    new_lo, new_hi = max(lo, live[0]), min(hi, live[1])
    return (new_lo, new_hi) if new_lo < new_hi else None
