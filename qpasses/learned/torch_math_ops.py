"""Matrix products, elementwise ops, activations, softmax and normalizations as torch functions.

The ops whose ONNX and torch forms differ only in attributes: Gemm's alpha/beta/transposes, Clip's
bounds as attributes before opset 11, Softmax's 2-D coercion before opset 13, integer Div's
truncation, BatchNormalization in inference form.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812 - the usual torch alias

from graph_ir import Op
from qpasses.learned.torch_op_base import OpFn, Unsupported, Value, channel_view, registrar, text

MATH_OPS: dict[str, OpFn] = {}
_register = registrar(MATH_OPS)


# --- matrix products ------------------------------------------------------------------------------------


@_register("Gemm")
def _gemm(op: Op, args: list[Any], opset: int) -> Value:
    a, b = args[0], args[1]
    c = args[2] if len(args) > 2 else None
    if op.attr("transA", 0):
        a = a.transpose(0, 1)
    if op.attr("transB", 0):
        b = b.transpose(0, 1)
    y = a @ b
    alpha, beta = float(op.attr("alpha", 1.0)), float(op.attr("beta", 1.0))
    if alpha != 1.0:
        y = y * alpha
    if c is not None:
        y = y + (c * beta if beta != 1.0 else c)
    return y


@_register("MatMul")
def _matmul(op: Op, args: list[Any], opset: int) -> Value:
    return torch.matmul(args[0], args[1])


# --- elementwise ----------------------------------------------------------------------------------------


def _binary(fn: Callable[[Value, Value], Value]) -> OpFn:
    return lambda op, args, opset: fn(args[0], args[1])


_register("Add")(_binary(torch.add))
_register("Sub")(_binary(torch.sub))
_register("Mul")(_binary(torch.mul))
_register("Pow")(_binary(torch.pow))


@_register("Div")
def _div(op: Op, args: list[Any], opset: int) -> Value:
    a, b = args[0], args[1]
    if a.is_floating_point():
        return a / b
    return torch.div(a, b, rounding_mode="trunc")


def _unary(fn: Callable[[Value], Value]) -> OpFn:
    return lambda op, args, opset: fn(args[0])


for _name, _fn in {
    "Relu": torch.relu,
    "Sigmoid": torch.sigmoid,
    "Tanh": torch.tanh,
    "Exp": torch.exp,
    "Log": torch.log,
    "Sqrt": torch.sqrt,
    "Neg": torch.neg,
    "Abs": torch.abs,
    "Erf": torch.erf,
    "Reciprocal": torch.reciprocal,
    "Floor": torch.floor,
    "Ceil": torch.ceil,
    "Softplus": F.softplus,
    "Identity": lambda x: x,
}.items():
    _register(_name)(_unary(_fn))


@_register("Dropout")
def _dropout(op: Op, args: list[Any], opset: int) -> Value:
    return args[0]  # inference


def _variadic(fn: Callable[[Value, Value], Value]) -> OpFn:
    def run(op: Op, args: list[Any], opset: int) -> Value:
        out = args[0]
        for a in args[1:]:
            out = fn(out, a)
        return out

    return run


_register("Max")(_variadic(torch.maximum))
_register("Min")(_variadic(torch.minimum))
_register("Sum")(_variadic(torch.add))


@_register("Mean")
def _mean(op: Op, args: list[Any], opset: int) -> Value:
    return _variadic(torch.add)(op, args, opset) / len(args)


@_register("Clip")
def _clip(op: Op, args: list[Any], opset: int) -> Value:
    x = args[0]
    if opset < 11:
        return torch.clamp(x, float(op.attr("min", -math.inf)), float(op.attr("max", math.inf)))
    lo = args[1] if len(args) > 1 else None
    hi = args[2] if len(args) > 2 else None
    if lo is None and hi is None:
        return x
    return torch.clamp(x, lo, hi)


@_register("LeakyRelu")
def _leaky_relu(op: Op, args: list[Any], opset: int) -> Value:
    return F.leaky_relu(args[0], float(op.attr("alpha", 0.01)))


@_register("Elu")
def _elu(op: Op, args: list[Any], opset: int) -> Value:
    return F.elu(args[0], float(op.attr("alpha", 1.0)))


@_register("PRelu")
def _prelu(op: Op, args: list[Any], opset: int) -> Value:
    x, slope = args[0], args[1]
    return torch.where(x < 0, x * slope, x)


@_register("HardSigmoid")
def _hard_sigmoid(op: Op, args: list[Any], opset: int) -> Value:
    alpha, beta = float(op.attr("alpha", 0.2)), float(op.attr("beta", 0.5))
    return torch.clamp(args[0] * alpha + beta, 0.0, 1.0)


@_register("HardSwish")
def _hard_swish(op: Op, args: list[Any], opset: int) -> Value:
    x = args[0]
    return x * torch.clamp(x * (1.0 / 6.0) + 0.5, 0.0, 1.0)


@_register("Gelu")
def _gelu(op: Op, args: list[Any], opset: int) -> Value:
    approximate = text(op.attr("approximate", "none"))
    return F.gelu(args[0], approximate="tanh" if approximate == "tanh" else "none")


def _softmax_like(fn: Callable[..., Value]) -> OpFn:
    def run(op: Op, args: list[Any], opset: int) -> Value:
        x = args[0]
        if opset >= 13:
            return fn(x, dim=int(op.attr("axis", -1)))
        axis = int(op.attr("axis", 1)) % max(x.dim(), 1)  # before opset 13: coerced to 2-D at axis
        rows = math.prod(x.shape[:axis])
        return fn(x.reshape(rows, -1), dim=1).reshape(x.shape)

    return run


_register("Softmax")(_softmax_like(F.softmax))
_register("LogSoftmax")(_softmax_like(F.log_softmax))


# --- normalization ------------------------------------------------------------------------------------


@_register("BatchNormalization")
def _batch_norm(op: Op, args: list[Any], opset: int) -> Value:
    if op.attr("training_mode", 0):
        raise Unsupported(f"BatchNormalization '{op.name}' in training mode")
    x, scale, bias, mean, var = args[:5]
    eps = float(op.attr("epsilon", 1e-5))
    n = x.dim()
    inv = scale / torch.sqrt(var + eps)
    return (x - channel_view(mean, n)) * channel_view(inv, n) + channel_view(bias, n)


@_register("LayerNormalization")
def _layer_norm(op: Op, args: list[Any], opset: int) -> Value:
    x, scale = args[0], args[1]
    bias = args[2] if len(args) > 2 else None
    axis = int(op.attr("axis", -1)) % x.dim()
    eps = float(op.attr("epsilon", 1e-5))
    dims = tuple(range(axis, x.dim()))
    mean = x.mean(dim=dims, keepdim=True)
    centered = x - mean
    var = (centered * centered).mean(dim=dims, keepdim=True)
    y = centered / torch.sqrt(var + eps) * scale
    return y if bias is None else y + bias


@_register("InstanceNormalization")
def _instance_norm(op: Op, args: list[Any], opset: int) -> Value:
    x, scale, bias = args[:3]
    eps = float(op.attr("epsilon", 1e-5))
    dims = tuple(range(2, x.dim()))
    mean = x.mean(dim=dims, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=dims, keepdim=True)
    n = x.dim()
    return (x - mean) / torch.sqrt(var + eps) * channel_view(scale, n) + channel_view(bias, n)
