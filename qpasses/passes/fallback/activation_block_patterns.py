"""GELU (Erf or tanh/x^3 form) and HardSwish (Mul/Clip, or HardSigmoid*x) decomposed into primitives,
recognized with the pattern matcher.

Exporters write these activations' constants rounded (0.7978846, 1.4142135...) and their products
in several orders; each analyzer accepts the orders seen in the wild, checks every constant against
its exact value (kept on the block for the fusion's exactness check) and otherwise says which op
breaks the form.
"""

from __future__ import annotations

import math

import numpy as np

from graph_ir import Graph, Op
from qpasses.core.patterns import Match, Pattern, Step
from qpasses.passes.fallback.block_matching import (
    Block,
    checked_constant,
    failure,
    fmt,
    near,
    other_operand,
    producer_of,
    scalar,
    scalar_operand,
    walked_from,
    why_not_private,
)

# --- GELU -------------------------------------------------------------------------------------------


def _gelu_tail(graph: Graph, m: Match, x: str) -> tuple[list[Op], list[tuple[str, float, float]]] | str:
    """The ops that multiply (1 + erf|tanh) by x and 0.5, in the orders exporters write them."""
    one, mul1, mul2 = m.one("one"), m.one("mul1"), m.one("mul2")
    assert one and mul1
    _, other1 = other_operand(mul1, walked_from(one))
    second = other_operand(mul2, walked_from(mul1))[1] if mul2 is not None else None
    if other1 == x or near(scalar(graph, other1), 0.5):
        want = "0.5" if other1 == x else x
        if mul2 is None or second is None:
            return f"Mul '{mul1.name}' is not followed by a Mul by {want}"
        if other1 == x:
            half = scalar(graph, second)
            if not near(half, 0.5):
                return f"Mul '{mul2.name}' multiplies by {fmt(half)}, not 0.5"
            return [mul1, mul2], [checked_constant("0.5", half, 0.5)]
        if second != x:
            return f"Mul '{mul2.name}' does not multiply by the GELU's input {x}"
        return [mul1, mul2], [checked_constant("0.5", scalar(graph, other1), 0.5)]
    half_x = producer_of(graph, other1, "Mul")
    if half_x is not None and x in half_x.inputs:
        half = scalar(graph, other_operand(half_x, x)[1])
        if not near(half, 0.5):
            return f"Mul '{half_x.name}' multiplies {x} by {fmt(half)}, not 0.5"
        if why := why_not_private(graph, other1, [mul1]):
            return why
        return [half_x, mul1], [checked_constant("0.5", half, 0.5)]
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
    value = scalar(graph, other_operand(one, walked_from(prev))[1])
    if not near(value, 1.0):
        return f"Add '{one.name}' adds {fmt(value)}, not 1"
    return checked_constant("1", value, 1.0)


def analyze_gelu_erf(graph: Graph, m: Match) -> Block | str:
    scale, erf = m.one("scale"), m.one("erf")
    assert scale and erf
    if scale.op_type == "Div":
        x, value, want, what = scale.inputs[0], scalar(graph, scale.inputs[1]), math.sqrt(2.0), "sqrt(2)"
    else:
        consts = [n for n in scale.inputs if graph.tensors[n].is_constant]
        if len(consts) != 1:
            return f"Mul '{scale.name}' does not scale by a constant"
        x = other_operand(scale, consts[0])[1]
        value, want, what = scalar(graph, consts[0]), math.sqrt(0.5), "1/sqrt(2)"
    if not near(value, want):
        return f"{scale.op_type} '{scale.name}' scales by {fmt(value)}, not {what} ({want:.7g})"
    common = _gelu_outer(graph, m, "erf", x)
    if isinstance(common, str):
        return common
    one, tail_ops, tail_consts = common
    y = tail_ops[-1].outputs[0]
    ops = [scale, erf, *m.all("one"), *tail_ops]
    return Block(
        "GELU(erf)", ops, x, y, [checked_constant(what, value, want), one, *tail_consts], {"approximate": "none"}
    )


def _non_constant_operands(graph: Graph, op: Op) -> str | None:
    if any(n and graph.tensors[n].is_constant for n in op.inputs):
        return f"'{op.name}' multiplies by a constant"
    return None


def _is_cube_start(graph: Graph, op: Op) -> str | None:
    """``where`` for GELU(tanh)'s anchor: Pow(x, constant) or Mul(x, x)."""
    if op.op_type == "Mul":
        return None if len(op.inputs) == 2 and op.inputs[0] == op.inputs[1] else f"'{op.name}' is not Mul(x, x)"
    return None if scalar(graph, op.inputs[1]) is not None else f"'{op.name}' has no constant exponent"


def analyze_gelu_tanh(graph: Graph, m: Match) -> Block | str:
    cube, cube2, coef, inner, k, tanh = (m.one(r) for r in ("cube", "cube2", "coef", "inner", "k", "tanh"))
    assert cube and coef and inner and k and tanh
    x = cube.inputs[0]
    if cube.op_type == "Pow":
        exponent = scalar(graph, cube.inputs[1])
        if not near(exponent, 3.0, 1e-6):
            return f"Pow '{cube.name}' raises to {fmt(exponent)}, not 3"
        if cube2 is not None:
            return f"Mul '{cube2.name}' multiplies x^3 by another tensor"
    elif cube.inputs[0] != cube.inputs[1]:
        return f"Mul '{cube.name}' is not Mul(x, x)"
    elif cube2 is None or other_operand(cube2, walked_from(cube))[1] != x:
        return f"x^2 from '{cube.name}' is not multiplied by {x} again"
    c = scalar(graph, other_operand(coef, walked_from(cube2 or cube))[1])
    if not near(c, 0.044715):
        return f"Mul '{coef.name}' multiplies x^3 by {fmt(c)}, not 0.044715"
    if other_operand(inner, walked_from(coef))[1] != x:
        return f"Add '{inner.name}' does not add {x}"
    kv = scalar(graph, other_operand(k, walked_from(inner))[1])
    if not near(kv, math.sqrt(2 / math.pi)):
        return f"Mul '{k.name}' multiplies by {fmt(kv)}, not sqrt(2/pi) (0.7978846)"
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
        [
            checked_constant("0.044715", c, 0.044715),
            checked_constant("sqrt(2/pi)", kv, math.sqrt(2 / math.pi)),
            one,
            *consts,
        ],
        {"approximate": "tanh"},
    )


GELU_ERF = Pattern(
    "gelu-erf",
    (
        Step("scale", ("Div", "Mul"), where=scalar_operand),
        Step("erf", ("Erf",)),
        *_tail_steps(),
    ),
    check=lambda g, m: failure(analyze_gelu_erf(g, m)),
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
    check=lambda g, m: failure(analyze_gelu_tanh(g, m)),
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
        return (
            checked_constant("6", value, 6.0) if near(value, 6.0) else f"Div '{op.name}' divides by {fmt(value)}, not 6"
        )
    value = scalar(graph, other_operand(op, walked)[1])
    if near(value, 1 / 6):
        return checked_constant("1/6", value, 1 / 6)
    return f"Mul '{op.name}' multiplies by {fmt(value)}, not 1/6"


def analyze_hardswish(graph: Graph, m: Match) -> Block | str:
    add, clip, m1, m2 = m.one("add3"), m.one("clip"), m.one("m1"), m.one("m2")
    assert add and clip and m1
    consts = [n for n in add.inputs if graph.tensors[n].is_constant]
    if len(consts) != 1 or len(add.inputs) != 2:
        return f"Add '{add.name}' does not add a constant"
    x = other_operand(add, consts[0])[1]
    three = scalar(graph, consts[0])
    if not near(three, 3.0):
        return f"Add '{add.name}' adds {fmt(three)}, not 3"
    lo, hi = _clip_bounds(graph, clip)
    if lo is None or hi is None or lo != 0.0 or not near(hi, 6.0):
        return f"Clip '{clip.name}' clips to [{fmt(lo)}, {fmt(hi)}], not [0, 6]"
    if m2 is None:
        return f"{m1.op_type} '{m1.name}' is not followed by the other half of x * relu6(x + 3) / 6"
    if m1.op_type == "Mul" and other_operand(m1, walked_from(clip))[1] == x:
        six = _by_six(graph, m2, walked_from(m1))
    else:
        six = _by_six(graph, m1, walked_from(clip))
        if not isinstance(six, str) and (m2.op_type != "Mul" or other_operand(m2, walked_from(m1))[1] != x):
            return f"{m2.op_type} '{m2.name}' does not multiply by the HardSwish's input {x}"
    if isinstance(six, str):
        return six
    return Block(
        "HardSwish",
        [add, clip, m1, m2],
        x,
        m2.outputs[0],
        [checked_constant("3", three, 3.0), checked_constant("6", hi, 6.0), six],
        {},
    )


def analyze_hardsigmoid_mul(graph: Graph, m: Match) -> Block | str:
    hsig, mul = m.one("hsig"), m.one("mul")
    assert hsig and mul
    alpha, beta = float(hsig.attr("alpha", 0.2)), float(hsig.attr("beta", 0.5))
    if not (near(alpha, 1 / 6) and near(beta, 0.5)):
        return f"HardSigmoid '{hsig.name}' has alpha={alpha:.7g}, beta={beta:.7g}, not 1/6, 0.5"
    x = hsig.inputs[0]
    if other_operand(mul, walked_from(hsig))[1] != x:
        return f"Mul '{mul.name}' does not multiply by the HardSigmoid's input {x}"
    return Block("HardSwish", [hsig, mul], x, mul.outputs[0], [("alpha", alpha, 1 / 6), ("beta", beta, 0.5)], {})


HARDSWISH = Pattern(
    "hardswish",
    (
        Step("add3", ("Add",), where=scalar_operand),
        Step("clip", ("Clip",)),
        Step("m1", ("Mul", "Div"), slots=(0, 1)),
        Step("m2", ("Mul", "Div"), optional=True, strict=False, slots=(0, 1)),
    ),
    check=lambda g, m: failure(analyze_hardswish(g, m)),
)

HARDSIGMOID_MUL = Pattern(
    "hardsigmoid-mul",
    (
        Step("hsig", ("HardSigmoid",)),
        Step("mul", ("Mul",), slots=(0, 1)),
    ),
    check=lambda g, m: failure(analyze_hardsigmoid_mul(g, m)),
)
