"""Range search: from observed values (or observers) to an encoding — tf, symmetric, adjusted,
tf_enhanced (AIMET's SQNR search over candidate grids), percentile — and the derived int32 bias grid.

The value type and the grid arithmetic are in ``qpasses.quant.encodings``; this module only decides
which range (min, max) a tensor gets.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Final, get_args

import numpy as np
from numpy.typing import ArrayLike

from qpasses.core.errors import EncodingError
from qpasses.quant.encodings import MIN_RANGE, Encoding, Mode, Role, check_bitwidth, validate_bitwidth
from qpasses.quant.range_statistics import DEFAULT_BINS, Histogram, HistogramObserver, MinMaxObserver

Source = ArrayLike | MinMaxObserver | HistogramObserver | Histogram


# tf_enhanced search (AIMET's candidate grid, plus a refinement round and a few finer steps for
# tails beyond 16x): saturation error is weighted 3x against rounding noise.
_ENHANCED_STEP_FRACTIONS: Final = np.concatenate([np.arange(1, 18) / 16, 2.0 ** -np.arange(5, 9)])
_ENHANCED_OFFSETS: Final = 21
_ENHANCED_SYMMETRIC_STEPS: Final = np.arange(1, 102) / 100
_SATURATION_WEIGHT: Final = 3.0


def _round_away(x: np.ndarray) -> np.ndarray:
    """Round half away from zero: the spec's [-5.1, 5.1] tie moves min down to -5.12."""
    return np.sign(x) * np.floor(np.abs(x) + 0.5)


def _tf_grid(lo: np.ndarray, hi: np.ndarray, bitwidth: int) -> tuple[np.ndarray, np.ndarray]:
    """The spec's min/max rule: widen to MIN_RANGE, include 0, then shift (not rescale) so 0 is a level."""
    levels = 2**bitwidth - 1
    hi = np.maximum(hi, lo + MIN_RANGE)
    lo, hi = np.minimum(lo, 0.0), np.maximum(hi, 0.0)
    scale = (hi - lo) / levels
    offset = np.clip(_round_away(lo / scale), -levels, 0)
    return scale, offset.astype(np.int64)


def _symmetric_grid(lo: np.ndarray, hi: np.ndarray, bitwidth: int) -> tuple[np.ndarray, np.ndarray]:
    """Signed symmetric with offset -2^(b-1), using the extra negative level.

    step = max(max / (2^(b-1) - 1), -min / 2^(b-1)).
    """
    half = 2 ** (bitwidth - 1)
    lo, hi = np.minimum(lo, 0.0), np.maximum(hi, 0.0)
    scale = np.maximum(np.maximum(hi / (half - 1), -lo / half), MIN_RANGE / (2**bitwidth - 1))
    return scale, np.full(scale.shape, -half, dtype=np.int64)


def _adjusted_grid(lo: np.ndarray, hi: np.ndarray, bitwidth: int) -> tuple[np.ndarray, np.ndarray]:
    """TF adjusted: 0 on the grid by expanding max or lowering min instead of shifting the grid.

    tf mode's shift can cut off the true max (the spec's 0.5 becomes 0.4961); here the smallest
    step whose grid covers the whole [min, max] with 0 on a level is chosen: for ``k`` levels below
    zero the step is ``max(-min/k, max/(levels-k))``, minimised at k = floor or ceil of the ideal.
    """
    levels = 2**bitwidth - 1
    hi = np.maximum(hi, lo + MIN_RANGE)
    lo, hi = np.minimum(lo, 0.0), np.maximum(hi, 0.0)
    ideal = levels * -lo / (hi - lo)
    below = np.clip(np.stack([np.floor(ideal), np.ceil(ideal)]), 0, levels)
    with np.errstate(divide="ignore", invalid="ignore"):
        # 0/0 (nothing on that side) is NaN and ignored by fmax; x/0 is inf and never chosen.
        steps = np.fmax(-lo / below, hi / (levels - below))
    pick = np.argmin(steps, axis=0)
    columns = np.arange(lo.shape[0])
    return steps[pick, columns], -below[pick, columns].astype(np.int64)


def grid_error(centers: np.ndarray, pdf: np.ndarray, steps: np.ndarray, offsets: np.ndarray, levels: int) -> np.ndarray:
    """Expected error per candidate grid (``offsets * steps`` to ``(offsets + levels) * steps``) for values
    at ``centers`` with weights ``pdf``: saturation (weighted, as tf_enhanced) + uniform rounding noise step^2/12.

    The rounding term uses the uniform-noise expectation instead of each midpoint's own rounding
    error, which would alias with the bin grid and make the search jumpy.
    """
    lo = offsets * steps
    hi = lo + levels * steps
    clipped = np.clip(centers, lo[..., None], hi[..., None])
    saturation = ((centers - clipped) ** 2 * pdf).sum(axis=-1)
    inside = (pdf * (clipped == centers)).sum(axis=-1)
    return _SATURATION_WEIGHT * saturation + inside * steps**2 / 12


def _enhanced_grid(hist: Histogram, bitwidth: int, symmetric: bool) -> tuple[float, int]:
    """tf_enhanced: search step sizes (and offsets) minimising the expected quantization error."""
    levels = 2**bitwidth - 1
    centers = hist.centers
    pdf = hist.counts / max(hist.total, 1)
    lo, hi = np.array([hist.min]), np.array([hist.max])
    if symmetric:
        base, offset = _symmetric_grid(lo, hi, bitwidth)
        steps = base[0] * _ENHANCED_SYMMETRIC_STEPS
        cost = grid_error(centers, pdf, steps, np.full_like(steps, offset[0]), levels)
        return max(float(steps[np.argmin(cost)]), MIN_RANGE / levels), int(offset[0])

    def search(steps: np.ndarray, offsets: np.ndarray) -> tuple[float, float, float]:
        grid = np.broadcast_to(offsets, (len(steps), len(offsets)))
        cost = grid_error(centers, pdf, steps[:, None], grid, levels)
        i, j = np.unravel_index(np.argmin(cost), cost.shape)
        return float(cost[i, j]), float(steps[i]), float(grid[i, j])

    base, base_offset = _tf_grid(lo, hi, bitwidth)
    tf_candidate = search(base, base_offset.astype(np.float64))
    coarse = search(base[0] * _ENHANCED_STEP_FRACTIONS, np.round(np.linspace(-levels, 0, _ENHANCED_OFFSETS)))
    _, coarse_step, coarse_offset = min(tf_candidate, coarse)
    # Refine around the winner: finer steps, and offsets within +-5% of the grid.
    around = np.clip(np.round(coarse_offset + np.linspace(-1, 1, _ENHANCED_OFFSETS) * levels / 20), -levels, 0)
    fine = search(coarse_step * np.linspace(15 / 16, 17 / 16, 17), around)
    _, best_step, best_offset = min(tf_candidate, coarse, fine)
    return max(best_step, MIN_RANGE / levels), int(best_offset)


# --- compute ---------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class _Stats:
    """What the modes need, one entry per channel: exact range, and raw rows or histograms if known."""

    lo: np.ndarray
    hi: np.ndarray
    axis: int | None
    rows: np.ndarray | None = None
    histograms: tuple[Histogram, ...] | None = None


def _stats(source: Source, axis: int | None) -> _Stats:
    if isinstance(source, HistogramObserver):
        source = source.histogram
    if isinstance(source, Histogram):
        if axis is not None:
            raise EncodingError("a histogram holds per-tensor statistics; per-channel needs raw values")
        return _Stats(np.array([source.min]), np.array([source.max]), None, histograms=(source,))
    if isinstance(source, MinMaxObserver):
        if source.min is None or source.max is None:
            raise EncodingError("min/max observer has not seen any values")
        if axis is not None and axis != source.axis:
            raise EncodingError(f"axis {axis} requested but the observer collected along axis {source.axis}")
        return _Stats(source.min, source.max, source.axis)

    x = np.asarray(source, dtype=np.float64)
    if x.size == 0:
        raise EncodingError("cannot compute an encoding from an empty array")
    if not np.isfinite(x).all():
        raise EncodingError("cannot compute an encoding from NaN or infinite values")
    if axis is None:
        rows = x.reshape(1, -1)
    else:
        if not -x.ndim <= axis < x.ndim:
            raise EncodingError(f"channel axis {axis} is out of range for shape {x.shape}")
        axis %= x.ndim
        rows = np.moveaxis(x, axis, 0).reshape(x.shape[axis], -1)
        if rows.shape[1] == 0:
            raise EncodingError(f"tensor of shape {x.shape} has no values per channel")
    return _Stats(rows.min(axis=1), rows.max(axis=1), axis, rows=rows)


def from_min_max(
    lo: ArrayLike, hi: ArrayLike, bitwidth: int, *, symmetric: bool = False, axis: int | None = None
) -> Encoding:
    """Encoding from a given range by the spec's rules (minimum range, 0 exactly on the grid)."""
    lo_arr, hi_arr = np.atleast_1d(np.asarray(lo, np.float64)), np.atleast_1d(np.asarray(hi, np.float64))
    if lo_arr.shape != hi_arr.shape:
        raise EncodingError(f"{lo_arr.size} minimums but {hi_arr.size} maximums")
    if not (np.isfinite(lo_arr).all() and np.isfinite(hi_arr).all()):
        raise EncodingError("min and max must be finite")
    if (lo_arr > hi_arr).any():
        raise EncodingError(f"min {lo_arr.tolist()} is greater than max {hi_arr.tolist()}")
    bitwidth = check_bitwidth(bitwidth)
    grid = _symmetric_grid if symmetric else _tf_grid
    with np.errstate(over="ignore", invalid="ignore"):  # an overflowing range is rejected by Encoding
        scale, offset = grid(lo_arr, hi_arr, bitwidth)
    return Encoding(bitwidth, tuple(scale), tuple(offset), symmetric, axis)


def compute(
    source: Source,
    bitwidth: int,
    mode: Mode = "tf",
    *,
    symmetric: bool | None = None,
    axis: int | None = None,
    role: Role | None = None,
    percentile: float = 99.99,
    bins: int = DEFAULT_BINS,
) -> Encoding:
    """Encoding for raw values or collected statistics.

    Modes: ``tf`` true min/max; ``symmetric`` (= tf with ``symmetric=True``); ``enhanced`` histogram
    search that may clip long tails; ``adjusted`` 8-bit weights, grid expanded rather than shifted;
    ``percentile`` clips to the ``percentile``/``100 - percentile`` quantiles. ``symmetric`` defaults
    to False per tensor; per-channel (``axis`` or a per-channel ``MinMaxObserver``) is always symmetric
    with offset -2^(bw-1), as the spec requires. ``role`` adds the role's bitwidth check.
    """
    bitwidth = validate_bitwidth(bitwidth, role) if role is not None else check_bitwidth(bitwidth)
    if mode not in get_args(Mode):
        raise EncodingError(f"unknown quantization mode {mode!r} (expected one of {', '.join(get_args(Mode))})")
    if mode == "symmetric":
        if symmetric is False:
            raise EncodingError("mode 'symmetric' contradicts symmetric=False")
        mode, symmetric = "tf", True
    stats = _stats(source, axis)
    if stats.axis is not None:
        if symmetric is False:
            raise EncodingError("per-channel encodings must be symmetric (offset -2^(bw-1)) per the QNN spec")
        symmetric = True
    symmetric = bool(symmetric)

    if mode == "enhanced":
        histograms = stats.histograms
        if histograms is None:
            if stats.rows is None:
                raise EncodingError("enhanced mode needs a histogram or raw values, not only min/max")
            histograms = tuple(Histogram.from_values(row, bins) for row in stats.rows)
        grids = [_enhanced_grid(h, bitwidth, symmetric) for h in histograms]
        scales, offsets = zip(*grids, strict=True)
        return Encoding(bitwidth, scales, offsets, symmetric, stats.axis)

    lo, hi = stats.lo, stats.hi
    if mode == "adjusted":
        if bitwidth != 8 or symmetric:
            raise EncodingError("adjusted mode is defined for 8-bit asymmetric per-tensor weights only")
        scale, offset = _adjusted_grid(lo, hi, bitwidth)
        return Encoding(bitwidth, tuple(scale), tuple(offset), False, stats.axis)
    if mode == "percentile":
        if not 50.0 < percentile <= 100.0:
            raise EncodingError(f"percentile must be in (50, 100], got {percentile}")
        lo, hi = _percentile_range(stats, percentile)
    return from_min_max(lo, hi, bitwidth, symmetric=symmetric, axis=stats.axis)


def _percentile_range(stats: _Stats, percentile: float) -> tuple[np.ndarray, np.ndarray]:
    if stats.rows is not None:
        lo, hi = np.percentile(stats.rows, [100.0 - percentile, percentile], axis=1)
        return lo, hi
    if stats.histograms is not None:
        lo = np.array([h.quantile(1.0 - percentile / 100.0) for h in stats.histograms])
        hi = np.array([h.quantile(percentile / 100.0) for h in stats.histograms])
        return lo, hi
    raise EncodingError("percentile mode needs a histogram or raw values, not only min/max")


# --- bias -----------------------------------------------------------------------------------------


def bias_encoding(
    bias: ArrayLike, input_scale: float, weight: Encoding, bitwidth: int = 32, *, headroom: float = 2.0
) -> tuple[Encoding, Encoding]:
    """Derived bias encoding ``scale = s_in * s_w`` (per channel if the weight is), zero point 0.

    If ``|b| / (s_in * s_w)`` would not fit in ``(2^(bw-1) - 1) / headroom`` the weight scale of that
    channel is raised (never lowered) until it does: clipping the bias instead would silently change
    the layer. Returns ``(bias encoding, weight encoding)``; the latter is ``weight`` itself when
    nothing had to change, otherwise the weights must be re-quantized with it.
    """
    bitwidth = validate_bitwidth(bitwidth, "bias")
    if not (math.isfinite(input_scale) and input_scale > 0):
        raise EncodingError(f"input scale must be finite and positive, got {input_scale}")
    if headroom < 1.0:
        raise EncodingError(f"headroom must be at least 1, got {headroom}")
    b = np.asarray(bias, dtype=np.float64)
    if not np.isfinite(b).all():
        raise EncodingError("bias contains NaN or infinite values")
    weight_scale = np.asarray(weight.scale)
    if weight.axis is None:
        magnitude = np.array([np.abs(b).max(initial=0.0)])
    else:
        if b.shape != (weight.num_channels,):
            raise EncodingError(f"bias of shape {b.shape} does not match {weight.num_channels} weight channels")
        magnitude = np.abs(b)
    limit = (2 ** (bitwidth - 1) - 1) / headroom
    new_weight_scale = np.maximum(weight_scale, magnitude / (input_scale * limit))
    half = 2 ** (bitwidth - 1)
    bias_axis = None if weight.axis is None else 0
    bias_scale = tuple(input_scale * new_weight_scale)
    bias_enc = Encoding(bitwidth, bias_scale, (-half,) * weight.num_channels, True, bias_axis)
    if np.array_equal(new_weight_scale, weight_scale):
        return bias_enc, weight
    return bias_enc, replace(weight, scale=tuple(new_weight_scale))
