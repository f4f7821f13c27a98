"""LayerNorm/RMSNorm and Softmax decomposed into primitives, recognized with the pattern matcher.

Both are reductions over the same axes around an elementwise spine: ``(x - mean) / sqrt(var + eps)``
(a LayerNorm whose mean is shared, or absent, is an RMSNorm of ``d``) and ``exp(x) / sum(exp(x))``
(with the ``x - max`` stabilisation when it is private to the block). The axes come from the
reduce ops and are checked to agree, given the rank.
"""

from __future__ import annotations

from graph_ir import Graph, Op
from qpasses.core.analyses import Shapes
from qpasses.core.patterns import Match, Pattern, Step
from qpasses.passes.fallback.block_matching import (
    MAX_EPS,
    Analyzer,
    Block,
    checker,
    constant_operand,
    fmt,
    near,
    other_operand,
    producer_of,
    reduce_axes,
    same_axes,
    scalar,
    tensor_rank,
    walked_from,
    why_not_private,
)

# --- LayerNorm / RMSNorm ---------------------------------------------------------------------------


def _is_square(graph: Graph, op: Op) -> str | None:
    if op.op_type == "Mul":
        return None if len(op.inputs) == 2 and op.inputs[0] == op.inputs[1] else f"'{op.name}' is not Mul(x, x)"
    exponent = scalar(graph, op.inputs[1] if len(op.inputs) > 1 else "")
    return None if near(exponent, 2.0, 1e-6) else f"'{op.name}' raises to {fmt(exponent)}, not 2"


def analyze_norm(shapes: Shapes | None) -> Analyzer:
    def analyze(graph: Graph, m: Match) -> Block | str:
        square, var, add, sqrt = (m.one(r) for r in ("square", "var", "eps", "sqrt"))
        recip, norm = m.one("recip"), m.one("normalize")
        assert square and var and add and sqrt and norm
        d = square.inputs[0]
        _, eps_name = other_operand(add, walked_from(var))
        eps = scalar(graph, eps_name)
        if eps is None or not 0 < eps <= MAX_EPS:
            return f"Add '{add.name}' adds {fmt(eps)} to the variance, not a small epsilon"
        std = walked_from(recip or sqrt)
        if norm.op_type == "Div":
            if recip is not None or norm.inputs[1] != std or norm.inputs[0] != d:
                return f"Div '{norm.name}' does not divide {d} by the standard deviation"
        elif recip is None or other_operand(norm, std)[1] != d:
            return f"Mul '{norm.name}' does not multiply {d} by 1/std"
        if recip is not None and recip.op_type == "Div" and not near(scalar(graph, recip.inputs[0]), 1.0):
            return f"Div '{recip.name}' is not 1/std"
        axes = reduce_axes(graph, var)
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
            "gamma": other_operand(scale, walked_from(norm))[1] if scale else None,
            "beta": other_operand(shift, walked_from(scale or norm))[1] if shift else None,
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
    sub = producer_of(graph, d, "Sub")
    mean = producer_of(graph, sub.inputs[1], "ReduceMean") if sub is not None else None
    if sub is None or mean is None or mean.inputs[0] != sub.inputs[0]:
        return None
    mean_axes = reduce_axes(graph, mean)
    if isinstance(mean_axes, str) or not same_axes(axes, mean_axes, tensor_rank(graph, shapes, sub.inputs[0])):
        return None
    if why_not_private(graph, d, readers) or why_not_private(graph, mean.outputs[0], [sub]):
        return None
    return [mean, sub]


def norm_pattern(shapes: Shapes | None) -> Pattern:
    return Pattern(
        "layernorm/rmsnorm",
        (
            Step("square", ("Pow", "Mul"), where=_is_square),
            Step("var", ("ReduceMean",)),
            Step("eps", ("Add",), slots=(0, 1)),
            Step("sqrt", ("Sqrt",)),
            Step("recip", ("Reciprocal", "Div"), optional=True, strict=False, slots=(0, 1), where=_is_reciprocal),
            Step("normalize", ("Div", "Mul"), slots=(0, 1)),
            Step("scale", ("Mul",), optional=True, strict=False, slots=(0, 1), where=constant_operand),
            Step("shift", ("Add",), optional=True, strict=False, slots=(0, 1), where=constant_operand),
        ),
        check=checker(analyze_norm(shapes)),
    )


def _is_reciprocal(graph: Graph, op: Op) -> str | None:
    if op.op_type == "Reciprocal":
        return None
    return None if near(scalar(graph, op.inputs[0]), 1.0) else f"'{op.name}' is not Div(1, .)"


# --- Softmax ----------------------------------------------------------------------------------------


def analyze_softmax(shapes: Shapes | None) -> Analyzer:
    def analyze(graph: Graph, m: Match) -> Block | str:
        total, recip, div = m.one("sum"), m.one("recip"), m.one("div")
        assert total and div
        e = total.inputs[0]
        exp = producer_of(graph, e, "Exp")
        if exp is None:
            return f"ReduceSum '{total.name}' does not sum an Exp"
        if div.op_type == "Div":
            if recip is not None or div.inputs[0] != e or div.inputs[1] != total.outputs[0]:
                return f"Div '{div.name}' does not divide {e} by its sum"
        elif recip is None or other_operand(div, recip.outputs[0])[1] != e:
            return f"Mul '{div.name}' does not multiply {e} by 1/sum"
        if why := why_not_private(graph, e, [total, div]):
            return why
        axes = reduce_axes(graph, total)
        if isinstance(axes, str):
            return axes
        ops = [exp, total, *([recip] if recip else []), div]
        x = exp.inputs[0]
        sub = producer_of(graph, x, "Sub")
        top = producer_of(graph, sub.inputs[1], "ReduceMax") if sub is not None else None
        if (
            sub is not None
            and top is not None
            and top.inputs[0] == sub.inputs[0]
            and why_not_private(graph, x, [exp]) is None
            and why_not_private(graph, top.outputs[0], [sub]) is None
        ):
            max_axes = reduce_axes(graph, top)
            if not isinstance(max_axes, str) and same_axes(axes, max_axes, tensor_rank(graph, shapes, sub.inputs[0])):
                ops = [top, sub, *ops]
                x = sub.inputs[0]
        return Block("Softmax", ops, x, div.outputs[0], [], {"axes": axes})

    return analyze


def softmax_pattern(shapes: Shapes | None) -> Pattern:
    return Pattern(
        "softmax",
        (
            Step("sum", ("ReduceSum",)),
            Step("recip", ("Reciprocal",), optional=True),
            Step("div", ("Div", "Mul"), slots=(0, 1)),
        ),
        check=checker(analyze_softmax(shapes)),
    )
