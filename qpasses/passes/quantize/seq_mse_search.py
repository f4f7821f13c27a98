"""SeqMSE's search: per layer, score ``k/N x`` min-max candidates per output channel on captured inputs
and keep each channel's best (the pass that captures inputs and freezes encodings is ``seq_mse``)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Final

import numpy as np

from graph_ir import Graph, Op
from qpasses.passes.quantize.layer_kernels import ConvKernel, ConvTransposeKernel, GemmKernel, Kernel, prepare_input
from qpasses.quant.encodings import MIN_RANGE, Encoding
from qpasses.quant.range_search import from_min_max

# Elements of the largest float32 scratch array (outputs for all candidates, im2col patches):
# 2^23 x 4 bytes = 32 MiB keeps a layer's working set bounded whatever the batch or layer size.
_CHUNK: Final = 1 << 23
_EPS: Final = 1e-20


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


def search_layer(
    layer: Layer,
    fp_inputs: Sequence[np.ndarray],
    q_inputs: Sequence[np.ndarray] | None,
    *,
    num_candidates: int,
    loss_fn: str,
    per_channel: bool,
) -> LayerResult:
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
    return LayerResult(
        layer.weight,
        encoding,
        tuple(float(fractions[p]) for p in pick),
        float(loss[pick, cols].sum()),
        float(loss[-1].sum()),
        float(noise[pick, cols].sum() / elements),
        float(noise[-1].sum() / elements),
    )


def _accumulate(
    kernel: Kernel,
    w: np.ndarray,
    stack: np.ndarray,
    bias: np.ndarray | None,
    fp_inputs: Sequence[np.ndarray],
    q_inputs: Sequence[np.ndarray] | None,
    loss_fn: str,
) -> tuple[np.ndarray, np.ndarray, int]:
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
        x_fp = prepare_input(kernel, x_fp)
        x_q = None if q_inputs is None else prepare_input(kernel, q_inputs[b])
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


def upstream_layers(graph: Graph, order: Sequence[Op], layers: Sequence[Layer]) -> dict[str, int]:
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
