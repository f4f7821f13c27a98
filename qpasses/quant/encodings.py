"""Quantization encodings: how a float range maps onto an integer grid.

Every pass that touches quantization (calibration, overrides, bias derivation, Q/DQ insertion,
simulation) must agree bit for bit on scale, offset and rounding, so the arithmetic lives here (the
value type, its checks and quantize/dequantize; choosing a range is ``range_search``, packing 4-bit
values ``int4_packing``).
Conventions follow the QNN quantization spec and AIMET: ``x ~= scale * (q + offset)`` with ``q`` in
``[0, 2^bw - 1]`` and ``offset = round(min / scale) <= 0`` so that float 0.0 is exactly level
``-offset``. ONNX wants ``q_onnx = round(x / scale) + zero_point``; ``Encoding.qparams`` converts.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Final, Literal

import numpy as np
from numpy.typing import ArrayLike
from onnx import TensorProto

from qpasses.core.errors import EncodingError

Mode = Literal["tf", "symmetric", "enhanced", "adjusted", "percentile"]
Role = Literal["weight", "activation", "bias"]

MIN_RANGE: Final = 1e-4
"""The spec's minimum encoding range (max - min)."""

FLOAT32_MAX: Final = float(np.finfo(np.float32).max)
FLOAT32_TINY: Final = float(np.finfo(np.float32).tiny)
"""Q/DQ scales are float32: a scale outside [FLOAT32_TINY, FLOAT32_MAX] becomes inf, 0 or a denormal there."""

ALLOWED_BITWIDTHS: Final[Mapping[str, tuple[int, ...]]] = MappingProxyType(
    {"weight": tuple(range(4, 17)), "activation": (8, 16), "bias": (8, 32)}
)


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


def check_bitwidth(bitwidth: int) -> int:
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
        bitwidth = check_bitwidth(self.bitwidth)
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
