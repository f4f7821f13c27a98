"""Target descriptors: what an accelerator can run, as immutable typed data.

Passes consult a descriptor instead of hard-coding a backend: the annotation picks default
precisions from it, ``check`` lists what it cannot run, AMP filters candidates by its kernels.
A descriptor can be written in Python, loaded from a JSON/YAML file with the same field names,
or registered through the ``qpasses.targets`` entry point. Every problem is a ``TargetError``
naming the field, because these files are hand-written.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import yaml

from qpasses.core.errors import EncodingError, TargetError
from qpasses.quant.encodings import ALLOWED_BITWIDTHS
from qpasses.quant.precision_type import FLOAT_BITWIDTHS, Precision

ANY_OP = "*"


@dataclass(frozen=True)
class Kernel:
    """One supported integer combination: activation, weight and bias precision (None: no constraint)."""

    activation: Precision
    weight: Precision | None = None
    bias: Precision | None = None

    def __str__(self) -> str:
        return "/".join(str(p) if p is not None else "any" for p in (self.activation, self.weight, self.bias))

    def matches(self, activation: Precision, weight: Precision | None, bias: Precision | None) -> bool:
        """An op matches when its activation agrees and so do the weight/bias it actually has."""
        return (
            activation == self.activation
            and (weight is None or self.weight is None or weight == self.weight)
            and (bias is None or self.bias is None or bias == self.bias)
        )


@dataclass(frozen=True)
class TargetDescriptor:
    """One accelerator.

    ``kernels`` maps op type (``"*"`` for any op not listed) to the integer kernels it has; no
    kernels means a float-only backend (a quantized-only one without any gets int8/int8/int32).
    ``ops`` lists the op types it runs (None: all). ``float_bitwidths`` says in which float
    precisions ops may run (empty: none). ``uint8_storage`` stores every 8-bit tensor of the QDQ
    model (weights and activations) as uint8 on the same grid (zero point shifted by 128 for signed
    grids): onnxruntime then fuses Conv/Gemm/MatMul into its u8u8 kernels, which cannot saturate on
    any CPU, whereas its u8s8/s8s8 kernels saturate int16 pair sums on x86 without VNNI.
    ``mac_io_only``: only the activations an integer Conv/ConvTranspose/Gemm/MatMul reads or writes are
    quantized; every other op runs in float (onnxruntime: its QDQ fusions make integer kernels of those
    ops alone, so a quantizer elsewhere only adds rounding).
    """

    name: str
    description: str = ""
    needs_quantized: bool = False
    kernels: Mapping[str, tuple[Kernel, ...]] = field(default_factory=dict)
    ops: tuple[str, ...] | None = None
    per_channel_weights: bool = True
    int32_ops: tuple[str, ...] = ()
    float_bitwidths: tuple[int, ...] = ()
    default_act_bw: int = 8
    default_weight_bw: int = 8
    default_bias_bw: int = 32
    default_float_bw: int | None = None
    uint8_storage: bool = False
    mac_io_only: bool = False

    def __post_init__(self) -> None:
        _check(
            isinstance(self.name, str) and self.name.strip() != "",
            "<unnamed>",
            "name",
            f"must be a non-empty string, got {self.name!r}",
        )
        where = self.name
        _check(isinstance(self.description, str), where, "description", "must be a string")
        for flag in ("needs_quantized", "per_channel_weights", "uint8_storage", "mac_io_only"):
            value = getattr(self, flag)
            _check(isinstance(value, bool), where, flag, f"must be true or false, got {value!r}")
        object.__setattr__(self, "kernels", MappingProxyType(_kernels(self.kernels, where)))
        if self.ops is not None:
            object.__setattr__(self, "ops", _names(self.ops, where, "ops"))
        object.__setattr__(self, "int32_ops", _names(self.int32_ops, where, "int32_ops"))
        floats = _names(self.float_bitwidths, where, "float_bitwidths", kind=int)
        _check(
            all(b in FLOAT_BITWIDTHS for b in floats),
            where,
            "float_bitwidths",
            f"must be among {list(FLOAT_BITWIDTHS)}, got {list(floats)}",
        )
        object.__setattr__(self, "float_bitwidths", floats)
        for key, role in (
            ("default_act_bw", "activation"),
            ("default_weight_bw", "weight"),
            ("default_bias_bw", "bias"),
        ):
            value = getattr(self, key)
            _check(
                isinstance(value, int) and not isinstance(value, bool) and value in ALLOWED_BITWIDTHS[role],
                where,
                key,
                f"{value!r} is not a supported {role} bitwidth",
            )
        if self.default_float_bw is not None:
            _check(
                self.default_float_bw in floats,
                where,
                "default_float_bw",
                f"{self.default_float_bw!r} is not one of float_bitwidths {list(floats)}",
            )
        if self.needs_quantized and not self.kernels:
            # A quantized-only backend that lists no kernels runs the common int8/int8/int32 one.
            object.__setattr__(self, "kernels", MappingProxyType({ANY_OP: (DEFAULT_KERNEL,)}))

    def __hash__(self) -> int:
        return hash(self.name)

    # --- queries ---------------------------------------------------------------------------------
    @property
    def runs_integer(self) -> bool:
        return bool(self.kernels)

    @property
    def float_only(self) -> bool:
        return not self.kernels

    def supports_op(self, op_type: str) -> bool:
        return self.ops is None or op_type in self.ops

    def supported_kernels(self, op_type: str) -> tuple[Kernel, ...]:
        """Integer kernels of an op type ("supported kernels": also the AMP candidate filter)."""
        return self.kernels.get(op_type, self.kernels.get(ANY_OP, ()))

    def supports_kernel(
        self, op_type: str, activation: Precision, weight: Precision | None = None, bias: Precision | None = None
    ) -> bool:
        return any(k.matches(activation, weight, bias) for k in self.supported_kernels(op_type))

    @property
    def activation_bitwidths(self) -> tuple[int, ...]:
        """The integer activation bitwidths its kernels take, ascending (any op)."""
        bws = {k.activation.bitwidth for ks in self.kernels.values() for k in ks if k.activation.dtype == "int"}
        return tuple(sorted(bws))

    def supports_float(self, bitwidth: int) -> bool:
        return bitwidth in self.float_bitwidths

    def supports_int32(self, op_type: str) -> bool:
        return op_type in self.int32_ops

    def float_bitwidth(self, wanted: int | None) -> int | None:
        """The float bitwidth to use for a request: the request if supported, else the default."""
        if wanted is not None and wanted in self.float_bitwidths:
            return wanted
        if self.default_float_bw is not None:
            return self.default_float_bw
        return max(self.float_bitwidths) if self.float_bitwidths else None

    def to_dict(self) -> dict[str, Any]:
        """The file form (what ``from_dict`` reads)."""
        return {
            "name": self.name,
            "description": self.description,
            "needs_quantized": self.needs_quantized,
            "kernels": {
                op: [[str(p) if p is not None else None for p in (k.activation, k.weight, k.bias)] for k in ks]
                for op, ks in self.kernels.items()
            },
            "ops": list(self.ops) if self.ops is not None else None,
            "per_channel_weights": self.per_channel_weights,
            "int32_ops": list(self.int32_ops),
            "float_bitwidths": list(self.float_bitwidths),
            "default_act_bw": self.default_act_bw,
            "default_weight_bw": self.default_weight_bw,
            "default_bias_bw": self.default_bias_bw,
            "default_float_bw": self.default_float_bw,
            "uint8_storage": self.uint8_storage,
            "mac_io_only": self.mac_io_only,
        }


def _check(ok: bool, target: str, key: str, problem: str) -> None:
    if not ok:
        raise TargetError(f"target {target!r}: field '{key}': {problem}")


def _names(value: Any, target: str, key: str, kind: type = str) -> tuple[Any, ...]:
    _check(isinstance(value, (list, tuple)), target, key, f"must be a list, got {type(value).__name__}")
    for item in value:
        _check(
            isinstance(item, kind) and not isinstance(item, bool),
            target,
            key,
            f"entries must be {kind.__name__}s, got {item!r}",
        )
    return tuple(value)


def _precision(value: Any, target: str, key: str) -> Precision | None:
    if value is None or isinstance(value, Precision):
        return value
    try:
        return Precision.parse(value)
    except EncodingError as exc:
        raise TargetError(f"target {target!r}: field '{key}': {exc}") from None


def _kernel(value: Any, target: str, key: str) -> Kernel:
    if isinstance(value, Kernel):
        return value
    if isinstance(value, Mapping):
        unknown = sorted(set(value) - {"activation", "weight", "bias"})
        _check(not unknown, target, key, f"unknown keys {unknown} (activation, weight, bias)")
        value = [value.get("activation"), value.get("weight"), value.get("bias")]
    _check(
        isinstance(value, (list, tuple)) and 1 <= len(value) <= 3,
        target,
        key,
        f"a kernel is [activation, weight, bias] like [int8, int8, int32], got {value!r}",
    )
    activation, weight, bias = (_precision(v, target, key) for v in (*value, None, None)[:3])
    if activation is None:
        raise TargetError(f"target {target!r}: field '{key}': the activation precision is required")
    return Kernel(activation, weight, bias)


def _kernels(value: Any, target: str) -> dict[str, tuple[Kernel, ...]]:
    _check(isinstance(value, Mapping), target, "kernels", f"must map op type -> list of kernels, got {value!r}")
    out: dict[str, tuple[Kernel, ...]] = {}
    for op, entries in value.items():
        _check(isinstance(op, str) and op != "", target, "kernels", f"op type keys must be strings, got {op!r}")
        _check(isinstance(entries, (list, tuple)), target, f"kernels.{op}", "must be a list of kernels")
        out[op] = tuple(_kernel(k, target, f"kernels.{op}[{i}]") for i, k in enumerate(entries))
    return out


DEFAULT_KERNEL = Kernel(Precision("int", 8), Precision("int", 8), Precision("int", 32))
_FIELDS = {f.name for f in dataclasses.fields(TargetDescriptor)}


def from_dict(data: Any, *, source: str = "<target>") -> TargetDescriptor:
    """Build a descriptor from parsed JSON/YAML, rejecting unknown fields by name."""
    if not isinstance(data, Mapping):
        raise TargetError(f"{source}: a target must be a mapping of fields, got {type(data).__name__}")
    name = data.get("name")
    if not isinstance(name, str) or not name.strip():
        raise TargetError(f"{source}: field 'name': required, a non-empty string")
    for key in data:
        if key not in _FIELDS:
            raise TargetError(
                f"{source}: target {name!r}: field '{key}': unknown field (known: {', '.join(sorted(_FIELDS))})"
            )
    values = dict(data)
    for key in ("ops", "int32_ops", "float_bitwidths"):
        if isinstance(values.get(key), list):
            values[key] = tuple(values[key])
    if values.get("kernels") is None:
        values.pop("kernels", None)
    try:
        return TargetDescriptor(**values)
    except TargetError as exc:
        raise TargetError(f"{source}: {exc}") from None


def load_target_file(path: str | Path) -> TargetDescriptor:
    """Read a JSON (``.json``) or YAML (anything else) target file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
        data: Any = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, yaml.YAMLError) as exc:
        raise TargetError(f"cannot read target file {path}: {exc}") from None
    return from_dict(data, source=str(path))
