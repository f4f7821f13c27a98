"""Read and write AIMET-style encodings files: the 0.6.1 dict layout and the 1.0.0 list layout.

A file read here is a set of quantization overrides (QNN ``--quantization_overrides``). Every
problem is an ``EncodingError`` naming the file, the section and the tensor, because these files
are hand-edited and a bare "bad bitwidth" is useless in a file with thousands of entries.

Nothing in a file is silently ignored: keys outside the entry's layout (a 1.0.0 entry's min/max,
a 0.6.1 entry's bw/name), 0.6.1 scale/offset without min/max (the spec recomputes them from
bitwidth, min and max, and its own examples disagree on the offset's sign, so min/max are
required), duplicate JSON keys, and a ``version`` that contradicts the layout are all errors.
"""

from __future__ import annotations

import json
import math
import os
import re
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from qpasses.core.errors import EncodingError
from qpasses.quant.encodings import ALLOWED_BITWIDTHS, FLOAT32_MAX, MIN_RANGE, Encoding, Role, validate_bitwidth
from qpasses.quant.range_search import from_min_max

Version = Literal["0.6.1", "1.0.0"]
SECTIONS = ("activation_encodings", "param_encodings")
FLOAT_BITWIDTHS = (16, 32)
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
_VERSION = re.compile(r"^(\d+)\.(\d+)\.(\d+)$")


@dataclass(frozen=True)
class PrecisionOverride:
    """A bitwidth/dtype choice without a range: the tensor stays float, or gets calibrated at this bitwidth."""

    bitwidth: int
    dtype: Literal["int", "float"] = "float"


Entry = Encoding | PrecisionOverride


@dataclass(frozen=True)
class TensorSpec:
    """What the model knows about a tensor, to validate an override against it.

    ``channels`` is the length of the per-channel ``axis`` (None: per-channel count not checked).
    ``per_channel`` False: a weight whose readers put their output channels on different axes, which
    is quantized per tensor (``quant_plan.weight_axes``).
    """

    role: Role
    channels: int | None = None
    axis: int = 0
    per_channel: bool = True


@dataclass
class EncodingsFile:
    """Encodings by tensor name, for activations (op outputs and graph inputs) and parameters."""

    activations: dict[str, Entry] = field(default_factory=dict)
    params: dict[str, Entry] = field(default_factory=dict)


# --- export -----------------------------------------------------------------------------------------


def _legacy_entry(entry: Entry) -> list[dict[str, Any]]:
    if isinstance(entry, PrecisionOverride):
        return [{"bitwidth": entry.bitwidth, "dtype": entry.dtype}]
    return [
        {
            "bitwidth": entry.bitwidth,
            "dtype": "int",
            "is_symmetric": str(entry.symmetric),
            "max": hi,
            "min": lo,
            "offset": offset,
            "scale": scale,
        }
        for lo, hi, offset, scale in zip(entry.min, entry.max, entry.offset, entry.scale, strict=True)
    ]


def _v1_entry(name: str, entry: Entry) -> dict[str, Any]:
    if isinstance(entry, PrecisionOverride):
        return {"name": name, "enc_type": "PER_TENSOR", "dtype": entry.dtype.upper(), "bw": entry.bitwidth}
    return {
        "name": name,
        "enc_type": "PER_TENSOR" if entry.axis is None else "PER_CHANNEL",
        "dtype": "INT",
        "bw": entry.bitwidth,
        "is_sym": entry.symmetric,
        "scale": list(entry.scale),
        "offset": list(entry.offset),
    }


def to_json(encodings: EncodingsFile, version: Version = "0.6.1") -> dict[str, Any]:
    """The JSON document for ``version`` (AIMET 0.6.1 dicts of lists, or 1.0.0 lists of named entries)."""
    sections = (encodings.activations, encodings.params)
    if version == "0.6.1":
        body: dict[str, Any] = {
            key: {name: _legacy_entry(entry) for name, entry in section.items()}
            for key, section in zip(SECTIONS, sections, strict=True)
        }
    elif version == "1.0.0":
        body = {
            key: [_v1_entry(name, entry) for name, entry in section.items()]
            for key, section in zip(SECTIONS, sections, strict=True)
        }
    else:
        raise EncodingError(f"unknown encodings file version {version!r} (expected '0.6.1' or '1.0.0')")
    return {"version": version, **body}


def save(path: str | os.PathLike[str], encodings: EncodingsFile, version: Version = "0.6.1") -> None:
    """Write atomically: a temporary file in the same directory, then ``os.replace``.

    A crash mid-write must never leave a truncated file where a previous good one was.
    """
    target = Path(path)
    text = json.dumps(to_json(encodings, version), indent=4) + "\n"
    tmp = target.with_name(f".{target.name}.{secrets.token_hex(4)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # umask applies, unlike mkstemp's 0600
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# --- import -----------------------------------------------------------------------------------------


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


def _duplicates(obj: object) -> tuple[str, ...]:
    """Keys a JSON object listed more than once (``load`` records them; the last value won)."""
    return getattr(obj, "duplicates", ())


def _check_keys(
    entry: Mapping[str, Any], allowed: frozenset[str], other: frozenset[str], layout: str, hint: str
) -> None:
    for key in _duplicates(entry):
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


def _parse_legacy(entries: Any, section: str, spec: TensorSpec | None) -> Entry:
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


def _parse_v1(entry: Any, section: str, spec: TensorSpec | None) -> Entry:
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


def _named_entries(raw: dict[str, Any] | list[Any], section: str, source: str) -> list[tuple[str, Any]]:
    """(name, raw entry) pairs of one section in either layout."""
    if isinstance(raw, dict):
        for duplicate in _duplicates(raw):
            raise EncodingError(f"{source}: {section} '{duplicate}': listed more than once (JSON keeps only the last)")
        return list(raw.items())
    pairs: list[tuple[str, Any]] = []
    for index, entry in enumerate(raw):
        name = entry.get("name") if isinstance(entry, dict) else None
        if not isinstance(name, str):
            raise EncodingError(f"{source}: {section}[{index}]: missing required key 'name' (or it is not a string)")
        if any(name == seen for seen, _ in pairs):
            raise EncodingError(f"{source}: {section} '{name}': listed more than once")
        pairs.append((name, entry))
    return pairs


def _check_version(version: object, lists: bool, empty: bool, source: str) -> None:
    """A stated version must be known and match the layout: 0.x has objects, 1.0.0 lists."""
    match = _VERSION.match(version) if isinstance(version, str) else None
    if match is None or (int(match.group(1)) >= 1 and version != "1.0.0"):
        raise EncodingError(
            f"{source}: unsupported encodings 'version' {version!r} (expected a string: "
            '"0.6.1" or another 0.x for the object layout, "1.0.0" for the list layout)'
        )
    v1 = version == "1.0.0"
    if v1 != lists and not empty:
        stated = "lists of named entries (1.0.0 layout)" if v1 else "objects keyed by tensor name (0.6.1 layout)"
        found = "lists (1.0.0 layout)" if lists else "objects (0.6.1 layout)"
        raise EncodingError(
            f"{source}: 'version' is {version!r}, whose sections are {stated}, but this file's sections are {found}"
        )


def from_json(
    data: object, *, source: str = "<encodings>", tensors: Mapping[str, TensorSpec] | None = None
) -> EncodingsFile:
    """Parse and validate an encodings document, detecting the layout from its sections.

    With ``tensors``, names must be known and bitwidths/channel counts must suit the tensor.
    """
    if not isinstance(data, dict):
        raise EncodingError(f"{source}: top level must be a JSON object")
    for key in _duplicates(data):
        raise EncodingError(f"{source}: top-level key '{key}' appears more than once (JSON keeps only the last)")
    for key in SECTIONS:
        if key not in data:
            raise EncodingError(f"{source}: missing required section '{key}'")
    raw_sections = [data[key] for key in SECTIONS]
    parse: Callable[[Any, str, TensorSpec | None], Entry]
    if all(isinstance(s, dict) for s in raw_sections):
        parse = _parse_legacy
    elif all(isinstance(s, list) for s in raw_sections):
        parse = _parse_v1
    else:
        raise EncodingError(f"{source}: sections must both be objects (0.6.1 layout) or both lists (1.0.0 layout)")
    if "version" in data:
        _check_version(data["version"], parse is _parse_v1, not any(raw_sections), source)

    result = EncodingsFile()
    for key, raw, target in zip(SECTIONS, raw_sections, (result.activations, result.params), strict=True):
        for name, entry in _named_entries(raw, key, source):
            where = f"{source}: {key} '{name}'"
            if tensors is not None and name not in tensors:
                raise EncodingError(f"{where}: unknown tensor (not in the model)")
            try:
                target[name] = parse(entry, key, tensors.get(name) if tensors is not None else None)
            except EncodingError as exc:
                raise EncodingError(f"{where}: {exc}") from None
    return result


class _JsonObject(dict[str, Any]):
    """A JSON object that remembers which keys it listed more than once."""

    duplicates: tuple[str, ...] = ()


def _json_object(pairs: list[tuple[str, Any]]) -> _JsonObject:
    obj = _JsonObject()
    repeated: dict[str, None] = {}
    for key, value in pairs:
        if key in obj:
            repeated[key] = None
        obj[key] = value
    if repeated:
        obj.duplicates = tuple(repeated)
    return obj


def load(path: str | os.PathLike[str], *, tensors: Mapping[str, TensorSpec] | None = None) -> EncodingsFile:
    """Read an encodings/overrides file (either layout); see ``from_json`` for validation."""
    source = Path(path)
    try:
        raw = source.read_bytes()
    except OSError as exc:
        raise EncodingError(f"{source}: cannot read encodings file: {exc.strerror or exc}") from None
    return from_json(_parse_json(raw, source), source=str(source), tensors=tensors)


def _parse_json(raw: bytes, source: Path) -> object:
    """The JSON value of a UTF-8 file (JSON's encoding, RFC 8259); every way it can fail is an EncodingError."""
    # JSON text never holds a raw NUL: one among the first bytes (or a UTF-16 byte order mark) means UTF-16/32.
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")) or b"\x00" in raw[:4]:
        raise EncodingError(
            f"{source}: the file is UTF-16 or UTF-32 text, but encodings files are UTF-8 JSON: save it as UTF-8"
        )
    try:
        text = raw.decode("utf-8-sig")  # a UTF-8 byte order mark (Windows editors) is harmless
    except UnicodeDecodeError as exc:
        raise EncodingError(
            f"{source}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start}): "
            "encodings files are UTF-8 JSON"
        ) from None
    try:
        return json.loads(text, object_pairs_hook=_json_object)
    except json.JSONDecodeError as exc:
        raise EncodingError(f"{source}: malformed JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from None
    except RecursionError:
        raise EncodingError(f"{source}: JSON nested too deeply to be an encodings file") from None
    except ValueError as exc:  # an integer of more digits than Python converts (sys.get_int_max_str_digits)
        raise EncodingError(f"{source}: unreadable JSON number: {str(exc).split(':')[0]}") from None
