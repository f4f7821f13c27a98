"""One entry of an encodings file, in either layout, parsed and validated against its tensor.

``parse_legacy`` reads a 0.6.1 entry (a list of per-channel dicts with min/max), ``parse_v1`` a
1.0.0 entry (one named dict with scale/offset lists). Each returns an ``Encoding`` (a range) or a
``PrecisionOverride`` (a bitwidth/dtype without one) and raises ``EncodingError`` for anything it
would otherwise have to guess about; ``encodings_io`` adds the file, section and tensor to the message.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from qpasses.core.errors import EncodingError
from qpasses.quant.encodings import ALLOWED_BITWIDTHS, FLOAT32_MAX, MIN_RANGE, Encoding, Role, validate_bitwidth
from qpasses.quant.encodings_file import Entry, PrecisionOverride, TensorSpec
from qpasses.quant.precision_type import FLOAT_BITWIDTHS
from qpasses.quant.range_search import from_min_max
from qpasses.quant.strict_json import duplicates

# The scale a file states is kept when it equals the one recomputed from min/max to this relative
# tolerance: (max - min) / (2^bw - 1) differs from the written scale in the last bit for ~4% of
# encodings, and keeping the written one makes export -> import exact.
_SCALE_RTOL = 1e-9
# The keys each layout defines for one encoding. Anything else is an error rather than ignored: a
# 1.0.0 entry's min/max (or a 0.6.1 entry's bw/name) silently dropped turns a range into a bare
# bitwidth override, and the tensor is recalibrated while the report says the override applied.
_LEGACY_KEYS = frozenset({"bitwidth", "dtype", "is_symmetric", "max", "min", "offset", "scale"})
_V1_KEYS = frozenset(
    {
        "name",
        "enc_type",
        "dtype",
        "bw",
        "is_sym",
        "scale",
        "offset",
        "block_size",
        "compressed_bw",
        "per_block_int_scale",
    }
)


def _shown(value: object, limit: int = 40) -> str:
    """``repr`` cut to ``limit`` characters: a JSON number can have thousands of digits."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**limit:
        return f"an integer of {len(str(abs(value)))} digits"
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}..."


def _int(value: object, key: str) -> int:
    """An integral JSON number in int64 range; the exact range is the caller's rule (bitwidth set, offset grid)."""
    if isinstance(value, float) and value.is_integer():  # inf/nan are not integers
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool):
        raise EncodingError(f"'{key}' must be an integer, got {_shown(value)}")
    if not -(2**63) <= value < 2**63:  # no bitwidth or offset comes near; keeps numpy and messages sane
        raise EncodingError(f"'{key}' {_shown(value)} is out of range")
    return value


def _number(value: object, key: str) -> float:
    if isinstance(value, int) and not isinstance(value, bool):
        try:
            return float(value)  # a JSON integer may be beyond float range
        except OverflowError:
            raise EncodingError(f"'{key}' must be a finite number, got {_shown(value)}") from None
    if not isinstance(value, float) or not math.isfinite(value):
        raise EncodingError(f"'{key}' must be a finite number, got {_shown(value)}")
    return value


def _float32_number(value: object, key: str) -> float:
    """A finite number a float32 tensor can hold (encoding ranges describe float32 values)."""
    number = _number(value, key)
    if abs(number) > FLOAT32_MAX:
        raise EncodingError(f"'{key}' {number!r} is outside the float32 range (+-{FLOAT32_MAX:.4g})")
    return number


def _check_float32_grid(enc: Encoding) -> Encoding:
    """The grid's ends must be float32 values too, or dequantized extremes become inf."""
    for i, (lo, hi) in enumerate(zip(enc.min, enc.max, strict=True)):
        if max(abs(lo), abs(hi)) > FLOAT32_MAX:
            where = f" (channel {i})" if enc.num_channels > 1 else ""
            raise EncodingError(
                f"the grid [{lo:.4g}, {hi:.4g}] of scale {enc.scale[i]!r} and offset {enc.offset[i]} "
                f"overflows float32 (+-{FLOAT32_MAX:.4g}){where}"
            )
    return enc


def _check_keys(
    entry: Mapping[str, Any], allowed: frozenset[str], other: frozenset[str], layout: str, hint: str
) -> None:
    for key in duplicates(entry):
        raise EncodingError(f"key '{key}' is given more than once in one encoding (JSON keeps only the last)")
    unknown = sorted(set(entry) - allowed)
    if not unknown:
        return
    foreign = [k for k in unknown if k in other]
    shown = ", ".join(f"'{k}'" for k in unknown)
    if foreign:
        other_layout = "1.0.0" if layout == "0.6.1" else "0.6.1"
        raise EncodingError(f"{other_layout}-layout key(s) {shown} in a {layout} entry ({hint})")
    raise EncodingError(f"unknown key(s) {shown} ({hint})")


def _flag(value: object, key: str) -> bool:
    if isinstance(value, bool):
        return value
    if value in ("True", "False", "true", "false"):
        return value in ("True", "true")
    raise EncodingError(f'\'{key}\' must be true/false or "True"/"False", got {value!r}')


def _required(entry: Mapping[str, Any], key: str) -> Any:
    if key not in entry:
        raise EncodingError(f"missing required key '{key}'")
    return entry[key]


def _int32_override(bitwidth: int, section: str, spec: TensorSpec | None) -> bool:
    """The spec's INT32 override: an activation (op input/output) at 32 bits, without a range."""
    return bitwidth == 32 and section == "activation_encodings" and (spec is None or spec.role == "activation")


def _int_bitwidth(bitwidth: int, role: Role | None, section: str) -> None:
    """Role's bitwidth rule; a parameter of unknown role may be a weight (4-16) or a bias (8/32)."""
    if role is not None:
        validate_bitwidth(bitwidth, role)
    elif section == "activation_encodings":
        validate_bitwidth(bitwidth, "activation")
    elif bitwidth not in ALLOWED_BITWIDTHS["weight"] + ALLOWED_BITWIDTHS["bias"]:
        raise EncodingError(f"parameter bitwidth {bitwidth} is not supported (weights 4-16, bias 8 or 32)")


def _float_override(bitwidth: int) -> PrecisionOverride:
    if bitwidth not in FLOAT_BITWIDTHS:
        raise EncodingError(f"float bitwidth {bitwidth} is not supported (allowed: 16, 32)")
    return PrecisionOverride(bitwidth, "float")


def _channel_axis(per_channel: bool, count: int, section: str, spec: TensorSpec | None) -> int | None:
    """Axis of a per-channel entry: files carry none, so it comes from the model (default 0)."""
    if not per_channel:
        return None
    if section == "activation_encodings":
        raise EncodingError(f"activations are quantized per tensor, got {count} per-channel encodings")
    if spec is not None and not spec.per_channel:
        raise EncodingError(
            f"{count} per-channel encodings given, but the layers reading this weight have their "
            "output channels on different axes: it is quantized per tensor"
        )
    if spec is not None and spec.channels is not None and count != spec.channels:
        raise EncodingError(f"{count} per-channel encodings given but the tensor has {spec.channels} channels")
    return spec.axis if spec is not None else 0


def _checked_symmetry(enc: Encoding, stated: bool) -> Encoding:
    """Per-channel must be symmetric (spec); per tensor the stated flag holds only if the grid agrees."""
    on_symmetric_grid = all(o == -enc.half for o in enc.offset)
    if enc.axis is not None and not on_symmetric_grid:
        raise EncodingError(f"per-channel encodings must be symmetric with offset {-enc.half}, got {list(enc.offset)}")
    symmetric = on_symmetric_grid and (stated or enc.axis is not None)
    return enc if symmetric == enc.symmetric else Encoding(enc.bitwidth, enc.scale, enc.offset, symmetric, enc.axis)


def _same_scale(stated: object, recomputed: float) -> bool:
    return isinstance(stated, float) and math.isclose(stated, recomputed, rel_tol=_SCALE_RTOL)


def parse_legacy(entries: Any, section: str, spec: TensorSpec | None) -> Entry:
    if not isinstance(entries, list) or not entries or not all(isinstance(e, dict) for e in entries):
        raise EncodingError("expected a non-empty list of encoding objects")
    for e in entries:
        _check_keys(
            e,
            _LEGACY_KEYS,
            _V1_KEYS,
            "0.6.1",
            "0.6.1 entries have 'bitwidth', 'dtype', 'min', 'max' and optionally 'scale', 'offset', 'is_symmetric'",
        )
    bitwidths = {_int(_required(e, "bitwidth"), "bitwidth") for e in entries}
    dtypes = {str(e.get("dtype", "int")) for e in entries}
    if len(bitwidths) != 1 or len(dtypes) != 1:
        raise EncodingError("all encodings of one tensor must share bitwidth and dtype")
    bitwidth, dtype = bitwidths.pop(), dtypes.pop()
    if dtype not in ("int", "float"):
        raise EncodingError(f'\'dtype\' must be "int" or "float", got {dtype!r}')
    if dtype == "float":
        if any(k in e for e in entries for k in ("min", "max", "scale", "offset")):
            raise EncodingError("a float entry keeps the tensor float: it takes no 'min'/'max'/'scale'/'offset'")
        return _float_override(bitwidth)
    ranged = len(entries) > 1 or any(k in entries[0] for k in ("min", "max", "scale", "offset"))
    if not ranged and _int32_override(bitwidth, section, spec):
        return PrecisionOverride(32, "int")
    _int_bitwidth(bitwidth, spec.role if spec else None, section)
    if not ranged:
        return PrecisionOverride(bitwidth, "int")

    if not all("min" in e or "max" in e for e in entries):
        raise EncodingError(
            "0.6.1 entries need 'min' and 'max' ('scale'/'offset' alone are not read: the spec recomputes them from "
            "bitwidth, min and max); give min/max, or write a 1.0.0 file with 'scale'/'offset' lists"
        )
    lo = [_float32_number(_required(e, "min"), "min") for e in entries]
    hi = [_float32_number(_required(e, "max"), "max") for e in entries]
    for i, (a, b) in enumerate(zip(lo, hi, strict=True)):
        if a > b:
            where = f" (channel {i})" if len(entries) > 1 else ""
            raise EncodingError(f"min {a} is greater than max {b}{where}")
    axis = _channel_axis(len(entries) > 1, len(entries), section, spec)
    stated = [e.get("scale") for e in entries]
    symmetric = _flag(entries[0].get("is_symmetric", False), "is_symmetric")
    is_bias = spec.role == "bias" if spec is not None else section == "param_encodings" and bitwidth == 32
    if is_bias and symmetric and (grid := _tiny_bias_grid(lo, hi, stated, bitwidth, axis)) is not None:
        return _check_float32_grid(grid)
    # The spec recomputes scale and offset from bitwidth, min and max whatever the file says.
    enc = from_min_max(lo, hi, bitwidth, axis=axis)
    if all(_same_scale(s, r) for s, r in zip(stated, enc.scale, strict=True)):
        enc = Encoding(bitwidth, tuple(stated), enc.offset, False, axis)
    return _check_float32_grid(_checked_symmetry(enc, symmetric))


def _tiny_bias_grid(
    lo: list[float], hi: list[float], stated: list[object], bitwidth: int, axis: int | None
) -> Encoding | None:
    """A symmetric bias grid spanning less than the spec's minimum range, taken as the file states it.

    A derived bias grid is ``s_in * s_w`` (what the integer kernel accumulates in), which can span far
    less than 1e-4 (16-bit activations, a near-zero weight channel). Re-deriving it from min/max with
    the minimum-range rule would give another grid, so an exported file would not load back as the
    same model. Taken only when every entry's min, max and scale are that one symmetric grid
    (``min = -2^(bw-1) * scale``, ``max = (2^(bw-1) - 1) * scale``) and some entry spans < 1e-4;
    anything else follows the spec's rule.
    """
    half = 2 ** (bitwidth - 1)
    if not all(isinstance(s, float) and s > 0 for s in stated):
        return None
    scales = [s for s in stated if isinstance(s, float)]  # all of them (checked above)
    exact = all(
        math.isclose(a, -half * s, rel_tol=_SCALE_RTOL) and math.isclose(b, (half - 1) * s, rel_tol=_SCALE_RTOL)
        for a, b, s in zip(lo, hi, scales, strict=True)
    )
    if not exact or all(b - a >= MIN_RANGE for a, b in zip(lo, hi, strict=True)):
        return None
    return Encoding(bitwidth, tuple(scales), (-half,) * len(scales), True, axis)


def parse_v1(entry: Any, section: str, spec: TensorSpec | None) -> Entry:
    _check_keys(
        entry,
        _V1_KEYS,
        _LEGACY_KEYS,
        "1.0.0",
        "1.0.0 entries have 'name', 'dtype', 'bw', 'enc_type', 'is_sym' and 'scale'/'offset' lists; "
        "min/max are not read",
    )
    bitwidth = _int(_required(entry, "bw"), "bw")
    dtype = str(_required(entry, "dtype")).upper()
    if dtype not in ("INT", "FLOAT"):
        raise EncodingError(f'\'dtype\' must be "INT" or "FLOAT", got {entry["dtype"]!r}')
    if dtype == "FLOAT":
        return _float_override(bitwidth)
    ranged = "scale" in entry or "offset" in entry
    if not ranged and _int32_override(bitwidth, section, spec):
        return PrecisionOverride(32, "int")
    _int_bitwidth(bitwidth, spec.role if spec else None, section)
    if not ranged:
        return PrecisionOverride(bitwidth, "int")
    enc_type = entry.get("enc_type", "PER_TENSOR")
    if enc_type not in ("PER_TENSOR", "PER_CHANNEL"):
        raise EncodingError(f"'enc_type' {enc_type!r} is not supported (PER_TENSOR or PER_CHANNEL)")
    scale, offset = _required(entry, "scale"), _required(entry, "offset")
    if not isinstance(scale, list) or not isinstance(offset, list) or not scale or len(scale) != len(offset):
        raise EncodingError("'scale' and 'offset' must be non-empty lists of the same length")
    if enc_type == "PER_TENSOR" and len(scale) != 1:
        raise EncodingError(f"PER_TENSOR encoding has {len(scale)} scales")
    axis = _channel_axis(enc_type == "PER_CHANNEL", len(scale), section, spec)
    enc = Encoding(
        bitwidth,
        tuple(_number(s, "scale") for s in scale),
        tuple(_int(o, "offset") for o in offset),
        False,
        axis,
    )
    return _check_float32_grid(_checked_symmetry(enc, _flag(entry.get("is_sym", False), "is_sym")))
