"""How an encoding's integers are stored in the QDQ model: as the encoding says, or portable uint8.

The grid (scale, offset) never changes, only the ONNX element type of the stored integers and
the zero point: a signed symmetric int8 grid becomes uint8 with zero point 128. onnxruntime picks
its fused integer kernel by those types, and its x86 u8s8/s8s8 kernels (without VNNI) add pairs of
products in int16 with saturation; u8u8 kernels widen first and cannot saturate.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx

from qpasses.quant.encodings import Encoding, QParams, quantize


def uint8_storage(target: Any) -> bool:
    """Portable uint8 storage for the target (no target: onnxruntime on an unknown CPU, so yes)."""
    return target is None or bool(getattr(target, "uint8_storage", False))


def storage_signed(enc: Encoding, portable: bool) -> bool | None:
    """``signed`` argument for ``qparams``/``quantize``: None keeps the encoding's own choice."""
    return False if portable and enc.bitwidth == 8 else None


def stored_qparams(enc: Encoding, portable: bool) -> QParams:
    return enc.qparams(storage_signed(enc, portable))


def stored_integers(values: np.ndarray, enc: Encoding, portable: bool) -> np.ndarray:
    return quantize(values, enc, signed=storage_signed(enc, portable))


def integer_tensor_proto(name: str, q: np.ndarray, elem_type: int) -> onnx.TensorProto:
    """An initializer holding quantized integers; 4-bit types are written through make_tensor (numpy has none)."""
    if elem_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4):
        return onnx.helper.make_tensor(name, elem_type, q.shape, q.astype(np.int32).reshape(-1).tolist())
    return onnx.numpy_helper.from_array(q, name)
