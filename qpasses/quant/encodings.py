"""Quantization encodings: how a float range maps onto an integer grid.

Every pass that touches quantization (calibration, overrides, bias derivation, Q/DQ insertion,
simulation) must agree bit for bit on scale, offset and rounding, so the arithmetic lives here.
Conventions follow the QNN quantization spec and AIMET: ``x ~= scale * (q + offset)`` with ``q`` in
``[0, 2^bw - 1]`` and ``offset = round(min / scale) <= 0`` so that float 0.0 is exactly level
``-offset``. ONNX wants ``q_onnx = round(x / scale) + zero_point``; ``Encoding.qparams`` converts.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import Final, Literal, get_args

import numpy as np
from numpy.typing import ArrayLike
from onnx import TensorProto

from qpasses.core.errors import EncodingError
from qpasses.quant.range_statistics import DEFAULT_BINS, Histogram, HistogramObserver, MinMaxObserver

Mode = Literal["tf", "symmetric", "enhanced", "adjusted", "percentile"]
Role = Literal["weight", "activation", "bias"]
Source = ArrayLike | MinMaxObserver | HistogramObserver | Histogram

MIN_RANGE: Final = 1e-4
"""The spec's minimum encoding range (max - min)."""

FLOAT32_MAX: Final = float(np.finfo(np.float32).max)
FLOAT32_TINY: Final = float(np.finfo(np.float32).tiny)
"""Q/DQ scales are float32: a scale outside [FLOAT32_TINY, FLOAT32_MAX] becomes inf, 0 or a denormal there."""

ALLOWED_BITWIDTHS: Final[Mapping[str, tuple[int, ...]]] = MappingProxyType(
    {"weight": tuple(range(4, 17)), "activation": (8, 16), "bias": (8, 32)}
)

# tf_enhanced search (AIMET's candidate grid, plus a refinement round and a few finer steps for
# tails beyond 16x): saturation error is weighted 3x against rounding noise.
_ENHANCED_STEP_FRACTIONS: Final = np.concatenate([np.arange(1, 18) / 16, 2.0 ** -np.arange(5, 9)])
_ENHANCED_OFFSETS: Final = 21
_ENHANCED_SYMMETRIC_STEPS: Final = np.arange(1, 102) / 100
_SATURATION_WEIGHT: Final = 3.0


def _is_int(value: object) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def validate_bitwidth(bitwidth: int, role: Role) -> int:
    """Check ``bitwidth`` is supported for a tensor role: weights 4-16, activations 8/16, bias 8/32."""
    allowed = ALLOWED_BITWIDTHS.get(role)
    if allowed is None:
        raise EncodingError(f"unknown tensor role {role!r} (expected one of {', '.join(ALLOWED_BITWIDTHS)})")
    if not _is_int(bitwidth) or int(bitwidth) not in allowed:
        shown = "4-16" if role == "weight" else ", ".join(map(str, allowed))
        raise EncodingError(f"{role} bitwidth {bitwidth!r} is not supported (allowed: {shown})")
    return int(bitwidth)


def _integers(values: ArrayLike) -> tuple[int, ...]:
    """Offsets as Python ints, element by element: ``np.asarray`` of an int beyond int64 is an object
    array that numpy's rounding cannot handle, and the grid check should be the one to reject it."""
    out = []
    for value in np.atleast_1d(np.asarray(values, dtype=object)).ravel():
        if isinstance(value, float | np.floating) and math.isfinite(value) and float(value).is_integer():
            value = int(value)
        if not _is_int(value):
            shown = repr(value) if len(repr(value)) <= 40 else f"{repr(value)[:40]}..."
            raise EncodingError(f"offsets must be integers, got {shown}")
        out.append(int(value))
    return tuple(out)


def _check_bitwidth(bitwidth: int) -> int:
    if not _is_int(bitwidth) or not 2 <= int(bitwidth) <= 32:
        raise EncodingError(f"bitwidth {bitwidth!r} is not supported (allowed: 2-32)")
    return int(bitwidth)


@dataclass(frozen=True, eq=False)
class QParams:
    """What an ONNX QuantizeLinear/DequantizeLinear pair needs.

    ``zero_point`` uses the numpy container of ``elem_type`` (int8/uint8 for INT4/UINT4).
    ``scale``/``zero_point`` are 0-d per tensor and 1-d along ``axis`` per channel.
    """

    elem_type: int
    scale: np.ndarray
    zero_point: np.ndarray
    axis: int | None


def _storage(bitwidth: int, signed: bool) -> tuple[int, type[np.integer]]:
    """ONNX element type and numpy container for a bitwidth (4-bit gets the packed INT4 types)."""
    if bitwidth == 4:
        return (TensorProto.INT4, np.int8) if signed else (TensorProto.UINT4, np.uint8)
    if bitwidth <= 8:
        return (TensorProto.INT8, np.int8) if signed else (TensorProto.UINT8, np.uint8)
    if bitwidth <= 16:
        return (TensorProto.INT16, np.int16) if signed else (TensorProto.UINT16, np.uint16)
    return (TensorProto.INT32, np.int32) if signed else (TensorProto.UINT32, np.uint32)


@dataclass(frozen=True)
class Encoding:
    """An integer grid ``x ~= scale * (q + offset)``, ``q`` in ``[0, 2^bitwidth - 1]``.

    One (scale, offset) per channel along ``axis``, or a single one when ``axis`` is None. Tuples
    rather than arrays keep the value immutable, hashable and comparable with ``==``.
    ``symmetric`` means offset ``-2^(bw-1)`` and a signed representation (zero point 0 in ONNX).
    """

    bitwidth: int
    scale: tuple[float, ...]
    offset: tuple[int, ...]
    symmetric: bool = False
    axis: int | None = None

    def __post_init__(self) -> None:
        bitwidth = _check_bitwidth(self.bitwidth)
        try:
            scale = tuple(float(s) for s in np.atleast_1d(np.asarray(self.scale, dtype=np.float64)))
        except OverflowError:  # a Python int beyond float range
            raise EncodingError("scales must be finite and positive, got an integer beyond float range") from None
        offset = _integers(self.offset)
        object.__setattr__(self, "bitwidth", bitwidth)
        object.__setattr__(self, "scale", scale)
        object.__setattr__(self, "offset", offset)
        if not scale or len(scale) != len(offset):
            raise EncodingError(f"need one offset per scale, got {len(scale)} scales and {len(offset)} offsets")
        if self.axis is None and len(scale) != 1:
            raise EncodingError(f"{len(scale)} scales given for a per-tensor encoding (axis is None)")
        if self.axis is not None and (not _is_int(self.axis) or self.axis < 0):
            raise EncodingError(f"channel axis must be a non-negative integer, got {self.axis!r}")
        if not all(math.isfinite(s) and s > 0 for s in scale):
            raise EncodingError(f"scales must be finite and positive, got {list(scale)}")
        if not all(FLOAT32_TINY <= s <= FLOAT32_MAX for s in scale):
            raise EncodingError(
                f"scales must be finite and positive in float32 (the type of Q/DQ scales: "
                f"{FLOAT32_TINY:.3g} to {FLOAT32_MAX:.3g}), got {list(scale)}"
            )
        if not all(-self.levels <= o <= 0 for o in offset):
            raise EncodingError(
                f"offsets must lie in [-{self.levels}, 0] for {bitwidth} bits (zero on the grid), got {list(offset)}"
            )
        if self.symmetric and any(o != -self.half for o in offset):
            raise EncodingError(f"symmetric {bitwidth}-bit encodings have offset {-self.half}, got {list(offset)}")

    @property
    def levels(self) -> int:
        """Largest unsigned level, ``2^bw - 1``."""
        return 2**self.bitwidth - 1

    @property
    def half(self) -> int:
        return 2 ** (self.bitwidth - 1)

    @property
    def num_channels(self) -> int:
        return len(self.scale)

    @property
    def min(self) -> tuple[float, ...]:
        return tuple(o * s for s, o in zip(self.scale, self.offset, strict=True))

    @property
    def max(self) -> tuple[float, ...]:
        return tuple((o + self.levels) * s for s, o in zip(self.scale, self.offset, strict=True))

    def qparams(self, signed: bool | None = None) -> QParams:
        """ONNX element type, float32 scale and zero point; signed defaults to ``symmetric``.

        Unsigned: ``zp = -offset`` (uint8 asymmetric). Signed: ``zp = -offset - 2^(bw-1)``, which is 0
        for symmetric encodings (int8 symmetric).
        """
        signed = self.symmetric if signed is None else signed
        elem_type, container = _storage(self.bitwidth, signed)
        zero_point, _, _ = _zero_point(self, signed)
        shape = () if self.axis is None else (self.num_channels,)
        return QParams(
            elem_type,
            np.asarray(self.scale, dtype=np.float32).reshape(shape),
            zero_point.astype(container).reshape(shape),
            self.axis,
        )


def _zero_point(enc: Encoding, signed: bool) -> tuple[np.ndarray, int, int]:
    """Zero point per channel and the clamp bounds of the stored integers."""
    shift = enc.half if signed else 0
    return -np.asarray(enc.offset, dtype=np.int64) - shift, -shift, enc.levels - shift


def _along_axis(values: np.ndarray, enc: Encoding, ndim: int) -> np.ndarray:
    """Per-channel ``values`` reshaped to broadcast along the encoding's axis of an ``ndim`` tensor."""
    if enc.axis is None:
        return values[0]
    if enc.axis >= ndim:
        raise EncodingError(f"channel axis {enc.axis} is out of range for a {ndim}-d tensor")
    shape = [1] * ndim
    shape[enc.axis] = enc.num_channels
    return values.reshape(shape)


def _check_channels(x: np.ndarray, enc: Encoding) -> None:
    if enc.axis is not None and (enc.axis >= x.ndim or x.shape[enc.axis] != enc.num_channels):
        raise EncodingError(
            f"tensor of shape {x.shape} does not have {enc.num_channels} channels along axis {enc.axis}"
        )


def quantize(values: ArrayLike, enc: Encoding, *, signed: bool | None = None) -> np.ndarray:
    """Integers ``clamp(round(x / scale) + zp)`` exactly as ONNX QuantizeLinear computes them.

    Rounding is half-to-even like ONNX, so simulation matches the deployed model. Unsigned values
    are in ``[0, 2^bw - 1]``; signed (the default for symmetric encodings) in ``[-2^(bw-1), 2^(bw-1) - 1]``.
    """
    signed = enc.symmetric if signed is None else signed
    x = np.asarray(values, dtype=np.float64)
    _check_channels(x, enc)
    zero_point, qmin, qmax = _zero_point(enc, signed)
    scale = _along_axis(np.asarray(enc.scale), enc, x.ndim)
    q = np.clip(np.rint(x / scale) + _along_axis(zero_point, enc, x.ndim), qmin, qmax)
    return q.astype(_storage(enc.bitwidth, signed)[1])


def dequantize(q: ArrayLike, enc: Encoding, *, signed: bool | None = None) -> np.ndarray:
    """Floats ``scale * (q - zp)``; ``signed`` must match how ``q`` was quantized."""
    signed = enc.symmetric if signed is None else signed
    qi = np.asarray(q, dtype=np.int64)
    _check_channels(qi, enc)
    zero_point, _, _ = _zero_point(enc, signed)
    scale = _along_axis(np.asarray(enc.scale), enc, qi.ndim)
    return (qi - _along_axis(zero_point, enc, qi.ndim)) * scale


def fake_quantize(values: ArrayLike, enc: Encoding) -> np.ndarray:
    """Quantize then dequantize: the float values the quantized model will actually see."""
    x = np.asarray(values)
    out = dequantize(quantize(x, enc), enc)
    return out.astype(x.dtype) if np.issubdtype(x.dtype, np.floating) else out


# --- grids: (lo, hi) per channel -> (scale, offset) per channel --------------------------------------


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


def _enhanced_cost(
    centers: np.ndarray, pdf: np.ndarray, steps: np.ndarray, offsets: np.ndarray, levels: int
) -> np.ndarray:
    """Expected error per candidate: saturation on bin midpoints (weighted) + uniform rounding noise step^2/12.

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
        cost = _enhanced_cost(centers, pdf, steps, np.full_like(steps, offset[0]), levels)
        return max(float(steps[np.argmin(cost)]), MIN_RANGE / levels), int(offset[0])

    def search(steps: np.ndarray, offsets: np.ndarray) -> tuple[float, float, float]:
        grid = np.broadcast_to(offsets, (len(steps), len(offsets)))
        cost = _enhanced_cost(centers, pdf, steps[:, None], grid, levels)
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
    bitwidth = _check_bitwidth(bitwidth)
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
    bitwidth = validate_bitwidth(bitwidth, role) if role is not None else _check_bitwidth(bitwidth)
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


# --- packed 4-bit -----------------------------------------------------------------------------------


def _rows(q: np.ndarray, axis: int | None) -> np.ndarray:
    if axis is None:
        return q.reshape(1, -1)
    return np.moveaxis(q, axis, 0).reshape(q.shape[axis], -1)


def pack_int4(q: ArrayLike, *, signed: bool, axis: int | None = None) -> np.ndarray:
    """Two 4-bit values per byte, the first in the low nibble (ONNX INT4/UINT4, QNN packed 4-bit).

    ``axis=None`` packs the flattened tensor (ONNX layout), giving ``ceil(n/2)`` bytes. With ``axis``
    each channel is packed on its own (QNN per-channel layout): shape ``(C, ceil(n_per_channel/2))``.
    An odd count leaves the last high nibble 0.
    """
    values = np.asarray(q)
    lo, hi = (-8, 7) if signed else (0, 15)
    if values.size and (values.min() < lo or values.max() > hi):
        kind = "signed" if signed else "unsigned"
        raise EncodingError(f"{kind} 4-bit values must lie in [{lo}, {hi}], got [{values.min()}, {values.max()}]")
    nibbles = (_rows(values, axis).astype(np.int16) & 0x0F).astype(np.uint8)
    if nibbles.shape[1] % 2:
        nibbles = np.pad(nibbles, ((0, 0), (0, 1)))
    packed = nibbles[:, 0::2] | (nibbles[:, 1::2] << 4)
    return packed.reshape(-1) if axis is None else packed


def unpack_int4(packed: ArrayLike, shape: tuple[int, ...], *, signed: bool, axis: int | None = None) -> np.ndarray:
    """Inverse of ``pack_int4``: the int8 (signed) or uint8 tensor of ``shape``."""
    count = math.prod(shape)
    channels = 1 if axis is None else shape[axis]
    per_row = count // channels if channels else 0
    data = np.asarray(packed, dtype=np.uint8).reshape(channels, -1)
    if data.shape[1] != (per_row + 1) // 2:
        raise EncodingError(f"{data.size} packed bytes do not hold a 4-bit tensor of shape {shape}")
    nibbles = np.stack([data & 0x0F, data >> 4], axis=-1).reshape(channels, -1)[:, :per_row]
    out = np.where(nibbles >= 8, nibbles.astype(np.int16) - 16, nibbles).astype(np.int8) if signed else nibbles
    if axis is None:
        return out.reshape(shape)
    moved = (shape[axis], *shape[:axis], *shape[axis + 1 :])
    return np.moveaxis(out.reshape(moved), 0, axis)
