"""Convolution and pooling as torch functions, with ONNX's padding rules made explicit.

Asymmetric pads, SAME_UPPER/SAME_LOWER, ConvTranspose's output_shape/output_padding, ceil_mode and
AveragePool's divisor with padding have no direct torch argument: each is computed here from the
ONNX spec and applied as an explicit pad or crop, so the result matches onnxruntime.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Final

import torch
import torch.nn.functional as F  # noqa: N812 - the usual torch alias

from graph_ir import Op
from qpasses.learned.torch_op_base import OpFn, Unsupported, Value, channel_view, pad_arg, registrar, text

CONV_OPS: dict[str, OpFn] = {}
_register = registrar(CONV_OPS)


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
    auto_pad = text(op.attr("auto_pad", "NOTSET"))
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


def _conv_args(op: Op, args: list[Any]) -> tuple[Value, Value, Value | None, int, list[int], Any, Any]:
    """Conv/ConvTranspose inputs, spatial rank, kernel (checked against the weight), strides, dilations."""
    x, w = args[0], args[1]
    b = args[2] if len(args) > 2 else None
    nd = _spatial_rank(op, x)
    kernel = list(op.attr("kernel_shape", list(w.shape[2:])))
    if kernel != list(w.shape[2:]):
        raise Unsupported(
            f"{op.op_type} '{op.name}': kernel_shape {kernel} differs from the weight's {list(w.shape[2:])}"
        )
    strides, dilations = _window(op, nd, kernel)
    return x, w, b, nd, kernel, strides, dilations


@_register("Conv")
def _conv(op: Op, args: list[Any], opset: int) -> Value:
    x, w, b, nd, kernel, strides, dilations = _conv_args(op, args)
    begin, end = _forward_pads(op, x.shape[2:], kernel, strides, dilations)
    padding: Any = begin
    if begin != end:
        x = F.pad(x, pad_arg(begin, end))
        padding = 0
    return _CONV[nd](x, w, b, strides, padding, dilations, int(op.attr("group", 1)))


@_register("ConvTranspose")
def _conv_transpose(op: Op, args: list[Any], opset: int) -> Value:
    x, w, b, nd, kernel, strides, dilations = _conv_args(op, args)
    group = int(op.attr("group", 1))
    out_pad = list(op.attr("output_padding", [0] * nd))
    spatial = list(x.shape[2:])
    y = _CONV_T[nd](x, w, None, strides, 0, 0, group, dilations)
    if any(out_pad):
        y = F.pad(y, pad_arg([0] * nd, out_pad))  # positions no input reaches: zeros (then the bias)
    full = list(y.shape[2:])
    auto_pad = text(op.attr("auto_pad", "NOTSET"))
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
    return y if b is None else y + channel_view(b, y.dim())


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
        x = F.pad(x, pad_arg(begin, ends), value=-math.inf)
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
        mask = F.pad(F.pad(ones, pad_arg(begin, end), value=1.0), pad_arg([0] * nd, extra))
    else:
        mask = F.pad(ones, pad_arg(begin, ends))
    sums = _AVG_POOL[nd](F.pad(x, pad_arg(begin, ends)), kernel, strides)
    counts = _AVG_POOL[nd](mask, kernel, strides)
    return sums / counts


@_register("GlobalAveragePool")
def _global_average_pool(op: Op, args: list[Any], opset: int) -> Value:
    return args[0].mean(dim=tuple(range(2, args[0].dim())), keepdim=True)


@_register("GlobalMaxPool")
def _global_max_pool(op: Op, args: list[Any], opset: int) -> Value:
    return args[0].amax(dim=tuple(range(2, args[0].dim())), keepdim=True)
