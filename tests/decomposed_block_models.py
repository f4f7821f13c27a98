"""Small generated models, one per decomposed block that exporters build from primitive ops.

Transformer and mobile exporters write LayerNorm, RMSNorm, GELU, Softmax and HardSwish as chains of
ReduceMean/Pow/Sqrt/Erf/Tanh/Exp/Clip... Every model here is ``x -> MatMul -> block -> MatMul -> y``:
the block reads ``b_in`` and writes ``b_out`` (its boundaries, both MatMul-side tensors), and every
tensor inside the block is named ``<prefix>/...`` (``ln/``, ``rms/``, ``gelu/``, ``sm/``, ``hs/``).

Constants are keyword arguments, so a near miss (a wrong epsilon, 0.05 instead of 0.044715...) is
the same model with one value changed. ``transformer_stack`` is the realistic case: MatMul ->
LayerNorm -> MatMul -> GELU(tanh) -> MatMul on tokens whose scale varies by 30x, where 8-bit
variances and cubes collapse.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

SQRT2 = math.sqrt(2.0)
SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
TOKENS, DIM = 16, 32


class _Builder:
    """Nodes and initializers of one model; ``op`` names the node and its output ``<name>``."""

    def __init__(self, seed: int, opset: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.opset = opset
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self._consts = 0

    def const(self, value: float | np.ndarray, dtype: type = np.float32) -> str:
        self._consts += 1
        name = f"c{self._consts}"
        self.inits.append(numpy_helper.from_array(np.asarray(value, dtype), name))
        return name

    def op(self, op_type: str, inputs: list[str], out: str, **attrs: object) -> str:
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=f"{out}_node", **attrs))
        return out

    def reduce(self, op_type: str, x: str, out: str, axes: list[int]) -> str:
        """ReduceMean/Max (axes an input from opset 18) and ReduceSum (from opset 13), keepdims=1."""
        as_input = self.opset >= (13 if op_type == "ReduceSum" else 18)
        if as_input:
            return self.op(op_type, [x, self.const(np.array(axes), np.int64)], out, keepdims=1)
        return self.op(op_type, [x], out, axes=axes, keepdims=1)

    def matmul(self, x: str, out: str, cin: int, cout: int) -> str:
        w = (self.rng.standard_normal((cin, cout)) / np.sqrt(cin)).astype(np.float32)
        return self.op("MatMul", [x, self.const(w)], out)

    def model(self, dim_out: int = DIM) -> onnx.ModelProto:
        graph = helper.make_graph(
            self.nodes,
            "decomposed_block",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, TOKENS, DIM])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, TOKENS, dim_out])],
            self.inits,
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", self.opset)])
        model.ir_version = 8 if self.opset <= 17 else 9 if self.opset <= 20 else 10
        onnx.checker.check_model(model, full_check=True)
        return model


def _wrap(block, seed: int, opset: int) -> onnx.ModelProto:  # noqa: ANN001 - a builder callback
    """x -> MatMul -> block(b_in) -> b_out -> MatMul -> y."""
    b = _Builder(seed, opset)
    b.matmul("x", "b_in", DIM, DIM)
    block(b, "b_in", "b_out")
    b.matmul("b_out", "y", DIM, DIM)
    return b.model()


def _square(b: _Builder, x: str, out: str, variant: str) -> str:
    if variant == "mul":
        return b.op("Mul", [x, x], out)
    return b.op("Pow", [x, b.const(2.0)], out)


def _normalize(b: _Builder, d: str, var: str, p: str, eps: float, variant: str, out: str) -> str:
    """var -> Add(eps) -> Sqrt -> Div(d, std), or Reciprocal -> Mul(d, r)."""
    b.op("Add", [var, b.const(eps)], f"{p}/var_eps")
    b.op("Sqrt", [f"{p}/var_eps"], f"{p}/std")
    if variant == "reciprocal":
        b.op("Reciprocal", [f"{p}/std"], f"{p}/inv_std")
        return b.op("Mul", [d, f"{p}/inv_std"], out)
    return b.op("Div", [d, f"{p}/std"], out)


def _layernorm_block(
    b: _Builder,
    x: str,
    out: str,
    *,
    variant: str = "pow",
    eps: float = 1e-5,
    affine: bool = True,
    square_exponent: float = 2.0,
) -> None:
    p = "ln"
    b.reduce("ReduceMean", x, f"{p}/mean", [-1])
    b.op("Sub", [x, f"{p}/mean"], f"{p}/d")
    if square_exponent != 2.0:
        b.op("Pow", [f"{p}/d", b.const(square_exponent)], f"{p}/d2")
    else:
        _square(b, f"{p}/d", f"{p}/d2", variant)
    b.reduce("ReduceMean", f"{p}/d2", f"{p}/var", [-1])
    if not affine:
        _normalize(b, f"{p}/d", f"{p}/var", p, eps, variant, out)
        return
    _normalize(b, f"{p}/d", f"{p}/var", p, eps, variant, f"{p}/norm")
    b.op("Mul", [f"{p}/norm", b.const(b.rng.uniform(0.5, 1.5, DIM))], f"{p}/scaled")
    b.op("Add", [f"{p}/scaled", b.const(b.rng.uniform(-0.2, 0.2, DIM))], out)


def layernorm(
    seed: int = 0,
    *,
    opset: int = 13,
    variant: str = "pow",
    eps: float = 1e-5,
    affine: bool = True,
    square_exponent: float = 2.0,
) -> onnx.ModelProto:
    """ReduceMean -> Sub -> Pow(2)|Mul(d,d) -> ReduceMean -> Add(eps) -> Sqrt -> Div|Reciprocal+Mul
    [-> Mul(gamma) -> Add(beta)]. ``variant``: pow, mul, reciprocal; opset 18 gives ReduceMean axes as input."""
    return _wrap(
        lambda b, x, out: _layernorm_block(
            b, x, out, variant=variant, eps=eps, affine=affine, square_exponent=square_exponent
        ),
        seed,
        opset,
    )


def rmsnorm(
    seed: int = 0, *, opset: int = 13, variant: str = "pow", eps: float = 1e-6, gamma: bool = True
) -> onnx.ModelProto:
    """Pow(x, 2)|Mul(x, x) -> ReduceMean -> Add(eps) -> Sqrt -> Div(x, .)|Reciprocal+Mul [-> Mul(gamma)]."""

    def block(b: _Builder, x: str, out: str) -> None:
        p = "rms"
        _square(b, x, f"{p}/x2", variant)
        b.reduce("ReduceMean", f"{p}/x2", f"{p}/ms", [-1])
        if not gamma:
            _normalize(b, x, f"{p}/ms", p, eps, variant, out)
            return
        _normalize(b, x, f"{p}/ms", p, eps, variant, f"{p}/norm")
        b.op("Mul", [f"{p}/norm", b.const(b.rng.uniform(0.5, 1.5, DIM))], out)

    return _wrap(block, seed, opset)


def _gelu_tail(b: _Builder, x: str, one_plus: str, p: str, out: str, order: str, half: float) -> None:
    """(1 + erf|tanh) -> x * . * 0.5 in the orders exporters produce.

    ``x_then_half``: Mul(x, .) -> Mul(0.5) (torch.onnx); ``half_x``: Mul(x, 0.5) computed first, then
    Mul(h, .) (Hugging Face ``0.5 * x * (...)``); ``half_then_x``: Mul(., 0.5) -> Mul(x, .).
    """
    if order == "x_then_half":
        b.op("Mul", [x, one_plus], f"{p}/x_times")
        b.op("Mul", [f"{p}/x_times", b.const(half)], out)
    elif order == "half_x":
        b.op("Mul", [b.const(half), x], f"{p}/half_x")
        b.op("Mul", [f"{p}/half_x", one_plus], out)
    else:
        b.op("Mul", [one_plus, b.const(half)], f"{p}/halved")
        b.op("Mul", [f"{p}/halved", x], out)


def gelu_erf(
    seed: int = 0,
    *,
    opset: int = 13,
    variant: str = "div",
    order: str = "x_then_half",
    sqrt2: float = SQRT2,
    one: float = 1.0,
    half: float = 0.5,
) -> onnx.ModelProto:
    """Div(x, sqrt2)|Mul(x, 1/sqrt2) -> Erf -> Add(1) -> (x, 0.5 in ``order``)."""

    def block(b: _Builder, x: str, out: str) -> None:
        p = "gelu"
        if variant == "mul":
            b.op("Mul", [x, b.const(1.0 / sqrt2)], f"{p}/scaled")
        else:
            b.op("Div", [x, b.const(sqrt2)], f"{p}/scaled")
        b.op("Erf", [f"{p}/scaled"], f"{p}/erf")
        b.op("Add", [f"{p}/erf", b.const(one)], f"{p}/one_plus")
        _gelu_tail(b, x, f"{p}/one_plus", p, out, order, half)

    return _wrap(block, seed, opset)


def _gelu_tanh_block(
    b: _Builder,
    x: str,
    out: str,
    *,
    variant: str = "pow",
    order: str = "x_then_half",
    coef: float = 0.044715,
    k: float = SQRT_2_OVER_PI,
    half: float = 0.5,
) -> None:
    p = "gelu"
    if variant == "mul":
        b.op("Mul", [x, x], f"{p}/x2")
        b.op("Mul", [x, f"{p}/x2"], f"{p}/x3")
    else:
        b.op("Pow", [x, b.const(3.0)], f"{p}/x3")
    b.op("Mul", [f"{p}/x3", b.const(coef)], f"{p}/cubic")
    b.op("Add", [x, f"{p}/cubic"], f"{p}/inner")
    b.op("Mul", [f"{p}/inner", b.const(k)], f"{p}/arg")
    b.op("Tanh", [f"{p}/arg"], f"{p}/tanh")
    b.op("Add", [f"{p}/tanh", b.const(1.0)], f"{p}/one_plus")
    _gelu_tail(b, x, f"{p}/one_plus", p, out, order, half)


def gelu_tanh(
    seed: int = 0,
    *,
    opset: int = 13,
    variant: str = "pow",
    order: str = "x_then_half",
    coef: float = 0.044715,
    k: float = SQRT_2_OVER_PI,
    half: float = 0.5,
) -> onnx.ModelProto:
    """x^3 (Pow(x, 3)|Mul(x, Mul(x, x))) -> Mul(0.044715) -> Add(x) -> Mul(sqrt(2/pi)) -> Tanh -> Add(1) -> tail."""
    return _wrap(
        lambda b, x, out: _gelu_tanh_block(b, x, out, variant=variant, order=order, coef=coef, k=k, half=half),
        seed,
        opset,
    )


def softmax(seed: int = 0, *, opset: int = 13, stable: bool = True) -> onnx.ModelProto:
    """[ReduceMax -> Sub ->] Exp -> ReduceSum -> Div, over the last axis."""

    def block(b: _Builder, x: str, out: str) -> None:
        p = "sm"
        z = x
        if stable:
            b.reduce("ReduceMax", x, f"{p}/max", [-1])
            z = b.op("Sub", [x, f"{p}/max"], f"{p}/shifted")
        b.op("Exp", [z], f"{p}/exp")
        b.reduce("ReduceSum", f"{p}/exp", f"{p}/sum", [-1])
        b.op("Div", [f"{p}/exp", f"{p}/sum"], out)

    return _wrap(block, seed, opset)


def hardswish(
    seed: int = 0, *, opset: int = 13, variant: str = "div", three: float = 3.0, six: float = 6.0
) -> onnx.ModelProto:
    """Mul(x, Clip(Add(x, 3), 0, 6)) / 6. ``variant``: div (Div by 6), mul (Mul by 1/6), sigmoid_first
    (Clip / 6 first, then Mul by x), clip_attrs (Clip's min/max as attributes: opset < 11, Relu6 style),
    hardsigmoid (x * HardSigmoid(x, 1/6, 0.5))."""
    if variant == "clip_attrs":
        opset = min(opset, 10)

    def block(b: _Builder, x: str, out: str) -> None:
        p = "hs"
        if variant == "hardsigmoid":
            b.op("HardSigmoid", [x], f"{p}/hsig", alpha=1.0 / six, beta=three / six)
            b.op("Mul", [x, f"{p}/hsig"], out)
            return
        b.op("Add", [x, b.const(three)], f"{p}/shifted")
        if variant == "clip_attrs":
            b.op("Clip", [f"{p}/shifted"], f"{p}/relu6", min=0.0, max=six)
        else:
            b.op("Clip", [f"{p}/shifted", b.const(0.0), b.const(six)], f"{p}/relu6")
        if variant == "sigmoid_first":
            b.op("Div", [f"{p}/relu6", b.const(six)], f"{p}/hsig")
            b.op("Mul", [x, f"{p}/hsig"], out)
            return
        b.op("Mul", [x, f"{p}/relu6"], f"{p}/x_relu6")
        if variant == "mul":
            b.op("Mul", [f"{p}/x_relu6", b.const(1.0 / six)], out)
        else:
            b.op("Div", [f"{p}/x_relu6", b.const(six)], out)

    return _wrap(block, seed, opset)


def transformer_stack(seed: int = 0, *, opset: int = 13, gelu_variant: str = "pow") -> onnx.ModelProto:
    """MatMul -> LayerNorm (ln/) -> MatMul -> GELU(tanh) (gelu/) -> MatMul: a transformer MLP.

    Boundaries: ``ln_in`` -> [LayerNorm] -> ``ln_out`` -> MatMul -> ``gelu_in`` -> [GELU] -> ``gelu_out``.
    """
    b = _Builder(seed, opset)
    b.matmul("x", "ln_in", DIM, DIM)
    _layernorm_block(b, "ln_in", "ln_out")
    b.matmul("ln_out", "gelu_in", DIM, 2 * DIM)
    _gelu_tanh_block(b, "gelu_in", "gelu_out", variant=gelu_variant)
    b.matmul("gelu_out", "y", 2 * DIM, DIM)
    return b.model()


def token_feeds(n: int, seed: int = 1, *, spread: float = 30.0) -> list[dict[str, np.ndarray]]:
    """Feeds for ``x`` [1, TOKENS, DIM] whose per-token scale is log-uniform over ``spread``x
    (activation outliers: some tokens carry 30x the amplitude of others)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        scale = np.exp(rng.uniform(0.0, np.log(spread), (1, TOKENS, 1))) / np.sqrt(spread)
        out.append({"x": (rng.standard_normal((1, TOKENS, DIM)) * scale).astype(np.float32)})
    return out


def feeds(n: int, seed: int = 1) -> list[dict[str, np.ndarray]]:
    """Plain standard-normal feeds (the per-pattern models)."""
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((1, TOKENS, DIM)).astype(np.float32) * 2} for _ in range(n)]
