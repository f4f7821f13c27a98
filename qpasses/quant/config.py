"""User-facing quantization settings, validated once so passes can trust them."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Literal

from qpasses.core.errors import EncodingError
from qpasses.quant.encodings import validate_bitwidth

ActMode = Literal["tf", "enhanced", "percentile", "symmetric"]
WeightMode = Literal["tf", "symmetric", "enhanced", "adjusted"]


@dataclass(frozen=True)
class QuantConfig:
    """Bitwidths and encoding modes (the ``qpasses quantize`` flags, as data).

    Per-tensor weights default to symmetric (signed int, zero point 0) as in AIMET/QNN;
    per-channel weights are always symmetric (offset -2^(bw-1)).
    """

    act_bw: int = 8
    weight_bw: int = 8
    bias_bw: int = 32
    per_channel: bool = False
    act_mode: ActMode = "tf"
    weight_mode: WeightMode = "symmetric"
    percentile: float = 99.99
    # Float precision of tensors left float (None: float32); without calibration data, 16 gives an FP16 model.
    float_bw: int | None = None
    # Float bias bitwidth when a Conv/Gemm/MatMul turns float by the spec's rule (None: the op's float bitwidth).
    float_bias_bw: int | None = None

    def __post_init__(self) -> None:
        validate_bitwidth(self.weight_bw, "weight")
        validate_bitwidth(self.bias_bw, "bias")
        if self.act_bw not in (8, 16):
            raise EncodingError(f"activation bitwidth {self.act_bw} is not supported (8 or 16)")
        validate_bitwidth(self.act_bw, "activation")
        for key in ("float_bw", "float_bias_bw"):
            if getattr(self, key) not in (None, 16, 32):
                raise EncodingError(f"{key} {getattr(self, key)!r} is not supported (16 or 32)")
        if self.act_mode not in ("tf", "enhanced", "percentile", "symmetric"):
            raise EncodingError(f"unknown activation mode {self.act_mode!r} (tf, enhanced, percentile, symmetric)")
        if self.weight_mode not in ("tf", "symmetric", "enhanced", "adjusted"):
            raise EncodingError(f"unknown weight mode {self.weight_mode!r} (tf, symmetric, enhanced, adjusted)")
        if self.weight_mode == "adjusted" and (self.weight_bw != 8 or self.per_channel):
            raise EncodingError("weight mode 'adjusted' is defined for 8-bit per-tensor weights only")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> QuantConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise EncodingError(f"unknown quantization option(s) {unknown} (known: {sorted(known)})")
        return cls(**values)
