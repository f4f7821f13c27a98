"""AMP candidates: one (activation, parameter) precision pair a quantizer group may take.

AIMET writes a candidate as ``((act_bw, act_dtype), (param_bw, param_dtype))``; the CLI writes
``A/W`` (int bits) with an ``f`` suffix for float (``16f/16f``). Both parse to ``Candidate``.
Candidates are ordered by their BitOps cost so "lower" and "higher" mean the same thing in every
phase: ``cost = eff(act) x eff(param)``, where float bits count ``sqrt(1.5)`` times (AIMET's
weighting: a float16 MAC is dearer than an int16 one).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from qpasses.amp.errors import AmpError
from qpasses.core.errors import QPassesError
from qpasses.quant.precision_type import Precision

FLOAT_MULTIPLIER = math.sqrt(1.5)
_TEXT = re.compile(r"^\s*(\d+)([fi]?)\s*/\s*(\d+)([fi]?)\s*$", re.IGNORECASE)


def effective_bits(p: Precision) -> float:
    """Bits a MAC costs in BitOps: float counts sqrt(1.5) times its width (AIMET)."""
    return p.bitwidth * FLOAT_MULTIPLIER if p.is_float else float(p.bitwidth)


@dataclass(frozen=True, order=False)
class Candidate:
    """Activation and parameter precision of one group. Both int or both float (an op is all-int or all-float)."""

    act: Precision
    param: Precision

    def __post_init__(self) -> None:
        if self.act.is_float != self.param.is_float:
            raise AmpError(
                f"candidate {self}: activation and parameter must both be int or both float "
                "(an op runs all-integer or all-float)"
            )
        if not self.act.is_float and self.act.bitwidth not in (8, 16):
            raise AmpError(f"candidate {self}: int activations are 8 or 16 bits")
        if not self.param.is_float and not 4 <= self.param.bitwidth <= 16:
            raise AmpError(f"candidate {self}: int parameters are 4 to 16 bits")

    def __str__(self) -> str:
        def part(p: Precision) -> str:
            return f"{p.bitwidth}f" if p.is_float else str(p.bitwidth)

        return f"{part(self.act)}/{part(self.param)}"

    @property
    def is_float(self) -> bool:
        return self.act.is_float

    @property
    def cost(self) -> float:
        """BitOps per MAC."""
        return effective_bits(self.act) * effective_bits(self.param)

    @property
    def sort_key(self) -> tuple[float, float, float]:
        return (self.cost, effective_bits(self.act), effective_bits(self.param))

    def to_tuple(self) -> tuple[tuple[int, str], tuple[int, str]]:
        """AIMET's form ``((act_bw, act_dtype), (param_bw, param_dtype))``."""
        return (self.act.bitwidth, self.act.dtype), (self.param.bitwidth, self.param.dtype)


def _precision(bits: Any, dtype: Any, where: str) -> Precision:
    name = getattr(dtype, "name", dtype)  # accepts enums such as AIMET's QuantizationDataType.int
    if not isinstance(name, str) or name.lower() not in ("int", "float"):
        raise AmpError(f"candidate {where}: dtype must be 'int' or 'float', got {dtype!r}")
    if isinstance(bits, bool) or not isinstance(bits, int):
        raise AmpError(f"candidate {where}: bitwidth must be an integer, got {bits!r}")
    try:
        return Precision("int" if name.lower() == "int" else "float", bits)
    except QPassesError as exc:
        raise AmpError(f"candidate {where}: {exc}") from None


def parse_candidate(value: Any) -> Candidate:
    """``Candidate``, ``"8/8"``, ``"16/8"``, ``"16f/16f"``, or ``((8, "int"), (8, "int"))``."""
    if isinstance(value, Candidate):
        return value
    if isinstance(value, str):
        m = _TEXT.match(value)
        if m is None:
            raise AmpError(f"candidate {value!r} is not of the form A/W (e.g. 8/8, 16/8, 16f/16f)")
        act = Precision("float" if m.group(2).lower() == "f" else "int", int(m.group(1)))
        param = Precision("float" if m.group(4).lower() == "f" else "int", int(m.group(3)))
        try:
            return Candidate(act, param)
        except QPassesError as exc:
            raise AmpError(str(exc)) from None
    if (
        isinstance(value, Sequence)
        and len(value) == 2
        and all(isinstance(v, Sequence) and not isinstance(v, str) and len(v) == 2 for v in value)
    ):
        (abw, adt), (pbw, pdt) = value
        return Candidate(_precision(abw, adt, repr(value)), _precision(pbw, pdt, repr(value)))
    raise AmpError(f"candidate {value!r}: expected 'A/W' or ((act_bw, act_dtype), (param_bw, param_dtype))")


def parse_candidates(values: Iterable[Any] | str) -> list[Candidate]:
    """A list (or comma-separated text) of candidates, deduplicated and sorted from lowest to highest cost."""
    items = [v for v in values.split(",") if v.strip()] if isinstance(values, str) else list(values)
    parsed = list(dict.fromkeys(parse_candidate(v) for v in items))
    if len(parsed) < 2:
        raise AmpError(f"AMP needs at least two distinct candidates, got {[str(c) for c in parsed]}")
    return sorted(parsed, key=lambda c: c.sort_key)


Assignment = Mapping[str, Candidate]
"""Group name -> candidate: one point of the search space."""


def signature(assignment: Assignment) -> str:
    """A stable text key of an assignment (for caches and logs)."""
    return ";".join(f"{name}={assignment[name]}" for name in sorted(assignment))


@dataclass(frozen=True)
class OpKernel:
    """What a target must run for one op of a group: its type and whether it has a weight / bias."""

    op_type: str
    weight: bool
    bias: bool


def supports(target: Any, kernels: Sequence[OpKernel], candidate: Candidate, bias_bw: int = 32) -> bool:
    """Whether ``target`` runs every op of a group at ``candidate`` (its "supported kernels")."""
    if target is None:
        return True
    if candidate.is_float:
        return bool(target.supports_float(candidate.act.bitwidth))
    bias = Precision("int", bias_bw)
    return all(
        target.supports_kernel(
            k.op_type, candidate.act, candidate.param if k.weight else None, bias if k.bias else None
        )
        for k in kernels
    )


def filter_candidates(
    groups: Mapping[str, Sequence[OpKernel]],
    candidates: Sequence[Candidate],
    target: Any,
    *,
    use_all: bool = False,
    bias_bw: int = 32,
) -> dict[str, list[Candidate]]:
    """Per group, the candidates the target supports (all of them with ``use_all``), lowest first."""
    out: dict[str, list[Candidate]] = {}
    for name, kernels in groups.items():
        ok = list(candidates) if use_all else [c for c in candidates if supports(target, kernels, c, bias_bw)]
        if not ok:
            raise AmpError(
                f"target {getattr(target, 'name', target)!r} supports none of the candidates "
                f"{[str(c) for c in candidates]} for group {name!r} "
                f"({', '.join(sorted({k.op_type for k in kernels}))}); pass other candidates or "
                "use_all_amp_candidates=True (--use-all-candidates) to ignore the target's kernels"
            )
        out[name] = ok
    return out


def collapse_unweighted(
    group_candidates: Mapping[str, Sequence[Candidate]], weighted: set[str]
) -> dict[str, list[Candidate]]:
    """Groups without weights only have an activation precision: one candidate per activation (the dearest)."""
    out: dict[str, list[Candidate]] = {}
    for name, cands in group_candidates.items():
        if name in weighted:
            out[name] = list(cands)
            continue
        by_act: dict[Precision, Candidate] = {}
        for c in cands:  # lowest first, so the last one per activation precision wins
            by_act[c.act] = c
        out[name] = sorted(by_act.values(), key=lambda c: c.sort_key)
    return out
