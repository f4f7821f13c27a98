"""Decomposed normalization and activation blocks recognized with the pattern matcher: LayerNorm and
RMSNorm from primitives, GELU from Erf or tanh/x^3, Softmax from Exp/ReduceSum/Div, HardSwish from
Mul/Clip (or HardSigmoid*x). ``find_blocks`` returns each match with its constants checked, and the
near misses worth a remark; ``decomposed_blocks`` (the pass) keeps their internals float or fuses them."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from graph_ir import Graph, Op
from qpasses.core.analyses import Shapes
from qpasses.core.patterns import Match, NearMiss, Pattern, Step

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


def _near(value: float | None, expected: float, rtol: float = MATCH_RTOL) -> bool:
    return value is not None and abs(value - expected) <= rtol * abs(expected)


def _const(what: str, found: float | None, exact: float) -> tuple[str, float, float]:
    """A matched constant, for the fusion's exactness check (found is None only if never checked)."""
    return what, math.nan if found is None else found, exact


def _fmt(value: float | None) -> str:
    return "a non-constant" if value is None else f"{value:.7g}"


def _other(op: Op, walked: str) -> tuple[int, str]:
    """(slot, name) of a binary op's operand other than the walked tensor."""
    slot = 1 if op.inputs[0] == walked else 0
    return slot, op.inputs[slot] if slot < len(op.inputs) else ""


def _walked(prev: Op) -> str:
    return prev.outputs[0]


def _internal(graph: Graph, name: str, readers: list[Op]) -> str | None:
    """Why ``name`` is not private to the block (read only by ``readers``), or None."""
    if graph.is_graph_output(name):
        return f"{name} is a graph output"
    ids = {op.id for op in readers}
    outside = [op.name for op in graph.consumers(name) if op.id not in ids]
    return f"{name} is also read by {', '.join(outside)}" if outside else None


def _producer(graph: Graph, name: str, op_type: str) -> Op | None:
    op = graph.producer(name)
    return op if op is not None and op.op_type == op_type and op.is_standard else None


def _reduce_axes(graph: Graph, op: Op) -> tuple[int, ...] | None | str:
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


def _same_axes(a: tuple[int, ...] | None, b: tuple[int, ...] | None, rank: int | None) -> bool:
    if a is None or b is None:
        return a == b
    if rank is None:
        return sorted(a) == sorted(b)
    return sorted(x % rank for x in a) == sorted(x % rank for x in b)


def tensor_rank(graph: Graph, shapes: Shapes | None, name: str) -> int | None:
    shape = shapes.shape(name) if shapes is not None else graph.tensors[name].shape
    return None if shape is None else len(shape)


def _constant_operand(graph: Graph, op: Op) -> str | None:
    """``where`` for an optional Mul(gamma)/Add(beta): exactly one operand is a constant."""
    consts = [n for n in op.inputs[:2] if n and graph.tensors[n].is_constant]
    return None if len(consts) == 1 and len(op.inputs) == 2 else f"'{op.name}' has no constant operand"


def _scalar_operand(graph: Graph, op: Op) -> str | None:
    """``where`` for an anchor Add/Mul/Div: one operand is a scalar constant (3, sqrt(2)...)."""
    if len(op.inputs) == 2 and sum(scalar(graph, n) is not None for n in op.inputs) == 1:
        return None
    return f"'{op.name}' has no scalar constant operand"


def _non_constant_operands(graph: Graph, op: Op) -> str | None:
    if any(n and graph.tensors[n].is_constant for n in op.inputs):
        return f"'{op.name}' multiplies by a constant"
    return None


# --- LayerNorm / RMSNorm ---------------------------------------------------------------------------


def _is_square(graph: Graph, op: Op) -> str | None:
    if op.op_type == "Mul":
        return None if len(op.inputs) == 2 and op.inputs[0] == op.inputs[1] else f"'{op.name}' is not Mul(x, x)"
    exponent = scalar(graph, op.inputs[1] if len(op.inputs) > 1 else "")
    return None if _near(exponent, 2.0, 1e-6) else f"'{op.name}' raises to {_fmt(exponent)}, not 2"


def _analyze_norm(shapes: Shapes | None) -> Analyzer:
    def analyze(graph: Graph, m: Match) -> Block | str:
        square, var, add, sqrt = (m.one(r) for r in ("square", "var", "eps", "sqrt"))
        recip, norm = m.one("recip"), m.one("normalize")
        assert square and var and add and sqrt and norm
        d = square.inputs[0]
        _, eps_name = _other(add, _walked(var))
        eps = scalar(graph, eps_name)
        if eps is None or not 0 < eps <= MAX_EPS:
            return f"Add '{add.name}' adds {_fmt(eps)} to the variance, not a small epsilon"
        std = _walked(recip or sqrt)
        if norm.op_type == "Div":
            if recip is not None or norm.inputs[1] != std or norm.inputs[0] != d:
                return f"Div '{norm.name}' does not divide {d} by the standard deviation"
        elif recip is None or _other(norm, std)[1] != d:
            return f"Mul '{norm.name}' does not multiply {d} by 1/std"
        if recip is not None and recip.op_type == "Div" and not _near(scalar(graph, recip.inputs[0]), 1.0):
            return f"Div '{recip.name}' is not 1/std"
        axes = _reduce_axes(graph, var)
        if isinstance(axes, str):
            return axes
        scale, shift = m.one("scale"), m.one("shift")
        ops = [
            square,
            var,
            add,
            sqrt,
            *([recip] if recip else []),
            norm,
            *[op for op in (scale, shift) if op is not None],
        ]
        params = {
            "axes": axes,
            "eps": eps,
            "shift": shift,
            "gamma": _other(scale, _walked(norm))[1] if scale else None,
            "beta": _other(shift, _walked(scale or norm))[1] if shift else None,
        }
        y = ops[-1].outputs[0]
        mean = _layernorm_mean(graph, d, axes, [square, norm], shapes)
        if mean is None:  # RMSNorm, or a LayerNorm whose mean is shared: the spine is RMSNorm(d) either way
            return Block("RMSNorm", ops, d, y, [], params)
        return Block("LayerNorm", [*mean, *ops], mean[1].inputs[0], y, [], params)

    return analyze


def _layernorm_mean(
    graph: Graph, d: str, axes: tuple[int, ...] | None, readers: list[Op], shapes: Shapes | None
) -> list[Op] | None:
    """[ReduceMean, Sub] when ``d`` is ``Sub(x, ReduceMean(x))`` over the variance's axes, privately."""
    sub = _producer(graph, d, "Sub")
    mean = _producer(graph, sub.inputs[1], "ReduceMean") if sub is not None else None
    if sub is None or mean is None or mean.inputs[0] != sub.inputs[0]:
        return None
    mean_axes = _reduce_axes(graph, mean)
    if isinstance(mean_axes, str) or not _same_axes(axes, mean_axes, tensor_rank(graph, shapes, sub.inputs[0])):
        return None
    if _internal(graph, d, readers) or _internal(graph, mean.outputs[0], [sub]):
        return None
    return [mean, sub]


def _norm_pattern(shapes: Shapes | None) -> Pattern:
    return Pattern(
        "layernorm/rmsnorm",
        (
            Step("square", ("Pow", "Mul"), where=_is_square),
            Step("var", ("ReduceMean",)),
            Step("eps", ("Add",), slots=(0, 1)),
            Step("sqrt", ("Sqrt",)),
            Step("recip", ("Reciprocal", "Div"), optional=True, strict=False, slots=(0, 1), where=_is_reciprocal),
            Step("normalize", ("Div", "Mul"), slots=(0, 1)),
            Step("scale", ("Mul",), optional=True, strict=False, slots=(0, 1), where=_constant_operand),
            Step("shift", ("Add",), optional=True, strict=False, slots=(0, 1), where=_constant_operand),
        ),
        check=_checker(_analyze_norm(shapes)),
    )


def _is_reciprocal(graph: Graph, op: Op) -> str | None:
    if op.op_type == "Reciprocal":
        return None
    return None if _near(scalar(graph, op.inputs[0]), 1.0) else f"'{op.name}' is not Div(1, .)"


# --- GELU -------------------------------------------------------------------------------------------


def _gelu_tail(graph: Graph, m: Match, x: str) -> tuple[list[Op], list[tuple[str, float, float]]] | str:
    """The ops that multiply (1 + erf|tanh) by x and 0.5, in the orders exporters write them."""
    one, mul1, mul2 = m.one("one"), m.one("mul1"), m.one("mul2")
    assert one and mul1
    _, other1 = _other(mul1, _walked(one))
    second = _other(mul2, _walked(mul1))[1] if mul2 is not None else None
    if other1 == x or _near(scalar(graph, other1), 0.5):
        want = "0.5" if other1 == x else x
        if mul2 is None or second is None:
            return f"Mul '{mul1.name}' is not followed by a Mul by {want}"
        if other1 == x:
            half = scalar(graph, second)
            if not _near(half, 0.5):
                return f"Mul '{mul2.name}' multiplies by {_fmt(half)}, not 0.5"
            return [mul1, mul2], [_const("0.5", half, 0.5)]
        if second != x:
            return f"Mul '{mul2.name}' does not multiply by the GELU's input {x}"
        return [mul1, mul2], [_const("0.5", scalar(graph, other1), 0.5)]
    half_x = _producer(graph, other1, "Mul")
    if half_x is not None and x in half_x.inputs:
        half = scalar(graph, _other(half_x, x)[1])
        if not _near(half, 0.5):
            return f"Mul '{half_x.name}' multiplies {x} by {_fmt(half)}, not 0.5"
        if why := _internal(graph, other1, [mul1]):
            return why
        return [half_x, mul1], [_const("0.5", half, 0.5)]
    return f"Mul '{mul1.name}' multiplies by {other1}, neither {x} nor 0.5 * {x}"


def _tail_steps() -> tuple[Step, ...]:
    return (
        Step("one", ("Add",), slots=(0, 1)),
        Step("mul1", ("Mul",), slots=(0, 1)),
        Step("mul2", ("Mul",), optional=True, strict=False, slots=(0, 1)),
    )


def _gelu_outer(
    graph: Graph, m: Match, inner: str, x: str
) -> tuple[tuple[str, float, float], list[Op], list[tuple[str, float, float]]] | str:
    """What both GELU forms share around erf/tanh: the ``+ 1`` and the ``0.5 * x *`` tail (or why not)."""
    one = _check_one(graph, m, inner)
    if isinstance(one, str):
        return one
    tail = _gelu_tail(graph, m, x)
    if isinstance(tail, str):
        return tail
    return one, tail[0], tail[1]


def _check_one(graph: Graph, m: Match, before: str) -> tuple[str, float, float] | str:
    one = m.one("one")
    assert one
    prev = m.one(before)
    assert prev
    value = scalar(graph, _other(one, _walked(prev))[1])
    if not _near(value, 1.0):
        return f"Add '{one.name}' adds {_fmt(value)}, not 1"
    return _const("1", value, 1.0)


def _analyze_gelu_erf(graph: Graph, m: Match) -> Block | str:
    scale, erf = m.one("scale"), m.one("erf")
    assert scale and erf
    if scale.op_type == "Div":
        x, value, want, what = scale.inputs[0], scalar(graph, scale.inputs[1]), math.sqrt(2.0), "sqrt(2)"
    else:
        consts = [n for n in scale.inputs if graph.tensors[n].is_constant]
        if len(consts) != 1:
            return f"Mul '{scale.name}' does not scale by a constant"
        x = _other(scale, consts[0])[1]
        value, want, what = scalar(graph, consts[0]), math.sqrt(0.5), "1/sqrt(2)"
    if not _near(value, want):
        return f"{scale.op_type} '{scale.name}' scales by {_fmt(value)}, not {what} ({want:.7g})"
    common = _gelu_outer(graph, m, "erf", x)
    if isinstance(common, str):
        return common
    one, tail_ops, tail_consts = common
    y = tail_ops[-1].outputs[0]
    ops = [scale, erf, *m.all("one"), *tail_ops]
    return Block("GELU(erf)", ops, x, y, [_const(what, value, want), one, *tail_consts], {"approximate": "none"})


def _is_cube_start(graph: Graph, op: Op) -> str | None:
    """``where`` for GELU(tanh)'s anchor: Pow(x, constant) or Mul(x, x)."""
    if op.op_type == "Mul":
        return None if len(op.inputs) == 2 and op.inputs[0] == op.inputs[1] else f"'{op.name}' is not Mul(x, x)"
    return None if scalar(graph, op.inputs[1]) is not None else f"'{op.name}' has no constant exponent"


def _analyze_gelu_tanh(graph: Graph, m: Match) -> Block | str:
    cube, cube2, coef, inner, k, tanh = (m.one(r) for r in ("cube", "cube2", "coef", "inner", "k", "tanh"))
    assert cube and coef and inner and k and tanh
    x = cube.inputs[0]
    if cube.op_type == "Pow":
        exponent = scalar(graph, cube.inputs[1])
        if not _near(exponent, 3.0, 1e-6):
            return f"Pow '{cube.name}' raises to {_fmt(exponent)}, not 3"
        if cube2 is not None:
            return f"Mul '{cube2.name}' multiplies x^3 by another tensor"
    elif cube.inputs[0] != cube.inputs[1]:
        return f"Mul '{cube.name}' is not Mul(x, x)"
    elif cube2 is None or _other(cube2, _walked(cube))[1] != x:
        return f"x^2 from '{cube.name}' is not multiplied by {x} again"
    c = scalar(graph, _other(coef, _walked(cube2 or cube))[1])
    if not _near(c, 0.044715):
        return f"Mul '{coef.name}' multiplies x^3 by {_fmt(c)}, not 0.044715"
    if _other(inner, _walked(coef))[1] != x:
        return f"Add '{inner.name}' does not add {x}"
    kv = scalar(graph, _other(k, _walked(inner))[1])
    if not _near(kv, math.sqrt(2 / math.pi)):
        return f"Mul '{k.name}' multiplies by {_fmt(kv)}, not sqrt(2/pi) (0.7978846)"
    common = _gelu_outer(graph, m, "tanh", x)
    if isinstance(common, str):
        return common
    one, ops, consts = common
    y = ops[-1].outputs[0]
    ops = [cube, *([cube2] if cube2 else []), coef, inner, k, tanh, *m.all("one"), *ops]
    return Block(
        "GELU(tanh)",
        ops,
        x,
        y,
        [_const("0.044715", c, 0.044715), _const("sqrt(2/pi)", kv, math.sqrt(2 / math.pi)), one, *consts],
        {"approximate": "tanh"},
    )


GELU_ERF = Pattern(
    "gelu-erf",
    (
        Step("scale", ("Div", "Mul"), where=_scalar_operand),
        Step("erf", ("Erf",)),
        *_tail_steps(),
    ),
    check=lambda g, m: _why(_analyze_gelu_erf(g, m)),
)

GELU_TANH = Pattern(
    "gelu-tanh",
    (
        Step("cube", ("Pow", "Mul"), where=_is_cube_start),
        Step("cube2", ("Mul",), optional=True, strict=False, slots=(0, 1), where=_non_constant_operands),
        Step("coef", ("Mul",), slots=(0, 1)),
        Step("inner", ("Add",), slots=(0, 1)),
        Step("k", ("Mul",), slots=(0, 1)),
        Step("tanh", ("Tanh",)),
        *_tail_steps(),
    ),
    check=lambda g, m: _why(_analyze_gelu_tanh(g, m)),
)


# --- Softmax ----------------------------------------------------------------------------------------


def _analyze_softmax(shapes: Shapes | None) -> Analyzer:
    def analyze(graph: Graph, m: Match) -> Block | str:
        total, recip, div = m.one("sum"), m.one("recip"), m.one("div")
        assert total and div
        e = total.inputs[0]
        exp = _producer(graph, e, "Exp")
        if exp is None:
            return f"ReduceSum '{total.name}' does not sum an Exp"
        if div.op_type == "Div":
            if recip is not None or div.inputs[0] != e or div.inputs[1] != total.outputs[0]:
                return f"Div '{div.name}' does not divide {e} by its sum"
        elif recip is None or _other(div, recip.outputs[0])[1] != e:
            return f"Mul '{div.name}' does not multiply {e} by 1/sum"
        if why := _internal(graph, e, [total, div]):
            return why
        axes = _reduce_axes(graph, total)
        if isinstance(axes, str):
            return axes
        ops = [exp, total, *([recip] if recip else []), div]
        x = exp.inputs[0]
        sub = _producer(graph, x, "Sub")
        top = _producer(graph, sub.inputs[1], "ReduceMax") if sub is not None else None
        if (
            sub is not None
            and top is not None
            and top.inputs[0] == sub.inputs[0]
            and _internal(graph, x, [exp]) is None
            and _internal(graph, top.outputs[0], [sub]) is None
        ):
            max_axes = _reduce_axes(graph, top)
            if not isinstance(max_axes, str) and _same_axes(axes, max_axes, tensor_rank(graph, shapes, sub.inputs[0])):
                ops = [top, sub, *ops]
                x = sub.inputs[0]
        return Block("Softmax", ops, x, div.outputs[0], [], {"axes": axes})

    return analyze


def _softmax_pattern(shapes: Shapes | None) -> Pattern:
    return Pattern(
        "softmax",
        (
            Step("sum", ("ReduceSum",)),
            Step("recip", ("Reciprocal",), optional=True),
            Step("div", ("Div", "Mul"), slots=(0, 1)),
        ),
        check=_checker(_analyze_softmax(shapes)),
    )


# --- HardSwish --------------------------------------------------------------------------------------


def _clip_bounds(graph: Graph, clip: Op) -> tuple[float | None, float | None]:
    if len(clip.inputs) > 1 or not ("min" in clip.attributes or "max" in clip.attributes):
        lo = scalar(graph, clip.inputs[1]) if len(clip.inputs) > 1 else None
        hi = scalar(graph, clip.inputs[2]) if len(clip.inputs) > 2 else None
        return lo, hi
    return float(clip.attr("min", -np.inf)), float(clip.attr("max", np.inf))


def _by_six(graph: Graph, op: Op, walked: str) -> tuple[str, float, float] | str:
    """``op`` divides the walked tensor by 6 (Div by 6 or Mul by 1/6)."""
    if op.op_type == "Div":
        if op.inputs[0] != walked:
            return f"Div '{op.name}' divides by the tensor"
        value = scalar(graph, op.inputs[1])
        return _const("6", value, 6.0) if _near(value, 6.0) else f"Div '{op.name}' divides by {_fmt(value)}, not 6"
    value = scalar(graph, _other(op, walked)[1])
    if _near(value, 1 / 6):
        return _const("1/6", value, 1 / 6)
    return f"Mul '{op.name}' multiplies by {_fmt(value)}, not 1/6"


def _analyze_hardswish(graph: Graph, m: Match) -> Block | str:
    add, clip, m1, m2 = m.one("add3"), m.one("clip"), m.one("m1"), m.one("m2")
    assert add and clip and m1
    consts = [n for n in add.inputs if graph.tensors[n].is_constant]
    if len(consts) != 1 or len(add.inputs) != 2:
        return f"Add '{add.name}' does not add a constant"
    x = _other(add, consts[0])[1]
    three = scalar(graph, consts[0])
    if not _near(three, 3.0):
        return f"Add '{add.name}' adds {_fmt(three)}, not 3"
    lo, hi = _clip_bounds(graph, clip)
    if lo is None or hi is None or lo != 0.0 or not _near(hi, 6.0):
        return f"Clip '{clip.name}' clips to [{_fmt(lo)}, {_fmt(hi)}], not [0, 6]"
    if m2 is None:
        return f"{m1.op_type} '{m1.name}' is not followed by the other half of x * relu6(x + 3) / 6"
    if m1.op_type == "Mul" and _other(m1, _walked(clip))[1] == x:
        six = _by_six(graph, m2, _walked(m1))
    else:
        six = _by_six(graph, m1, _walked(clip))
        if not isinstance(six, str) and (m2.op_type != "Mul" or _other(m2, _walked(m1))[1] != x):
            return f"{m2.op_type} '{m2.name}' does not multiply by the HardSwish's input {x}"
    if isinstance(six, str):
        return six
    return Block(
        "HardSwish", [add, clip, m1, m2], x, m2.outputs[0], [_const("3", three, 3.0), _const("6", hi, 6.0), six], {}
    )


def _analyze_hardsigmoid_mul(graph: Graph, m: Match) -> Block | str:
    hsig, mul = m.one("hsig"), m.one("mul")
    assert hsig and mul
    alpha, beta = float(hsig.attr("alpha", 0.2)), float(hsig.attr("beta", 0.5))
    if not (_near(alpha, 1 / 6) and _near(beta, 0.5)):
        return f"HardSigmoid '{hsig.name}' has alpha={alpha:.7g}, beta={beta:.7g}, not 1/6, 0.5"
    x = hsig.inputs[0]
    if _other(mul, _walked(hsig))[1] != x:
        return f"Mul '{mul.name}' does not multiply by the HardSigmoid's input {x}"
    return Block("HardSwish", [hsig, mul], x, mul.outputs[0], [("alpha", alpha, 1 / 6), ("beta", beta, 0.5)], {})


HARDSWISH = Pattern(
    "hardswish",
    (
        Step("add3", ("Add",), where=_scalar_operand),
        Step("clip", ("Clip",)),
        Step("m1", ("Mul", "Div"), slots=(0, 1)),
        Step("m2", ("Mul", "Div"), optional=True, strict=False, slots=(0, 1)),
    ),
    check=lambda g, m: _why(_analyze_hardswish(g, m)),
)

HARDSIGMOID_MUL = Pattern(
    "hardsigmoid-mul",
    (
        Step("hsig", ("HardSigmoid",)),
        Step("mul", ("Mul",), slots=(0, 1)),
    ),
    check=lambda g, m: _why(_analyze_hardsigmoid_mul(g, m)),
)


# --- helpers for the patterns -----------------------------------------------------------------------


def _why(result: Block | str) -> str | None:
    return result if isinstance(result, str) else None


def _checker(analyze: Analyzer) -> Callable[[Graph, Match], str | None]:
    return lambda graph, m: _why(analyze(graph, m))


# Ops that make a walk look like one of the blocks (a ReduceSum -> Div or Mul -> Mul alone does not).
SIGNATURE_OPS = frozenset({"ReduceMean", "Erf", "Tanh", "Clip", "Exp", "HardSigmoid"})


def _worth_reporting(miss: NearMiss) -> bool:
    """A near miss that got into a block (past its anchor, through a signature op), not a type mismatch."""
    return miss.kind != "mismatch" and len(miss.ops) >= 2 and any(op.op_type in SIGNATURE_OPS for op in miss.ops)


def find_blocks(graph: Graph, shapes: Shapes | None = None) -> tuple[list[Block], list[NearMiss]]:
    """Every decomposed block (no op in two), and the near misses worth a remark."""
    analyzers: list[tuple[Pattern, Analyzer]] = [
        (_norm_pattern(shapes), _analyze_norm(shapes)),
        (GELU_ERF, _analyze_gelu_erf),
        (GELU_TANH, _analyze_gelu_tanh),
        (_softmax_pattern(shapes), _analyze_softmax(shapes)),
        (HARDSWISH, _analyze_hardswish),
        (HARDSIGMOID_MUL, _analyze_hardsigmoid_mul),
    ]
    blocks: list[Block] = []
    misses: list[NearMiss] = []
    claimed: set[int] = set()
    position = {op.id: i for i, op in enumerate(graph.ops)}
    for op in graph.ops:
        if op.id in claimed:
            continue
        for pattern, analyze in analyzers:
            result = pattern.match(graph, op)
            if isinstance(result, NearMiss):
                if _worth_reporting(result):
                    misses.append(result)
                continue
            if result is None:
                continue
            block = analyze(graph, result)
            assert isinstance(block, Block)
            if any(o.id in claimed for o in block.ops):
                continue
            block.ops.sort(key=lambda o: position[o.id])
            claimed.update(o.id for o in block.ops)
            blocks.append(block)
            break
    return blocks, misses
