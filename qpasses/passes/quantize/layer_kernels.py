"""Numpy models of the linear part of Conv / ConvTranspose / Gemm / MatMul, vectorised over a stack of
candidate weights: what SeqMSE scores its candidates with (and tests compare with onnxruntime)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from graph_ir import Graph, Op


class Unsupported(Exception):
    """A layer the numpy kernels cannot model (becomes a 'missed' remark)."""


# --- numpy layer kernels ----------------------------------------------------------------------------
#
# Each kernel computes the op's *linear part* for a stack of K weight tensors at once:
# ``linear(x, w)`` with ``w`` of shape ``[K, *weight.shape]`` returns ``[rows, K, M]`` (rows =
# everything but the output channel, M = output channels). The bias is added by the caller (it
# cancels in the error; only the sqnr loss's signal needs it). ``x`` has samples on axis 0, so
# inputs are split along it to bound memory.


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _conv_attributes(
    op: Op, weight_shape: tuple[int, ...], channels: str
) -> tuple[int, int, tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """(spatial rank, group, kernel, strides, dilations) shared by Conv and ConvTranspose."""
    nd = len(weight_shape) - 2
    if nd < 1:
        raise Unsupported(f"weight of rank {len(weight_shape)}")
    kernel = tuple(op.attr("kernel_shape", weight_shape[2:]))
    if kernel != tuple(weight_shape[2:]):
        raise Unsupported(f"kernel_shape {list(kernel)} differs from the weight's {list(weight_shape[2:])}")
    group = int(op.attr("group", 1))
    if group < 1 or weight_shape[0] % group:
        raise Unsupported(f"group {group} does not divide {weight_shape[0]} {channels} channels")
    return nd, group, kernel, tuple(op.attr("strides", [1] * nd)), tuple(op.attr("dilations", [1] * nd))


@dataclass(frozen=True)
class ConvKernel:
    """Conv (1-3 spatial dims) by im2col: one batched matmul over groups for all candidates."""

    group: int
    kernel: tuple[int, ...]
    strides: tuple[int, ...]
    dilations: tuple[int, ...]
    pads: tuple[int, ...]
    auto_pad: str = "NOTSET"
    blockable: bool = field(init=False)

    def __post_init__(self) -> None:
        # Output channels can be evaluated in blocks only when they do not share groups' inputs.
        object.__setattr__(self, "blockable", self.group == 1)

    @classmethod
    def from_op(cls, op: Op, weight_shape: tuple[int, ...]) -> ConvKernel:
        nd, group, kernel, strides, dilations = _conv_attributes(op, weight_shape, "output")
        return cls(
            group,
            kernel,
            strides,
            dilations,
            tuple(op.attr("pads", [0] * 2 * nd)),
            _text(op.attr("auto_pad", "NOTSET")),
        )

    def work(self, shape: tuple[int, ...], cand: int, m: int) -> int:
        """Scratch elements per sample: patches plus outputs."""
        return math.prod(self._out_shape(shape[2:])) * (shape[1] * math.prod(self.kernel) + cand * m)

    def _resolved_pads(self, spatial: Sequence[int]) -> tuple[list[int], list[int]]:
        nd = len(self.kernel)
        if self.auto_pad in ("NOTSET", ""):
            return list(self.pads[:nd]), list(self.pads[nd:])
        if self.auto_pad == "VALID":
            return [0] * nd, [0] * nd
        begin, end = [], []
        for size, k, s, d in zip(spatial, self.kernel, self.strides, self.dilations, strict=True):
            total = max((-(-size // s) - 1) * s + (k - 1) * d + 1 - size, 0)
            small = total // 2
            upper = self.auto_pad == "SAME_UPPER"
            begin.append(small if upper else total - small)
            end.append(total - small if upper else small)
        return begin, end

    def _out_shape(self, spatial: Sequence[int]) -> list[int]:
        begin, end = self._resolved_pads(spatial)
        return [
            (size + b + e - (d * (k - 1) + 1)) // s + 1
            for size, b, e, k, s, d in zip(spatial, begin, end, self.kernel, self.strides, self.dilations, strict=True)
        ]

    def linear(self, x: np.ndarray, w: np.ndarray) -> np.ndarray:
        n, c = x.shape[:2]
        nd = len(self.kernel)
        cand, m = w.shape[:2]
        g = self.group
        cg, mg, kk = c // g, m // g, math.prod(self.kernel)
        begin, end = self._resolved_pads(x.shape[2:])
        xp = np.pad(x, [(0, 0), (0, 0), *zip(begin, end, strict=True)])
        spans = [d * (k - 1) + 1 for k, d in zip(self.kernel, self.dilations, strict=True)]
        view = sliding_window_view(xp, spans, axis=tuple(range(2, 2 + nd)))
        steps = tuple(slice(None, None, s) for s in self.strides) + tuple(slice(None, None, d) for d in self.dilations)
        view = view[(slice(None), slice(None)) + steps]
        out = view.shape[2 : 2 + nd]
        rows = n * math.prod(out)
        # [n, g, cg, *out, *k] -> [g, n, *out, cg, *k] -> [g, rows, cg*kk]
        view = view.reshape(n, g, cg, *out, *self.kernel)
        perm = (1, 0, *range(3, 3 + nd), 2, *range(3 + nd, 3 + 2 * nd))
        patches = np.ascontiguousarray(view.transpose(perm)).reshape(g, rows, cg * kk)
        wm = w.reshape(cand, g, mg, cg * kk).transpose(1, 3, 0, 2).reshape(g, cg * kk, cand * mg)
        y = np.matmul(patches, wm)
        return y.reshape(g, rows, cand, mg).transpose(1, 2, 0, 3).reshape(rows, cand, m)


@dataclass(frozen=True)
class ConvTransposeKernel:
    """ConvTranspose: one matmul per group for all candidates, then a col2im scatter-add."""

    group: int
    kernel: tuple[int, ...]
    strides: tuple[int, ...]
    dilations: tuple[int, ...]
    pads: tuple[int, ...]
    output_padding: tuple[int, ...]
    output_shape: tuple[int, ...] | None = None
    auto_pad: str = "NOTSET"
    blockable: bool = False

    @classmethod
    def from_op(cls, op: Op, weight_shape: tuple[int, ...]) -> ConvTransposeKernel:
        nd, group, kernel, strides, dilations = _conv_attributes(op, weight_shape, "input")
        shape = op.attr("output_shape")
        return cls(
            group,
            kernel,
            strides,
            dilations,
            tuple(op.attr("pads", [0] * 2 * nd)),
            tuple(op.attr("output_padding", [0] * nd)),
            tuple(shape[-nd:]) if shape is not None else None,
            _text(op.attr("auto_pad", "NOTSET")),
        )

    def _full(self, spatial: Sequence[int]) -> list[int]:
        return [
            (size - 1) * s + (k - 1) * d + 1 + p
            for size, s, k, d, p in zip(
                spatial, self.strides, self.kernel, self.dilations, self.output_padding, strict=True
            )
        ]

    def _resolved_pads(self, spatial: Sequence[int]) -> tuple[list[int], list[int]]:
        """ONNX's rule: explicit pads, or total padding from output_shape / SAME (= input x stride)."""
        nd = len(self.kernel)
        if self.output_shape is None and self.auto_pad in ("NOTSET", "", "VALID"):
            return ([0] * nd, [0] * nd) if self.auto_pad == "VALID" else (list(self.pads[:nd]), list(self.pads[nd:]))
        wanted = self.output_shape or [size * s for size, s in zip(spatial, self.strides, strict=True)]
        begin, end = [], []
        for full, want in zip(self._full(spatial), wanted, strict=True):
            total = full - want
            if total < 0:
                raise Unsupported(f"output_shape {list(wanted)} is larger than the full output")
            half = total // 2
            upper = self.auto_pad == "SAME_UPPER"
            begin.append(half if upper else total - half)
            end.append(total - half if upper else half)
        return begin, end

    def work(self, shape: tuple[int, ...], cand: int, m: int) -> int:
        """Scratch elements per sample: per-tap products plus the uncropped output."""
        taps = math.prod(shape[2:]) * math.prod(self.kernel) // self.group
        return cand * m * (taps + math.prod(self._full(shape[2:])))

    def linear(self, x: np.ndarray, w: np.ndarray) -> np.ndarray:
        n, c = x.shape[:2]
        spatial = x.shape[2:]
        nd = len(spatial)
        cand, _, mg = w.shape[:3]
        g = self.group
        cg, kk, pixels = c // g, math.prod(self.kernel), math.prod(spatial)
        xs = x.reshape(n, g, cg, pixels).transpose(1, 0, 3, 2).reshape(g, n * pixels, cg)
        wm = w.reshape(cand, g, cg, mg * kk).transpose(1, 2, 0, 3).reshape(g, cg, cand * mg * kk)
        # [g, n, *spatial, K, mg, *k] -> [*k, n, K, g, mg, *spatial]: one strided add per kernel tap.
        z = np.matmul(xs, wm).reshape(g, n, *spatial, cand, mg, *self.kernel)
        perm = (*range(4 + nd, 4 + 2 * nd), 1, 2 + nd, 0, 3 + nd, *range(2, 2 + nd))
        z = z.transpose(perm)
        full_shape = self._full(spatial)
        full = np.zeros((n, cand, g, mg, *full_shape), dtype=np.float32)
        for tap in np.ndindex(*self.kernel):
            window = tuple(
                slice(t * d, t * d + (size - 1) * s + 1, s)
                for t, d, size, s in zip(tap, self.dilations, spatial, self.strides, strict=True)
            )
            full[(Ellipsis,) + window] += z[tap]
        begin, end = self._resolved_pads(spatial)
        crop = tuple(slice(b, f - e) for b, e, f in zip(begin, end, full_shape, strict=True))
        out = full[(Ellipsis,) + crop]
        out_shape = out.shape[4:]
        out = out.reshape(n, cand, g * mg, math.prod(out_shape)).transpose(0, 3, 1, 2)
        return out.reshape(n * math.prod(out_shape), cand, g * mg)


@dataclass(frozen=True)
class GemmKernel:
    """Gemm ``alpha * A' B'`` (A' = A^T with transA; inputs are transposed once up front)."""

    trans_a: bool
    trans_b: bool
    alpha: float
    blockable: bool = True

    @classmethod
    def from_op(cls, op: Op, weight_shape: tuple[int, ...]) -> GemmKernel:
        if len(weight_shape) != 2:
            raise Unsupported(f"Gemm weight of rank {len(weight_shape)}")
        return cls(bool(op.attr("transA", 0)), bool(op.attr("transB", 0)), float(op.attr("alpha", 1.0)))

    def prepare(self, x: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(x.T) if self.trans_a else x

    def work(self, shape: tuple[int, ...], cand: int, m: int) -> int:
        return shape[-1] + cand * m

    def linear(self, x: np.ndarray, w: np.ndarray) -> np.ndarray:
        b = w.transpose(0, 2, 1) if self.trans_b else w  # [K, in, M]
        cand, k_in, m = b.shape
        y = x @ b.transpose(1, 0, 2).reshape(k_in, cand * m)
        if self.alpha != 1.0:
            y *= np.float32(self.alpha)
        return y.reshape(-1, cand, m)


@dataclass(frozen=True)
class MatMulKernel:
    """MatMul ``x @ W`` with a 2-d constant W: leading dims of x become rows."""

    blockable: bool = True

    @classmethod
    def from_op(cls, op: Op, weight_shape: tuple[int, ...]) -> MatMulKernel:
        if len(weight_shape) != 2:
            raise Unsupported(f"batched MatMul weight of rank {len(weight_shape)}")
        return cls()

    def prepare(self, x: np.ndarray) -> np.ndarray:
        return x.reshape(-1, x.shape[-1])

    def work(self, shape: tuple[int, ...], cand: int, m: int) -> int:
        return shape[-1] + cand * m

    def linear(self, x: np.ndarray, w: np.ndarray) -> np.ndarray:
        cand, k_in, m = w.shape
        return (x @ w.transpose(1, 0, 2).reshape(k_in, cand * m)).reshape(-1, cand, m)


Kernel = ConvKernel | ConvTransposeKernel | GemmKernel | MatMulKernel
_KERNELS: Final[dict[str, type[Kernel]]] = {
    "Conv": ConvKernel,
    "ConvTranspose": ConvTransposeKernel,
    "Gemm": GemmKernel,
    "MatMul": MatMulKernel,
}


def make_kernel(op: Op, weight_shape: tuple[int, ...]) -> Kernel:
    """The numpy model of ``op``'s linear part; raises Unsupported with the reason."""
    return _KERNELS[op.op_type].from_op(op, weight_shape)


def prepare_input(kernel: Kernel, x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return kernel.prepare(x) if isinstance(kernel, GemmKernel | MatMulKernel) else x


def layer_output(kernel: Kernel, x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None = None) -> np.ndarray:
    """The op's output as ``[rows, M]`` (for checks against onnxruntime)."""
    y = kernel.linear(prepare_input(kernel, x), np.asarray(weight, np.float32)[None])[:, 0]
    return y if bias is None else y + bias


def constant_bias(graph: Graph, op: Op, weight_shape: tuple[int, ...], kernel: Kernel) -> np.ndarray | None:
    """The constant bias (Gemm: ``beta * C``) as a per-output-channel vector, when it broadcasts so."""
    if op.op_type == "MatMul" or len(op.inputs) < 3 or not op.inputs[2]:
        return None
    t = graph.tensors[op.inputs[2]]
    if not t.is_constant:
        return None  # cancels in the error; only the sqnr loss's signal leaves it out
    b = np.asarray(t.data, dtype=np.float32)
    if op.op_type == "Gemm":
        assert isinstance(kernel, GemmKernel)
        m = weight_shape[0] if kernel.trans_b else weight_shape[1]
        if b.size not in (1, m) or (b.ndim == 2 and b.shape[0] != 1):
            return None
        return np.broadcast_to(b.reshape(-1) * np.float32(op.attr("beta", 1.0)), (m,)).copy()
    return b.reshape(-1)
