"""Packed 4-bit storage: two values per byte (ONNX INT4/UINT4 layout, QNN per-channel layout)."""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import ArrayLike

from qpasses.core.errors import EncodingError

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
