"""Differentiable weight quantizers and the optimisation loop AdaRound and AdaScale share (torch).

Grids follow ``qpasses.quant.encodings``: ``w ~= scale * (q + offset)``, ``q`` in ``[0, 2^bw - 1]``, one
(scale, offset) per channel along the encoding's axis. Each quantizer ends as an ordinary
``Encoding`` plus weight values that lie exactly on its grid, so the usual lowering (round to
nearest) stores the learned integers.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import torch
from tqdm import tqdm

from qpasses.quant.encodings import MIN_RANGE, Encoding, dequantize, quantize
from qpasses.quant.range_search import from_min_max

ZETA: Final = 1.1
GAMMA: Final = -0.1


def channel_shape(ndim: int, axis: int | None) -> tuple[int, ...]:
    """Shape that broadcasts a per-channel vector along ``axis`` of an ``ndim`` tensor (per tensor: scalar)."""
    if axis is None:
        return ()
    shape = [1] * ndim
    shape[axis] = -1
    return tuple(shape)


def _grid(enc: Encoding, ndim: int) -> tuple[torch.Tensor, torch.Tensor]:
    shape = channel_shape(ndim, enc.axis)
    scale = torch.tensor(enc.scale, dtype=torch.float64).reshape(shape)
    offset = torch.tensor(enc.offset, dtype=torch.float64).reshape(shape)
    return scale, offset


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round to nearest with the identity gradient (straight-through estimator)."""
    return x + (torch.round(x) - x).detach()


def rectified_sigmoid(v: torch.Tensor) -> torch.Tensor:
    """AdaRound's h(V) = clip(sigmoid(V) (zeta - gamma) + gamma, 0, 1)."""
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


class AdaRoundWeight(torch.nn.Module):
    """Learned rounding of one weight on a fixed grid: ``q = clamp(floor(w/s) + h(V) - offset, 0, levels)``.

    V starts where h(V) equals the fractional part of ``w/s``, so the soft weight starts at FP32
    (before clamping); the hard weight rounds up where V >= 0, never more than one step from ``w``.
    """

    floor_minus_offset: torch.Tensor  # buffers (register_buffer), typed for the checker
    scale: torch.Tensor
    offset: torch.Tensor

    def __init__(self, weight: np.ndarray, enc: Encoding) -> None:
        super().__init__()
        self.encoding = enc
        scale, offset = _grid(enc, weight.ndim)
        x = torch.from_numpy(weight.astype(np.float64)) / scale
        floor = torch.floor(x)
        rest = (x - floor).clamp(0.0, 1.0)
        v = -torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1.0)
        self.register_buffer("floor_minus_offset", (floor - offset).float())
        self.register_buffer("scale", scale.float())
        self.register_buffer("offset", offset.float())
        self.levels = float(enc.levels)
        self.v = torch.nn.Parameter(v.float())

    def forward(self, hard: bool = False) -> torch.Tensor:
        up = (self.v >= 0).float() if hard else rectified_sigmoid(self.v)
        q = torch.clamp(self.floor_minus_offset + up, 0.0, self.levels)
        return (q + self.offset) * self.scale

    def regularizer(self, beta: float) -> torch.Tensor:
        """sum(1 - |2 h(V) - 1|^beta): pushes every h(V) to 0 or 1."""
        h = rectified_sigmoid(self.v)
        return (1.0 - (2.0 * h - 1.0).abs().pow(beta)).sum()

    def result(self) -> tuple[Encoding, np.ndarray, np.ndarray]:
        """(encoding, weight on the grid, learned integers in [0, levels])."""
        with torch.no_grad():
            up = (self.v >= 0).double()
            q = torch.clamp(self.floor_minus_offset.double() + up, 0.0, self.levels).numpy().astype(np.int64)
        return self.encoding, dequantize(q, self.encoding, signed=False).astype(np.float32), q


def beta_at(step: int, steps: int, beta_range: tuple[float, float], warm_start: float) -> float | None:
    """AdaRound's annealed beta (cosine from start to end after the warm start); None during the warm start."""
    warm = warm_start * steps
    if step < warm:
        return None
    progress = (step - warm) / max(steps - warm, 1)
    start, end = beta_range
    return end + 0.5 * (start - end) * (1.0 + math.cos(progress * math.pi))


# --- AdaScale ---------------------------------------------------------------------------------------------

# Clipping factors are sigmoid(p) * (1 + e^-P0): exactly 1 at p = P0 (min-max), within [0, 1.14].
_P0: Final = 2.0
_FACTOR_MAX: Final = 1.0 + math.exp(-_P0)


class AdaScaleWeight(torch.nn.Module):
    """Learnable weight clipping (OmniQuant LWC) and weight scaling (FlexRound) on one weight.

    ``gamma``/``beta`` scale the grid's max/min per channel (sigmoid-parameterized, starting at
    the starting grid's range); ``s2`` (per element) and ``s3`` (per output channel) divide the
    weight before rounding, as FlexRound's ``W / (s1 exp(s2) exp(s3))``, which moves weights to
    other integers while dequantization uses the grid's scale alone. The grid follows
    ``range_search.from_min_max`` (symmetric or tf), so the result is an ordinary encoding of the
    folded weight ``W / (exp(s2) exp(s3))``.
    """

    weight: torch.Tensor  # buffers (register_buffer), typed for the checker
    lo: torch.Tensor
    hi: torch.Tensor

    def __init__(self, weight: np.ndarray, enc: Encoding, channel_axis: int) -> None:
        super().__init__()
        self.encoding = enc
        self.symmetric = enc.symmetric
        self.levels = float(enc.levels)
        self.half_levels = float(enc.half)  # not ``half``: that is nn.Module.half()
        shape = channel_shape(weight.ndim, enc.axis)
        self.register_buffer("weight", torch.from_numpy(weight.astype(np.float32)))
        self.register_buffer("lo", torch.tensor(enc.min, dtype=torch.float32).reshape(shape))
        self.register_buffer("hi", torch.tensor(enc.max, dtype=torch.float32).reshape(shape))
        self.gamma = torch.nn.Parameter(torch.full(self.hi.shape, _P0))
        self.beta = torch.nn.Parameter(torch.full(self.lo.shape, _P0))
        self.s2 = torch.nn.Parameter(torch.zeros(weight.shape))
        s3_shape = [1] * weight.ndim
        s3_shape[channel_axis] = weight.shape[channel_axis]
        self.s3 = torch.nn.Parameter(torch.zeros(s3_shape))

    def clip_parameters(self) -> list[torch.nn.Parameter]:
        return [self.gamma, self.beta]

    def scale_parameters(self) -> list[torch.nn.Parameter]:
        return [self.s2, self.s3]

    def _range(self) -> tuple[torch.Tensor, torch.Tensor]:
        return (self.lo * torch.sigmoid(self.beta) * _FACTOR_MAX, self.hi * torch.sigmoid(self.gamma) * _FACTOR_MAX)

    def _scale_offset(self, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The grid of ``from_min_max`` with gradients (offset rounded straight-through)."""
        if self.symmetric:
            scale = torch.maximum(
                torch.maximum(hi / (self.half_levels - 1), -lo / self.half_levels),
                torch.full_like(hi, MIN_RANGE / self.levels),
            )
            return scale, torch.full_like(scale, -self.half_levels)
        hi = torch.maximum(hi, lo + MIN_RANGE)
        lo, hi = torch.clamp(lo, max=0.0), torch.clamp(hi, min=0.0)
        scale = (hi - lo) / self.levels
        return scale, torch.clamp(round_ste(lo / scale), -self.levels, 0.0)

    def folded(self) -> torch.Tensor:
        return self.weight / (torch.exp(self.s2) * torch.exp(self.s3))

    def forward(self) -> torch.Tensor:
        scale, offset = self._scale_offset(*self._range())
        q = torch.clamp(round_ste(self.folded() / scale) - offset, 0.0, self.levels)
        return (q + offset) * scale

    def result(self) -> tuple[Encoding, np.ndarray, np.ndarray]:
        """(encoding of the learned range, folded weight on its grid, integers in [0, levels])."""
        with torch.no_grad():
            lo, hi = (t.double().numpy().reshape(-1) for t in self._range())
            folded = self.folded().double().numpy()
        enc = self.encoding
        lo, hi = np.minimum(lo, hi), np.maximum(lo, hi)
        learned = from_min_max(lo, hi, enc.bitwidth, symmetric=enc.symmetric, axis=enc.axis)
        q = quantize(folded, learned, signed=False).astype(np.int64)
        data = dequantize(q, learned, signed=False).astype(np.float32)
        return learned, data, q


# --- data and the loop ------------------------------------------------------------------------------------


def as_tensors(batches: Sequence[np.ndarray]) -> list[torch.Tensor]:
    return [torch.from_numpy(np.array(b, order="C", copy=True)) for b in batches]


def _rows(out: torch.Tensor) -> int:
    """How many channel vectors the loss averages over: every element but those along axis 1."""
    return max(out.numel() // out.shape[1], 1) if out.dim() >= 2 else max(out.numel(), 1)


def reconstruction_loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Squared error summed over axis 1 (channels) and averaged over the rest, as AIMET's AdaRound/AdaScale.

    One fused ``mse_loss`` sum (divided by the number of channel vectors) rather than
    ``(out - target).pow(2).sum(1).mean()``: the same value, but one pass over the output forward and one
    backward instead of four each, which is most of a step on layers with large outputs and few MACs
    (a 1-input-channel Conv on a 900x120 map).
    """
    return torch.nn.functional.mse_loss(out, target, reduction="sum") / _rows(out)


@dataclass
class LossSummary:
    loss: float  # reconstruction loss, mean over batches
    mse: float  # mean squared error per element


def evaluate(forward: Callable[[int], torch.Tensor], targets: Sequence[torch.Tensor]) -> LossSummary:
    """Loss and MSE of ``forward(batch)`` against ``targets`` over every batch, without gradients."""
    loss = sq = 0.0
    count = 0
    with torch.no_grad():
        for i, target in enumerate(targets):
            out = forward(i)
            total = float(torch.nn.functional.mse_loss(out, target, reduction="sum"))  # one pass, no copies
            loss += total / _rows(out)
            sq += total
            count += target.numel()
    return LossSummary(loss / max(len(targets), 1), sq / max(count, 1))


def progress_bar(total: int, desc: str, enabled: bool, unit: str) -> Any:
    return tqdm(
        total=total, desc=desc, unit=unit, file=sys.stderr, disable=not enabled, leave=False, dynamic_ncols=True
    )


def batch_order(steps: int, batches: int, generator: torch.Generator) -> list[int]:
    """Batch index per step: every batch once per epoch, in a fresh random order each epoch."""
    order: list[int] = []
    while len(order) < steps:
        order += torch.randperm(batches, generator=generator).tolist()
    return order[:steps]


def held_out_batches(count: int, fraction: float) -> list[int]:
    """Indices of the batches kept out of learning: ``round(fraction * count)`` of them, at least 1 when
    ``fraction`` > 0 and never all, spread evenly over the calibration order; none below 2 batches."""
    if fraction <= 0 or count < 2:
        return []
    held = min(max(round(fraction * count), 1), count - 1)
    return sorted({int((k + 0.5) * count / held) for k in range(held)})


MULTI_THREAD_MACS: Final = 50_000_000  # per forward; a step (forward + backward) is about 3x that


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """torch's intra-op thread count set to ``count`` inside the block, restored after."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def pick_threads(requested: int, macs: int) -> int:
    """``requested`` when > 0; otherwise 1 for steps under ``MULTI_THREAD_MACS`` multiply-accumulates, else
    torch's default.

    Layers of small models run several times faster on one thread (and dozens of times faster on a
    busy machine, where torch's threads wait on each other); large layers gain from all cores. The
    choice depends only on the layer's shapes, so a run is reproducible on a machine.
    """
    if requested > 0:
        return requested
    return 1 if macs < MULTI_THREAD_MACS else max(torch.get_num_threads(), 1)


def gain_db(before: float, after: float) -> float:
    return 10.0 * math.log10((before + 1e-30) / (after + 1e-30))


__all__ = [
    "AdaRoundWeight",
    "AdaScaleWeight",
    "LossSummary",
    "as_tensors",
    "batch_order",
    "beta_at",
    "channel_shape",
    "evaluate",
    "gain_db",
    "held_out_batches",
    "pick_threads",
    "progress_bar",
    "reconstruction_loss",
    "rectified_sigmoid",
    "round_ste",
    "torch_threads",
]
