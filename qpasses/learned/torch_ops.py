"""IR ops as torch functions: evaluate a region of the graph with autograd.

``TorchProgram(graph, ops, inputs, outputs)`` runs the given ops (in order) on torch tensors, reading
constants from the IR and letting the caller swap any constant (a weight) for a tensor computed
from trainable parameters. Each op type maps to one function of ``(op, args, opset)`` written from
the ONNX spec; attributes and layouts torch has no direct form for (asymmetric pads, SAME
padding, ONNX's pre-13 Softmax, AveragePool's divisor with padding) are handled explicitly, and
what is not handled raises ``Unsupported`` naming the op, so a pass can skip that layer or block
with a reason instead of training on wrong numbers. The tests hold every mapping to onnxruntime.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812 - the usual torch alias
from onnx import helper

from graph_ir import Graph, Op

Value = torch.Tensor
OpFn = Callable[[Op, list[Any], int], Value]


class Unsupported(Exception):
    """An op, attribute or layout the torch mapping cannot evaluate (the message says which)."""


OPS: dict[str, OpFn] = {}


def _register(*names: str) -> Callable[[OpFn], OpFn]:
    def add(fn: OpFn) -> OpFn:
        for name in names:
            OPS[name] = fn
        return fn

    return add


def supported_op_types() -> list[str]:
    return sorted(OPS)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _ints(value: Value | None) -> list[int]:
    return [] if value is None else [int(v) for v in value.reshape(-1).tolist()]


def _to_torch(array: np.ndarray) -> Value:
    array = np.asarray(array)
    if array.dtype == np.float64:
        array = array.astype(np.float32)
    return torch.from_numpy(np.array(array, order="C", copy=True))  # (ascontiguousarray makes 0-d arrays 1-d)


def _pad_arg(begin: Sequence[int], end: Sequence[int]) -> list[int]:
    """F.pad's layout (last dim first) for pads on the trailing ``len(begin)`` dims."""
    out: list[int] = []
    for b, e in zip(reversed(begin), reversed(end), strict=True):
        out += [int(b), int(e)]
    return out


def _channel_view(v: Value, ndim: int) -> Value:
    """A per-channel vector shaped to broadcast along axis 1 of an ``ndim`` tensor."""
    return v.reshape(1, -1, *([1] * (ndim - 2)))


# --- convolution and pooling geometry ----------------------------------------------------------------


def _window(op: Op, nd: int, kernel: Sequence[int]) -> tuple[list[int], list[int]]:
    strides = list(op.attr("strides", [1] * nd))
    dilations = list(op.attr("dilations", [1] * nd))
    if len(strides) != nd or len(dilations) != nd or len(kernel) != nd:
        raise Unsupported(f"{op.op_type} '{op.name}': strides/dilations/kernel of the wrong rank")
    return strides, dilations


def _forward_pads(
    op: Op, spatial: Sequence[int], kernel: Sequence[int], strides: Sequence[int], dilations: Sequence[int]
) -> tuple[list[int], list[int]]:
    """Begin/end pads of Conv and pooling: explicit, VALID, or SAME_UPPER/SAME_LOWER (ONNX's rule)."""
    nd = len(kernel)
    auto_pad = _text(op.attr("auto_pad", "NOTSET"))
    if auto_pad in ("NOTSET", ""):
        pads = list(op.attr("pads", [0] * 2 * nd))
        return pads[:nd], pads[nd:]
    if auto_pad == "VALID":
        return [0] * nd, [0] * nd
    if auto_pad not in ("SAME_UPPER", "SAME_LOWER"):
        raise Unsupported(f"{op.op_type} '{op.name}': auto_pad {auto_pad!r}")
    begin, end = [], []
    for size, k, s, d in zip(spatial, kernel, strides, dilations, strict=True):
        total = max((-(-size // s) - 1) * s + (k - 1) * d + 1 - size, 0)
        small = total // 2
        upper = auto_pad == "SAME_UPPER"
        begin.append(small if upper else total - small)
        end.append(total - small if upper else small)
    return begin, end


_CONV: Final = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_T: Final = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}
_MAX_POOL: Final = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}
_AVG_POOL: Final = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}


def _spatial_rank(op: Op, x: Value) -> int:
    nd = x.dim() - 2
    if nd not in (1, 2, 3):
        raise Unsupported(f"{op.op_type} '{op.name}' on a rank-{x.dim()} input (1-3 spatial dims supported)")
    return nd


@_register("Conv")
def _conv(op: Op, args: list[Any], opset: int) -> Value:
    x, w = args[0], args[1]
    b = args[2] if len(args) > 2 else None
    nd = _spatial_rank(op, x)
    kernel = list(op.attr("kernel_shape", list(w.shape[2:])))
    if kernel != list(w.shape[2:]):
        raise Unsupported(f"Conv '{op.name}': kernel_shape {kernel} differs from the weight's {list(w.shape[2:])}")
    strides, dilations = _window(op, nd, kernel)
    begin, end = _forward_pads(op, x.shape[2:], kernel, strides, dilations)
    padding: Any = begin
    if begin != end:
        x = F.pad(x, _pad_arg(begin, end))
        padding = 0
    return _CONV[nd](x, w, b, strides, padding, dilations, int(op.attr("group", 1)))


@_register("ConvTranspose")
def _conv_transpose(op: Op, args: list[Any], opset: int) -> Value:
    x, w = args[0], args[1]
    b = args[2] if len(args) > 2 else None
    nd = _spatial_rank(op, x)
    kernel = list(op.attr("kernel_shape", list(w.shape[2:])))
    if kernel != list(w.shape[2:]):
        raise Unsupported(f"ConvTranspose '{op.name}': kernel_shape {kernel} differs from the weight's")
    strides, dilations = _window(op, nd, kernel)
    group = int(op.attr("group", 1))
    out_pad = list(op.attr("output_padding", [0] * nd))
    spatial = list(x.shape[2:])
    y = _CONV_T[nd](x, w, None, strides, 0, 0, group, dilations)
    if any(out_pad):
        y = F.pad(y, _pad_arg([0] * nd, out_pad))  # positions no input reaches: zeros (then the bias)
    full = list(y.shape[2:])
    auto_pad = _text(op.attr("auto_pad", "NOTSET"))
    shape = op.attr("output_shape")
    if shape is None and auto_pad in ("NOTSET", "", "VALID"):
        pads = [0] * 2 * nd if auto_pad == "VALID" else list(op.attr("pads", [0] * 2 * nd))
        begin, end = pads[:nd], pads[nd:]
    else:
        wanted = list(shape)[-nd:] if shape is not None else [s * st for s, st in zip(spatial, strides, strict=True)]
        begin, end = [], []
        for f, want in zip(full, wanted, strict=True):
            total = f - want
            if total < 0:
                raise Unsupported(f"ConvTranspose '{op.name}': output_shape {wanted} is larger than the full output")
            half = total // 2
            upper = auto_pad == "SAME_UPPER"
            begin.append(half if upper else total - half)
            end.append(total - half if upper else half)
    if any(p < 0 for p in (*begin, *end)):
        raise Unsupported(f"ConvTranspose '{op.name}': negative pads")
    crop = tuple(slice(bg, f - e) for bg, e, f in zip(begin, end, full, strict=True))
    y = y[(slice(None), slice(None)) + crop]
    return y if b is None else y + _channel_view(b, y.dim())


def _pool_pads(op: Op, x: Value, nd: int) -> tuple[list[int], list[int], list[int], list[int], list[int]]:
    """(kernel, strides, begin pads, end pads, extra end pads that ceil_mode adds) of a pooling op."""
    kernel = list(op.attr("kernel_shape"))
    strides, dilations = _window(op, nd, kernel)
    if any(d != 1 for d in dilations) and op.op_type != "MaxPool":
        raise Unsupported(f"{op.op_type} '{op.name}': dilations")
    begin, end = _forward_pads(op, x.shape[2:], kernel, strides, dilations)
    extra = [0] * nd
    if op.attr("ceil_mode", 0):
        for i, (size, k, s, d) in enumerate(zip(x.shape[2:], kernel, strides, dilations, strict=True)):
            span = (k - 1) * d + 1
            padded = size + begin[i] + end[i]
            out = -(-(padded - span) // s) + 1
            if (out - 1) * s >= size + begin[i]:  # the last window would start in the end padding
                out -= 1
            extra[i] = max((out - 1) * s + span - padded, 0)
    return kernel, strides, begin, end, extra


@_register("MaxPool")
def _max_pool(op: Op, args: list[Any], opset: int) -> Value:
    x = args[0]
    nd = _spatial_rank(op, x)
    kernel, strides, begin, end, extra = _pool_pads(op, x, nd)
    dilations = list(op.attr("dilations", [1] * nd))
    ends = [e + x_ for e, x_ in zip(end, extra, strict=True)]
    if any(begin) or any(ends):
        x = F.pad(x, _pad_arg(begin, ends), value=-math.inf)
    return _MAX_POOL[nd](x, kernel, strides, 0, dilations)


@_register("AveragePool")
def _average_pool(op: Op, args: list[Any], opset: int) -> Value:
    x = args[0]
    nd = _spatial_rank(op, x)
    kernel, strides, begin, end, extra = _pool_pads(op, x, nd)
    ends = [e + x_ for e, x_ in zip(end, extra, strict=True)]
    if not any(begin) and not any(ends):
        return _AVG_POOL[nd](x, kernel, strides)
    # Sum over the window / number of counted positions: the input, plus the explicit pads when
    # count_include_pad (never the extra positions of ceil_mode).
    ones = torch.ones((1, 1, *x.shape[2:]), dtype=x.dtype)
    if op.attr("count_include_pad", 0):
        mask = F.pad(F.pad(ones, _pad_arg(begin, end), value=1.0), _pad_arg([0] * nd, extra))
    else:
        mask = F.pad(ones, _pad_arg(begin, ends))
    sums = _AVG_POOL[nd](F.pad(x, _pad_arg(begin, ends)), kernel, strides)
    counts = _AVG_POOL[nd](mask, kernel, strides)
    return sums / counts


@_register("GlobalAveragePool")
def _global_average_pool(op: Op, args: list[Any], opset: int) -> Value:
    return args[0].mean(dim=tuple(range(2, args[0].dim())), keepdim=True)


@_register("GlobalMaxPool")
def _global_max_pool(op: Op, args: list[Any], opset: int) -> Value:
    return args[0].amax(dim=tuple(range(2, args[0].dim())), keepdim=True)


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
    approximate = _text(op.attr("approximate", "none"))
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
    return (x - _channel_view(mean, n)) * _channel_view(inv, n) + _channel_view(bias, n)


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
    return (x - mean) / torch.sqrt(var + eps) * _channel_view(scale, n) + _channel_view(bias, n)


# --- shape and data movement ----------------------------------------------------------------------------


@_register("Concat")
def _concat(op: Op, args: list[Any], opset: int) -> Value:
    parts = [a for a in args if a is not None]
    return torch.cat(parts, dim=int(op.attr("axis")))


@_register("Reshape")
def _reshape(op: Op, args: list[Any], opset: int) -> Value:
    x = args[0]
    shape = _ints(args[1])
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
        return _ints(args[slot]) if len(args) > slot and args[slot] is not None else None
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
        starts, ends = _ints(args[1]), _ints(args[2])
        axes = _ints(args[3]) if len(args) > 3 and args[3] is not None else None
        steps = _ints(args[4]) if len(args) > 4 and args[4] is not None else None
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
    return x.expand(torch.broadcast_shapes(tuple(x.shape), tuple(_ints(args[1]))))


@_register("Pad")
def _pad(op: Op, args: list[Any], opset: int) -> Value:
    x = args[0]
    mode = _text(op.attr("mode", "constant"))
    if opset < 11:
        pads, value = list(op.attr("pads")), float(op.attr("value", 0.0))
        axes = list(range(x.dim()))
    else:
        pads = _ints(args[1])
        value = float(args[2].reshape(-1)[0]) if len(args) > 2 and args[2] is not None else 0.0
        axes = _ints(args[3]) if len(args) > 3 and args[3] is not None else list(range(x.dim()))
    axes = [a % x.dim() for a in axes]
    begin, end = [0] * x.dim(), [0] * x.dim()
    for i, a in enumerate(axes):
        begin[a], end[a] = pads[i], pads[i + len(axes)]
    if mode == "constant":
        return F.pad(x, _pad_arg(begin, end), value=value)
    torch_mode = {"reflect": "reflect", "edge": "replicate"}.get(mode)
    if torch_mode is None or any(begin[:2]) or any(end[:2]) or not 3 <= x.dim() <= 5:
        raise Unsupported(f"Pad '{op.name}': mode {mode!r} on these axes")
    return F.pad(x, _pad_arg(begin[2:], end[2:]), mode=torch_mode)


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
    fill = _to_torch(np.asarray(value).reshape(-1)[:1]) if value is not None else torch.zeros(1)
    return fill.expand(*_ints(args[0])).clone()


# --- programs -------------------------------------------------------------------------------------------


class TorchProgram:
    """Ops of an IR region run with torch: ``program(feeds, weights) -> [outputs]``.

    ``ops`` in a topological order; ``inputs`` the region's activation inputs (fed each call);
    every other tensor an op reads must be computed in the region or be a constant of the graph
    (read once, as torch tensors). ``weights`` swaps constants for given tensors per call (the
    fake-quantized weights being trained). Ops no output depends on are left out. Raises
    ``Unsupported`` at construction for an op type, attribute or extra output the mapping does not cover.
    """

    def __init__(
        self,
        graph: Graph,
        ops: Sequence[Op],
        inputs: Sequence[str],
        outputs: Sequence[str],
        *,
        opset: int | None = None,
    ) -> None:
        self.inputs = list(inputs)
        self.outputs = list(outputs)
        self.opset = opset if opset is not None else (graph.opset("") or 1)
        # Only the ops an output depends on: a region may end with ops the loss never reads (an ArgMax
        # after the logits a block is cut at), which need no mapping and no time.
        wanted = set(self.outputs)
        needed: list[Op] = []
        for op in reversed(list(ops)):
            if any(n in wanted for n in op.outputs if n) and not (op.op_type == "Constant" and op.is_standard):
                needed.append(op)
                wanted.update(n for n in op.inputs if n)
        self.ops = needed[::-1]
        self.constants: dict[str, Value] = {}
        produced = set(self.inputs)
        used = set(self.outputs) | {n for op in self.ops for n in op.inputs if n}
        for op in self.ops:
            if not op.is_standard or op.op_type not in OPS:
                domain = f" (domain {op.domain})" if not op.is_standard else ""
                raise Unsupported(f"no torch mapping for {op.op_type}{domain} '{op.name}'")
            for i, name in enumerate(op.outputs[1:], 1):
                if name and name in used:
                    raise Unsupported(f"{op.op_type} '{op.name}': output {i} ('{name}') is not supported")
            for name in op.inputs:
                if not name or name in produced or name in self.constants:
                    continue
                t = graph.tensors[name]
                data = t.data if t.is_constant else None
                if data is None:
                    raise Unsupported(
                        f"{op.op_type} '{op.name}' reads '{name}', which is neither a region input, "
                        "computed in the region, nor a constant"
                    )
                self.constants[name] = _to_torch(data)
            produced.update(n for n in op.outputs[:1] if n)
        missing = [n for n in self.outputs if n not in produced]
        if missing:
            raise Unsupported(f"outputs {missing} are not computed by the region")

    def __call__(self, feeds: Mapping[str, Value], weights: Mapping[str, Value] | None = None) -> list[Value]:
        env: dict[str, Value] = dict(self.constants)
        if weights:
            env.update(weights)
        env.update(feeds)
        for op in self.ops:
            args = [env[name] if name else None for name in op.inputs]
            env[op.outputs[0]] = OPS[op.op_type](op, args, self.opset)
        return [env[name] for name in self.outputs]

    def macs(self, feeds: Mapping[str, Value], weights: Mapping[str, Value] | None = None) -> int:
        """Multiply-accumulates of one call on ``feeds`` (Conv, ConvTranspose, Gemm, MatMul), measured by running it."""
        total = 0
        env: dict[str, Value] = dict(self.constants)
        env.update(weights or {})
        env.update(feeds)
        with torch.no_grad():
            for op in self.ops:
                args: list[Any] = [env[name] if name else None for name in op.inputs]  # as OpFn reads them
                out = OPS[op.op_type](op, args, self.opset)
                env[op.outputs[0]] = out
                if op.op_type == "Conv":
                    total += out.numel() * math.prod(args[1].shape[1:])
                elif op.op_type == "ConvTranspose":
                    total += args[0].numel() * math.prod(args[1].shape[1:])
                elif op.op_type in ("Gemm", "MatMul"):
                    a = args[0]
                    inner = a.shape[0] if op.op_type == "Gemm" and op.attr("transA", 0) else a.shape[-1]
                    total += out.numel() * int(inner)
        return int(total)


def whole_graph(graph: Graph) -> TorchProgram:
    """The program of the whole graph: inputs are the non-constant graph inputs."""
    inputs = [n for n in graph.inputs if not graph.tensors[n].is_constant]
    return TorchProgram(graph, graph.topological_order(), inputs, graph.outputs)


__all__ = ["OPS", "TorchProgram", "Unsupported", "supported_op_types", "whole_graph"]
