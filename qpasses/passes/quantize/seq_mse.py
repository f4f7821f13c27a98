"""SeqMSE: choose each weight channel's range by the error it causes in the layer's output.

Min-max weight encodings spend the grid on each channel's largest weight; at 4 bits clipping a
few outliers usually lowers the layer's output error far more than it costs. For each
Conv/ConvTranspose/Gemm/MatMul with a constant weight, in topological order, the candidates
``k/N x`` the symmetric min-max range (k = 1..N; k = N *is* min-max, so the result is never worse
than min-max on the data) are scored by the loss between the FP32 output and the output with
fake-quantized weights, summed per output channel over the calibration batches. Each channel
keeps its best candidate and the encoding is frozen (``meta["encoding_source"] = "seq-mse"``,
which ``encode-weights`` leaves alone).

Layer inputs (AIMET's ``inp_symmetry``): ``symqt`` feeds both sides what the model computes with
the already-frozen weights fake-quantized (activations stay float, as in AIMET); ``symfp`` feeds
both sides the FP32 inputs; ``asym`` compares the FP32 output on FP32 inputs with the quantized
output on quantized inputs. onnxruntime only *captures* inputs: once per layer (once per run of
layers that do not feed each other), or once in all for FP32 inputs. Candidates are then scored
in numpy, vectorised over candidates and channels, instead of AIMET's onnxruntime run of a cut
out layer per candidate.
"""

from __future__ import annotations

import itertools
import math
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from tqdm import tqdm

from graph_ir import Graph, Op
from qpasses.core.analyses import ConstantData, Shapes, TopologicalOrder
from qpasses.core.context import PassContext
from qpasses.core.errors import EncodingError, PassError
from qpasses.core.pass_base import Pass, PassResult
from qpasses.data.calibration import capture_tensors, unavailable_tensors
from qpasses.data.weight_swap import SwappedWeights
from qpasses.passes.quantize.calibrate import calibration_feeds
from qpasses.quant.encodings import MIN_RANGE, Encoding, fake_quantize, from_min_max, validate_bitwidth
from qpasses.quant.plan import QuantPlan, WeightSpec
from qpasses.quant.precision_type import tensor_precision

SYMMETRIES: Final = ("asym", "symfp", "symqt")
LOSSES: Final = ("mse", "l1", "sqnr")
SUPPORTED: Final = ("Conv", "ConvTranspose", "Gemm", "MatMul")

# Elements of the largest float32 scratch array (outputs for all candidates, im2col patches):
# 2^23 x 4 bytes = 32 MiB keeps a layer's working set bounded whatever the batch or layer size.
_CHUNK: Final = 1 << 23
_EPS: Final = 1e-20


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


def _conv_attributes(op: Op, weight_shape: tuple[int, ...], channels: str
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
        return cls(group, kernel, strides, dilations, tuple(op.attr("pads", [0] * 2 * nd)),
                   _text(op.attr("auto_pad", "NOTSET")))

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
        return [(size + b + e - (d * (k - 1) + 1)) // s + 1 for size, b, e, k, s, d in
                zip(spatial, begin, end, self.kernel, self.strides, self.dilations, strict=True)]

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
        out = view.shape[2:2 + nd]
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
        return cls(group, kernel, strides, dilations,
                   tuple(op.attr("pads", [0] * 2 * nd)), tuple(op.attr("output_padding", [0] * nd)),
                   tuple(shape[-nd:]) if shape is not None else None, _text(op.attr("auto_pad", "NOTSET")))

    def _full(self, spatial: Sequence[int]) -> list[int]:
        return [(size - 1) * s + (k - 1) * d + 1 + p for size, s, k, d, p in
                zip(spatial, self.strides, self.kernel, self.dilations, self.output_padding, strict=True)]

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
            window = tuple(slice(t * d, t * d + (size - 1) * s + 1, s) for t, d, size, s in
                           zip(tap, self.dilations, spatial, self.strides, strict=True))
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
    "Conv": ConvKernel, "ConvTranspose": ConvTransposeKernel, "Gemm": GemmKernel, "MatMul": MatMulKernel,
}


def make_kernel(op: Op, weight_shape: tuple[int, ...]) -> Kernel:
    """The numpy model of ``op``'s linear part; raises Unsupported with the reason."""
    return _KERNELS[op.op_type].from_op(op, weight_shape)


def _prepare(kernel: Kernel, x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return kernel.prepare(x) if isinstance(kernel, GemmKernel | MatMulKernel) else x


def layer_output(kernel: Kernel, x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None = None) -> np.ndarray:
    """The op's output as ``[rows, M]`` (for checks against onnxruntime)."""
    y = kernel.linear(_prepare(kernel, x), np.asarray(weight, np.float32)[None])[:, 0]
    return y if bias is None else y + bias


# --- the search ---------------------------------------------------------------------------------------


@dataclass
class Layer:
    """One op to search: its weight, data input, kernel and encoding layout."""

    op: str
    op_type: str
    input: str
    weight: str
    data: np.ndarray
    bias: np.ndarray | None
    kernel: Kernel
    axis: int
    bitwidth: int


@dataclass(frozen=True)
class LayerResult:
    """What the search found for one layer (kept in the ``SeqMseResults`` artifact by op name).

    ``fractions``: chosen range per encoding channel as a fraction of min-max. ``loss``/``mse``
    and their ``minmax_`` twins: totals over channels and calibration batches (mse per element).
    """

    weight: str
    encoding: Encoding
    fractions: tuple[float, ...]
    loss: float
    minmax_loss: float
    mse: float
    minmax_mse: float


class SeqMseResults(dict[str, LayerResult]):
    """Artifact: per layer op name, what SeqMSE chose."""


def _minmax_encoding(data: np.ndarray, axis: int | None, bitwidth: int) -> Encoding:
    """The symmetric min-max encoding encode-weights computes (the k = N candidate)."""
    if axis is None:
        return from_min_max(data.min(), data.max(), bitwidth, symmetric=True)
    rows = np.moveaxis(data, axis, 0).reshape(data.shape[axis], -1)
    return from_min_max(rows.min(axis=1), rows.max(axis=1), bitwidth, symmetric=True, axis=axis)


def _fake_quant_stack(data: np.ndarray, scales: np.ndarray, axis: int | None, bitwidth: int) -> np.ndarray:
    """``[K, *data.shape]``: data on each candidate's grid (signed symmetric, ONNX rounding)."""
    half = 2 ** (bitwidth - 1)
    shape = [scales.shape[0]] + [1] * data.ndim
    if axis is not None:
        shape[axis + 1] = scales.shape[1]
    s = scales.reshape(shape)
    q = np.clip(np.rint(data.astype(np.float64)[None] / s), -half, half - 1)
    return (q * s).astype(np.float32)


def _blocks(total: int, size: int) -> Iterator[slice]:
    for start in range(0, total, size):
        yield slice(start, min(start + size, total))


def _take(a: np.ndarray, axis: int, sl: slice) -> np.ndarray:
    return a[(slice(None),) * axis + (sl,)]


def search_layer(layer: Layer, fp_inputs: Sequence[np.ndarray], q_inputs: Sequence[np.ndarray] | None,
                 *, num_candidates: int, loss_fn: str, per_channel: bool) -> LayerResult:
    """Grid-search the layer's weight ranges on its captured inputs (one array per batch).

    ``q_inputs`` None: both sides see ``fp_inputs`` (symfp, or symqt where the caller passes the
    quantized model's inputs); otherwise the FP32 output on ``fp_inputs`` is compared with the
    quantized output on ``q_inputs`` (asym).
    """
    w, kernel, bw = layer.data.astype(np.float32), layer.kernel, layer.bitwidth
    axis = layer.axis if per_channel else None
    base_scale = np.asarray(_minmax_encoding(w, axis, bw).scale)
    fractions = np.arange(1, num_candidates + 1) / num_candidates
    scales = np.maximum(fractions[:, None] * base_scale[None], MIN_RANGE / (2**bw - 1))
    scales[-1] = base_scale  # exactly encode-weights' min-max encoding
    channels = w.shape[layer.axis]

    # Blocks of channels along the encoding axis keep the candidate stack and the outputs bounded.
    block = channels
    if kernel.blockable:
        block = max(1, min(channels, _CHUNK // ((num_candidates + 1) * (w.size // channels))))
    parts: list[tuple[np.ndarray, np.ndarray]] = []
    rows = 0
    for sl in _blocks(channels, block):
        wb = _take(w, layer.axis, sl)
        stack = _fake_quant_stack(wb, scales if axis is None else scales[:, sl], axis, bw)
        bias = None if layer.bias is None else layer.bias[sl] if block < channels else layer.bias
        if q_inputs is None:
            # Error = x (Wq - W) directly (no cancellation); the FP32 output rides along as one more candidate.
            stack = np.concatenate([stack - wb[None], wb[None]])
        loss_b, noise_b, rows = _accumulate(kernel, wb, stack, bias, fp_inputs, q_inputs, loss_fn)
        parts.append((loss_b, noise_b))
    loss = np.concatenate([p[0] for p in parts], axis=1)
    noise = np.concatenate([p[1] for p in parts], axis=1)
    elements = max(rows * loss.shape[1], 1)

    if isinstance(kernel, ConvTransposeKernel):  # output channel g*mg + j shares weight channel j
        loss = loss.reshape(num_candidates, kernel.group, channels).sum(axis=1)
        noise = noise.reshape(num_candidates, kernel.group, channels).sum(axis=1)
    if axis is None:
        loss, noise = loss.sum(axis=1, keepdims=True), noise.sum(axis=1, keepdims=True)
    # Ties (dead channels, identical grids) go to the widest range: min-max unless something is better.
    pick = num_candidates - 1 - np.argmin(loss[::-1], axis=0)
    cols = np.arange(loss.shape[1])
    chosen = scales[pick, cols]
    half = 2 ** (bw - 1)
    encoding = Encoding(bw, tuple(chosen), (-half,) * chosen.size, True, axis)
    return LayerResult(layer.weight, encoding, tuple(float(fractions[p]) for p in pick),
                       float(loss[pick, cols].sum()), float(loss[-1].sum()),
                       float(noise[pick, cols].sum() / elements), float(noise[-1].sum() / elements))


def _accumulate(kernel: Kernel, w: np.ndarray, stack: np.ndarray, bias: np.ndarray | None,
                fp_inputs: Sequence[np.ndarray], q_inputs: Sequence[np.ndarray] | None,
                loss_fn: str) -> tuple[np.ndarray, np.ndarray, int]:
    """Loss and squared error per (candidate, output channel), summed over batches; and the row count.

    mse and l1 sum over rows as AIMET does; sqnr is AIMET's neg_sqnr, -SQNR in dB per batch and
    channel, summed over batches.
    """
    symmetric = q_inputs is None
    cand = stack.shape[0] - symmetric
    loss: np.ndarray | float = 0.0
    noise: np.ndarray | float = 0.0
    rows = 0
    for b, x_fp in enumerate(fp_inputs):
        x_fp = _prepare(kernel, x_fp)
        x_q = None if q_inputs is None else _prepare(kernel, q_inputs[b])
        sq: np.ndarray | float = 0.0
        ab: np.ndarray | float = 0.0
        signal: np.ndarray | float = 0.0
        per_sample = kernel.work(x_fp.shape, cand + 1, _out_channels(kernel, w))
        for sl in _blocks(x_fp.shape[0], max(1, _CHUNK // max(per_sample, 1))):
            if x_q is None:
                y = kernel.linear(x_fp[sl], stack)
                err, target = y[:, :cand], y[:, cand]
            else:
                target = kernel.linear(x_fp[sl], w[None])[:, 0]
                err = kernel.linear(x_q[sl], stack)
                err -= target[:, None]
            rows += err.shape[0]
            sq = sq + np.einsum("rkm,rkm->km", err, err, dtype=np.float64)
            if loss_fn == "l1":
                ab = ab + np.abs(err).sum(axis=0, dtype=np.float64)
            elif loss_fn == "sqnr":
                if bias is not None:
                    target = target + bias
                signal = signal + np.einsum("rm,rm->m", target, target, dtype=np.float64)
        noise = noise + sq
        if loss_fn == "mse":
            loss = loss + sq
        elif loss_fn == "l1":
            loss = loss + ab
        else:
            loss = loss - 10.0 * np.log10((signal + _EPS) / (np.asarray(sq) + _EPS))
    return np.asarray(loss), np.asarray(noise), rows


def _out_channels(kernel: Kernel, w: np.ndarray) -> int:
    if isinstance(kernel, ConvKernel):
        return w.shape[0]
    if isinstance(kernel, ConvTransposeKernel):
        return w.shape[1] * kernel.group
    if isinstance(kernel, GemmKernel) and kernel.trans_b:
        return w.shape[0]
    return w.shape[1]


# --- which layers a tensor depends on ---------------------------------------------------------------


def _upstream_layers(graph: Graph, order: Sequence[Op], layers: Sequence[Layer]) -> dict[str, int]:
    """Bitmask per tensor of the layers (by index) whose weights it depends on."""
    index = {layer.op: i for i, layer in enumerate(layers)}
    masks: dict[str, int] = {}
    for op in order:
        m = 0
        for name in op.inputs:
            m |= masks.get(name, 0)
        if op.name in index:
            m |= 1 << index[op.name]
        for name in op.outputs:
            masks[name] = m
    return masks


# --- the pass ---------------------------------------------------------------------------------------


class SeqMSE(Pass):
    name = "seq-mse"
    description = "SeqMSE: per-channel weight ranges searched layer by layer on calibration data"
    uses = (QuantPlan,)
    preserves = (TopologicalOrder, Shapes, ConstantData, QuantPlan)

    @dataclass
    class Options:
        num_batches: int = 4
        num_candidates: int = 20
        # AIMET defaults to symqt; asym measured better on every model here (+6.6 dB W4A8 on
        # digits_cnn where symqt lost 2.4 dB: per-layer greedy search can't see cross-layer
        # error cancellation, while asym compares against the FP32 output and compensates).
        inp_symmetry: str = "asym"
        loss_fn: str = "mse"
        exclude: list[str] = field(default_factory=list)
        weight_bw: int = 8
        per_channel: bool = True
        batch_size: int = 16
        progress: bool = True

    def _check_options(self) -> None:
        o = self.options
        if o.inp_symmetry not in SYMMETRIES:
            raise PassError(f"pass 'seq-mse': unknown inp_symmetry {o.inp_symmetry!r} "
                            f"(expected one of {', '.join(SYMMETRIES)})")
        if o.loss_fn not in LOSSES:
            raise PassError(f"pass 'seq-mse': unknown loss_fn {o.loss_fn!r} (expected one of {', '.join(LOSSES)})")
        for key in ("num_batches", "num_candidates", "batch_size"):
            if getattr(o, key) < 1:
                raise PassError(f"pass 'seq-mse': {key} must be >= 1, got {getattr(o, key)}")
        validate_bitwidth(o.weight_bw, "weight")

    def _layers(self, graph: Graph, order: Sequence[Op], weights: dict[str, WeightSpec]) -> list[Layer]:
        """Supported ops in topological order; the others get a 'missed' remark saying why."""
        o = self.options
        excluded = set(o.exclude)
        unknown = excluded - {op.name for op in order}
        if unknown:
            self.remarks.missed("excluded ops not found", sorted(unknown), reason="no op of that name")
        layers: list[Layer] = []
        for op in order:
            if op.op_type not in SUPPORTED or not op.is_standard or len(op.inputs) < 2:
                continue
            name = op.inputs[1]
            spec = weights.get(name)
            if spec is None:
                continue  # no constant float weight: nothing to encode
            t = graph.tensors[name]
            precision = tensor_precision(t)  # annotate-precision / precision overrides
            bits = precision.bitwidth if precision is not None and not precision.is_float else o.weight_bw
            reason = ""
            if op.name in excluded:
                reason = "excluded by the exclude option"
            elif spec.op != op.name:
                reason = f"weight '{name}' is shared; it is searched for {spec.op}"
            elif spec.axis is None:
                reason = f"weight '{name}' is shared by layers with different output-channel axes"
            elif t.meta.get("encoding_source") == "override":
                reason = "weight encoding given by the overrides file"
            elif precision is not None and precision.is_float:
                reason = f"the weight is annotated {precision}"
            elif not 4 <= bits <= 16:
                reason = f"{bits}-bit weights are outside SeqMSE's 4-16 bit grids"
            elif not op.inputs[0]:
                reason = "no data input"
            elif any(c.op_type == "BatchNormalization" for out in op.outputs[:1] for c in graph.consumers(out)):
                # Folding it later would rescale the weight under the frozen encoding.
                reason = "a BatchNormalization follows: run fold-batchnorm before seq-mse"
            if reason or spec.axis is None:  # an axis of None has its reason above
                self.remarks.missed("not searched", [op.name], reason=reason)
                continue
            data = np.asarray(t.data)
            try:
                kernel = make_kernel(op, data.shape)
            except Unsupported as exc:
                self.remarks.missed("not searched", [op.name], reason=f"unsupported {op.op_type}: {exc}")
                continue
            bias = constant_bias(graph, op, data.shape, kernel)
            layers.append(Layer(op.name, op.op_type, op.inputs[0], name, data, bias, kernel, spec.axis, bits))
        return layers

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        self._check_options()
        o = self.options
        plan = ctx.get(QuantPlan, graph).plan
        target = ctx.target
        per_channel = o.per_channel and (target is None or getattr(target, "per_channel_weights", True))
        if o.per_channel and not per_channel:
            self.remarks.missed("per-channel search disabled", reason=f"target {target.name} is per-tensor only")
        order = ctx.get(TopologicalOrder, graph).order
        layers = self._layers(graph, order, plan.weights)
        if not layers:
            self.remarks.analysis("no supported layers to search")
            return self.result(False)

        feeds = list(itertools.islice(calibration_feeds(ctx.calibration_data, graph, o.batch_size), o.num_batches))
        model = graph.to_onnx()
        missing = unavailable_tensors(model, [layer.input for layer in layers])
        for layer in [la for la in layers if la.input in missing]:
            self.remarks.missed("not searched", [layer.op], reason=f"input '{layer.input}' is {missing[layer.input]}")
        layers = [la for la in layers if la.input not in missing]
        if not layers:
            return self.result(False)

        symmetry = o.inp_symmetry
        fp: dict[str, list[np.ndarray]] = {}
        if symmetry in ("symfp", "asym"):  # FP32 inputs do not depend on any choice: one capture for all
            fp = capture_tensors(model, list(dict.fromkeys(la.input for la in layers)), feeds)
        quantized = SwappedWeights(model) if symmetry != "symfp" else None
        if quantized is not None:
            # Weights with overridden encodings are already decided: the quantized model uses them.
            for name in plan.weights:
                t = graph.tensors[name]
                if t.meta.get("encoding_source") == "override" and isinstance(t.encoding, Encoding):
                    try:
                        quantized.set(name, fake_quantize(np.asarray(t.data, np.float32), t.encoding))
                    except EncodingError:
                        pass  # a layout mismatch is reported by the lowering, not here
        last_use = {la.input: i for i, la in enumerate(layers)}
        masks = _upstream_layers(graph, order, layers)

        results: dict[str, LayerResult] = {}
        bar = tqdm(total=len(layers), desc="seq-mse", unit="layer", file=sys.stderr, disable=not o.progress,
                   leave=False)
        try:
            start = 0
            while start < len(layers):
                # Layers whose inputs do not depend on the not-yet-frozen ones share one capture.
                stop = start + 1
                while stop < len(layers) and not masks.get(layers[stop].input, 0) & ((1 << stop) - (1 << start)):
                    stop += 1
                group = layers[start:stop]
                captured: dict[str, list[np.ndarray]] = {}
                if quantized is not None:
                    captured = capture_tensors(quantized.model, list(dict.fromkeys(la.input for la in group)), feeds)
                for i, layer in enumerate(group, start):
                    if symmetry == "symqt":
                        x_fp, x_q = captured[layer.input], None
                    elif symmetry == "symfp":
                        x_fp, x_q = fp[layer.input], None
                    else:
                        x_fp, x_q = fp[layer.input], captured[layer.input]
                    res = search_layer(layer, x_fp, x_q, num_candidates=o.num_candidates, loss_fn=o.loss_fn,
                                       per_channel=per_channel)
                    self._freeze(graph, layer, res)
                    if quantized is not None:
                        quantized.set(layer.weight, fake_quantize(layer.data.astype(np.float32), res.encoding))
                    if last_use[layer.input] == i:
                        fp.pop(layer.input, None)
                    results[layer.op] = res
                    bar.update()
                start = stop
        finally:
            bar.close()
        ctx.artifacts.put(SeqMseResults(results))
        samples = sum(len(v) for f in feeds for v in itertools.islice(f.values(), 1) if np.ndim(v))
        self.remarks.applied(f"searched {len(results)} layers ({o.num_candidates} candidates, {o.inp_symmetry}, "
                             f"{o.loss_fn}) on {samples} samples in {len(feeds)} batches")
        return self.result(bool(results))

    def _freeze(self, graph: Graph, layer: Layer, res: LayerResult) -> None:
        t = graph.tensors[layer.weight]
        t.encoding = res.encoding
        t.meta["encoding_source"] = "seq-mse"
        gain = 10.0 * math.log10((res.minmax_mse + _EPS) / (res.mse + _EPS))
        fr = np.asarray(res.fractions)
        loss = self.options.loss_fn
        self.remarks.applied(
            f"{layer.bitwidth}-bit {layer.op_type} weight: output MSE {res.mse:.4g} vs min-max {res.minmax_mse:.4g} "
            f"({gain:+.2f} dB), {loss} loss {res.loss:.4g} vs {res.minmax_loss:.4g}; "
            f"range {fr.min():.2f}-{fr.max():.2f} x min-max (mean {fr.mean():.2f})",
            [layer.op],
        )


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
