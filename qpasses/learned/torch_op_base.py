"""What every IR-op-to-torch mapping shares: the function signature, the ``Unsupported`` error,
the table a mapping registers in, and the decoding of ONNX arguments into torch's forms.

Apart from the mappings (``torch_conv_ops``, ``torch_math_ops``, ``torch_shape_ops``) and the
program that runs them (``torch_ops``) so each of those imports only this.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from graph_ir import Op

Value = torch.Tensor
OpFn = Callable[[Op, list[Any], int], Value]
Register = Callable[..., Callable[[OpFn], OpFn]]


class Unsupported(Exception):
    """An op, attribute or layout the torch mapping cannot evaluate (the message says which)."""


def registrar(table: dict[str, OpFn]) -> Register:
    """A decorator factory adding ``OpFn``s to ``table`` under one or more op types."""

    def register(*names: str) -> Callable[[OpFn], OpFn]:
        def add(fn: OpFn) -> OpFn:
            for name in names:
                table[name] = fn
            return fn

        return add

    return register


def text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def ints(value: Value | None) -> list[int]:
    return [] if value is None else [int(v) for v in value.reshape(-1).tolist()]


def to_torch(array: np.ndarray) -> Value:
    array = np.asarray(array)
    if array.dtype == np.float64:
        array = array.astype(np.float32)
    return torch.from_numpy(np.array(array, order="C", copy=True))  # (ascontiguousarray makes 0-d arrays 1-d)


def pad_arg(begin: Sequence[int], end: Sequence[int]) -> list[int]:
    """F.pad's layout (last dim first) for pads on the trailing ``len(begin)`` dims."""
    out: list[int] = []
    for b, e in zip(reversed(begin), reversed(end), strict=True):
        out += [int(b), int(e)]
    return out


def channel_view(v: Value, ndim: int) -> Value:
    """A per-channel vector shaped to broadcast along axis 1 of an ``ndim`` tensor."""
    return v.reshape(1, -1, *([1] * (ndim - 2)))
