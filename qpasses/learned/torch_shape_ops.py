"""Shape and data-movement ops, reductions and ConstantOfShape as torch functions.

Shape-like inputs (Reshape's shape, Slice's starts, Pad's pads...) are read as Python ints from the
tensors the program computed; attributes that moved to inputs in later opsets (Squeeze/Unsqueeze and
Reduce* axes, Slice, Pad) are read from whichever the model's opset uses.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812 - the usual torch alias
from onnx import helper

from graph_ir import Op
from qpasses.learned.torch_op_base import OpFn, Unsupported, Value, ints, pad_arg, registrar, text, to_torch

SHAPE_OPS: dict[str, OpFn] = {}
_register = registrar(SHAPE_OPS)


# --- shape and data movement ----------------------------------------------------------------------------


@_register("Concat")
def _concat(op: Op, args: list[Any], opset: int) -> Value:
    parts = [a for a in args if a is not None]
    return torch.cat(parts, dim=int(op.attr("axis")))


@_register("Reshape")
def _reshape(op: Op, args: list[Any], opset: int) -> Value:
    x = args[0]
    shape = ints(args[1])
    if not op.attr("allowzero", 0):
        shape = [x.shape[i] if d == 0 else d for i, d in enumerate(shape)]
    return x.reshape(shape)


@_register("Flatten")
def _flatten(op: Op, args: list[Any], opset: int) -> Value:
    x = args[0]
    axis = int(op.attr("axis", 1))
    axis = axis + x.dim() if axis < 0 else axis
    return x.reshape(math.prod(x.shape[:axis]), -1)


@_register("Transpose")
def _transpose(op: Op, args: list[Any], opset: int) -> Value:
    x = args[0]
    perm = op.attr("perm")
    return x.permute(list(perm) if perm is not None else list(reversed(range(x.dim()))))


def _axes(op: Op, args: list[Any], slot: int, since: int, opset: int) -> list[int] | None:
    if opset >= since:
        return ints(args[slot]) if len(args) > slot and args[slot] is not None else None
    axes = op.attr("axes")
    return None if axes is None else list(axes)


@_register("Squeeze")
def _squeeze(op: Op, args: list[Any], opset: int) -> Value:
    x = args[0]
    axes = _axes(op, args, 1, 13, opset)
    if axes is None:
        return x.squeeze()
    return x.squeeze(tuple(a % x.dim() for a in axes)) if axes else x


@_register("Unsqueeze")
def _unsqueeze(op: Op, args: list[Any], opset: int) -> Value:
    x = args[0]
    axes = _axes(op, args, 1, 13, opset) or []
    rank = x.dim() + len(axes)
    for a in sorted(a % rank for a in axes):
        x = x.unsqueeze(a)
    return x


@_register("Shape")
def _shape(op: Op, args: list[Any], opset: int) -> Value:
    dims = list(args[0].shape)
    start, end = op.attr("start", 0), op.attr("end")
    return torch.tensor(dims[start:end] if end is not None else dims[start:], dtype=torch.int64)


@_register("Gather")
def _gather(op: Op, args: list[Any], opset: int) -> Value:
    x, idx = args[0], args[1].to(torch.int64)
    axis = int(op.attr("axis", 0)) % x.dim()
    flat = torch.remainder(idx.reshape(-1), x.shape[axis])
    out = x.index_select(axis, flat)
    return out.reshape((*x.shape[:axis], *idx.shape, *x.shape[axis + 1 :]))


@_register("Cast")
def _cast(op: Op, args: list[Any], opset: int) -> Value:
    np_type = helper.tensor_dtype_to_np_dtype(int(op.attr("to")))
    return args[0].to(torch.from_numpy(np.empty(0, dtype=np_type)).dtype)


@_register("Slice")
def _slice(op: Op, args: list[Any], opset: int) -> Value:
    x = args[0]
    if opset < 10:
        starts, ends = list(op.attr("starts")), list(op.attr("ends"))
        axes, steps = op.attr("axes"), None
    else:
        starts, ends = ints(args[1]), ints(args[2])
        axes = ints(args[3]) if len(args) > 3 and args[3] is not None else None
        steps = ints(args[4]) if len(args) > 4 and args[4] is not None else None
    axes = list(axes) if axes is not None else list(range(len(starts)))
    steps = steps or [1] * len(starts)
    index: list[slice] = [slice(None)] * x.dim()
    for a, s, e, st in zip(axes, starts, ends, steps, strict=True):
        if st <= 0:
            raise Unsupported(f"Slice '{op.name}': non-positive step {st}")
        size = x.shape[a]
        s = max(0, min(size, s + size if s < 0 else s))
        e = max(0, min(size, e + size if e < 0 else e))
        index[a % x.dim()] = slice(s, e, st)
    return x[tuple(index)]


@_register("Expand")
def _expand(op: Op, args: list[Any], opset: int) -> Value:
    x = args[0]
    return x.expand(torch.broadcast_shapes(tuple(x.shape), tuple(ints(args[1]))))


@_register("Pad")
def _pad(op: Op, args: list[Any], opset: int) -> Value:
    x = args[0]
    mode = text(op.attr("mode", "constant"))
    if opset < 11:
        pads, value = list(op.attr("pads")), float(op.attr("value", 0.0))
        axes = list(range(x.dim()))
    else:
        pads = ints(args[1])
        value = float(args[2].reshape(-1)[0]) if len(args) > 2 and args[2] is not None else 0.0
        axes = ints(args[3]) if len(args) > 3 and args[3] is not None else list(range(x.dim()))
    axes = [a % x.dim() for a in axes]
    begin, end = [0] * x.dim(), [0] * x.dim()
    for i, a in enumerate(axes):
        begin[a], end[a] = pads[i], pads[i + len(axes)]
    if mode == "constant":
        return F.pad(x, pad_arg(begin, end), value=value)
    torch_mode = {"reflect": "reflect", "edge": "replicate"}.get(mode)
    if torch_mode is None or any(begin[:2]) or any(end[:2]) or not 3 <= x.dim() <= 5:
        raise Unsupported(f"Pad '{op.name}': mode {mode!r} on these axes")
    return F.pad(x, pad_arg(begin[2:], end[2:]), mode=torch_mode)


def _reduce(fn: Callable[[Value, tuple[int, ...], bool], Value], input_axes_since: int) -> OpFn:
    def run(op: Op, args: list[Any], opset: int) -> Value:
        x = args[0]
        keep = bool(op.attr("keepdims", 1))
        axes = _axes(op, args, 1, input_axes_since, opset)
        if not axes:
            if axes is not None and op.attr("noop_with_empty_axes", 0):
                return x
            axes = list(range(x.dim()))
        return fn(x, tuple(a % x.dim() for a in axes), keep)

    return run


_register("ReduceMean")(_reduce(lambda x, d, k: x.mean(dim=d, keepdim=k), 18))
_register("ReduceSum")(_reduce(lambda x, d, k: x.sum(dim=d, keepdim=k), 13))
_register("ReduceMax")(_reduce(lambda x, d, k: x.amax(dim=d, keepdim=k), 18))
_register("ReduceMin")(_reduce(lambda x, d, k: x.amin(dim=d, keepdim=k), 18))


@_register("ConstantOfShape")
def _constant_of_shape(op: Op, args: list[Any], opset: int) -> Value:
    value = op.attr("value")
    fill = to_torch(np.asarray(value).reshape(-1)[:1]) if value is not None else torch.zeros(1)
    return fill.expand(*ints(args[0])).clone()
