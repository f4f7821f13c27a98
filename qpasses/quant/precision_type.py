"""A tensor's numeric type in the quantized model: integer with a bitwidth, or float 16/32.

Kept apart from the annotation (``qpasses.targets.precision``) so target descriptors, the quantization
plan and lowering can all read precisions without importing one another.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

from qpasses.core.errors import EncodingError
from qpasses.quant.encodings import Encoding
from qpasses.quant.range_search import from_min_max

DType = Literal["int", "float"]
INT_BITWIDTHS = (4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 32)
FLOAT_BITWIDTHS = (16, 32)
_TEXT = re.compile(r"^(int|float|fp)(\d+)$")


@dataclass(frozen=True)
class Precision:
    """``int8``, ``int16``, ``int32`` (INT32 override), ``float16``, ``float32``...

    Field names match ``encodings_io.PrecisionOverride`` so either can be read the same way.
    """

    dtype: DType
    bitwidth: int

    def __post_init__(self) -> None:
        allowed = INT_BITWIDTHS if self.dtype == "int" else FLOAT_BITWIDTHS if self.dtype == "float" else None
        if allowed is None:
            raise EncodingError(f"precision dtype must be 'int' or 'float', got {self.dtype!r}")
        if isinstance(self.bitwidth, bool) or not isinstance(self.bitwidth, int) or self.bitwidth not in allowed:
            raise EncodingError(
                f"{self.dtype} bitwidth {self.bitwidth!r} is not supported (allowed: {', '.join(map(str, allowed))})"
            )

    def __str__(self) -> str:
        return f"{self.dtype}{self.bitwidth}"

    @property
    def is_float(self) -> bool:
        return self.dtype == "float"

    @property
    def is_int32(self) -> bool:
        return self.dtype == "int" and self.bitwidth == 32

    @classmethod
    def parse(cls, text: str) -> Precision:
        """``"int8"``, ``"int16"``, ``"float16"`` (or ``"fp16"``)."""
        m = _TEXT.match(text.strip().lower()) if isinstance(text, str) else None
        if m is None:
            raise EncodingError(f"precision {text!r} is not of the form int<bits> or float<bits> (e.g. int8, float16)")
        return cls("int" if m.group(1) == "int" else "float", int(m.group(2)))

    @classmethod
    def of(cls, value: Any) -> Precision | None:
        """Normalize a ``Precision``/``PrecisionOverride``-like value (None stays None)."""
        if value is None or isinstance(value, Precision):
            return value
        return cls(value.dtype, int(value.bitwidth))


INT8, INT16, INT32 = Precision("int", 8), Precision("int", 16), Precision("int", 32)
FLOAT16, FLOAT32 = Precision("float", 16), Precision("float", 32)


def tensor_precision(tensor: Any) -> Precision | None:
    """The annotated precision of an IR tensor (None when not annotated)."""
    return Precision.of(getattr(tensor, "precision", None))


def is_float(tensor: Any) -> bool:
    """True when the tensor is annotated to stay float (no Q/DQ of its own)."""
    p = tensor_precision(tensor)
    return p is not None and p.is_float


def encoding_bitwidth(tensor: Any, default: int) -> int:
    """Bitwidth the tensor's activation encoding must have (calibration reads this).

    The annotation stores it in ``meta["encoding_bw"]``: the tensor's int bitwidth, the act
    bitwidth around an INT32 op, or, for a float tensor read by an int op, that reader's bitwidth.
    """
    bw = tensor.meta.get("encoding_bw")
    return default if bw is None else int(bw)


def needs_encoding(tensor: Any) -> bool:
    """Float-annotated tensors get an encoding only when an int op reads them (a convert)."""
    return not is_float(tensor) or tensor.meta.get("encoding_bw") is not None


def requantized(enc: Encoding, bitwidth: int) -> Encoding:
    """The same range on a grid of another bitwidth: the output encoding of an int8<->int16 convert."""
    if enc.bitwidth == bitwidth:
        return enc
    return from_min_max(enc.min, enc.max, bitwidth, symmetric=enc.symmetric, axis=enc.axis)
