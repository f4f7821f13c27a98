"""The final check of AMP's chosen point: its real QDQ model scored three ways, and what to say about it.

For each point verified (the chosen one, then, while the runtime score misses the target, the
cheaper-first pareto points that met it in the search, then the baseline) AMP records:

- ``simulated_score``: the search's phase-2/3 score of the assignment (the one-session simulation,
  or the rebuilt model's score when the simulation is off);
- ``runtime_score``: the lowered model in onnxruntime's default session, what users run (graph
  optimizations on: QDQ Conv/Gemm/MatMul fused into integer kernels, whose results depend on the
  CPU). The target and the fallback follow this score;
- ``exact_score``: the same model with exact QDQ semantics (``qpasses.core.verification.exact_session``).

Two scores *diverge* when they differ by more than ``DIVERGENCE_RTOL`` (0.5%) of the reference
score's magnitude (the FP32 score, or the baseline's when FP32 is not finite, as for SQNR), with
an absolute floor of ``DIVERGENCE_ATOL``. On the digits test split (accuracy ~0.98) that is ~0.005:
one sample of 360 does not diverge, two do. A runtime/exact divergence means onnxruntime's fused
integer kernels on this CPU do not compute what the QDQ model says (x86 without VNNI: its u8s8
kernels saturate int16 pair sums), and is a loud warning; so is a simulation/exact divergence.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

from qpasses.amp.candidates import Candidate

DIVERGENCE_RTOL = 0.005
DIVERGENCE_ATOL = 1e-6

PointKind = Literal["chosen", "pareto", "baseline"]


def divergence_tolerance(reference: float) -> float:
    """How far two scores of one model may differ: 0.5% of ``|reference|`` (at least ``DIVERGENCE_ATOL``)."""
    if not math.isfinite(reference):
        return DIVERGENCE_ATOL
    return max(DIVERGENCE_RTOL * abs(reference), DIVERGENCE_ATOL)


def diverges(a: float, b: float, tolerance: float) -> bool:
    """More than ``tolerance`` apart (an infinite score against a finite one diverges; NaN never does)."""
    if math.isnan(a) or math.isnan(b) or a == b:
        return False
    gap = abs(a - b)
    return not math.isfinite(gap) or gap > tolerance


@dataclass
class VerifiedPoint:
    """One assignment lowered for real and scored: simulated (search), runtime session, exact QDQ."""

    label: str
    kind: PointKind
    assignment: dict[str, Candidate]
    bitops: float
    relative_bitops: float
    simulated_score: float
    runtime_score: float
    exact_score: float
    meets_target: bool

    @property
    def runtime_gap(self) -> float:
        """Runtime session minus exact QDQ semantics."""
        return self.runtime_score - self.exact_score

    def to_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "kind": self.kind,
            "bitops": self.bitops,
            "relative_bitops": self.relative_bitops,
            "simulated_score": self.simulated_score,
            "runtime_score": self.runtime_score,
            "exact_score": self.exact_score,
            "runtime_minus_exact": self.runtime_gap,
            "meets_target": self.meets_target,
            "precisions": {g: str(c) for g, c in self.assignment.items()},
        }


def _share(gap: float, reference: float, reference_name: str) -> str:
    if math.isfinite(gap) and math.isfinite(reference) and reference != 0:
        return f"{100 * abs(gap) / abs(reference):.1f}% of |{reference_name} {reference:.4f}|"
    return f"|{reference_name}| {reference:.4f}"


def fallback_messages(verified: list[VerifiedPoint], goal: float, tolerance: float) -> list[str]:
    """What happened when the chosen point missed the target on its real model (nothing when it met it)."""
    if len(verified) < 2 and (not verified or verified[0].meets_target):
        return []
    first, final = verified[0], verified[-1]
    text = (
        f"the chosen point scored {first.runtime_score:.4f} on its real QDQ model in onnxruntime's default "
        f"session, {goal - first.runtime_score:.4f} below the target {goal:.4f} (exact QDQ semantics: "
        f"{first.exact_score:.4f}; simulated: {first.simulated_score:.4f}; BitOps "
        f"{first.relative_bitops:.3f} x baseline)"
    )
    if diverges(first.runtime_score, first.exact_score, tolerance):
        verdict = "meets" if first.exact_score >= goal else "misses"
        text += (
            f": the runtime session is {abs(first.runtime_gap):.4f} off exact QDQ semantics, which "
            f"{verdict} the target (see the warning)"
        )
    elif diverges(first.simulated_score, first.exact_score, tolerance):
        text += f": the real model scores {first.simulated_score - first.exact_score:+.4f} off its simulated score"
    if len(verified) == 1:
        return [text + "; it is the baseline, kept as is"]
    between = len(verified) - 2
    took = f"fell back to {final.label}" if final.kind == "baseline" else f"took {final.label} instead"
    tail = (
        f"{took}: it scores {final.runtime_score:.4f} in the runtime session (exact QDQ "
        f"{final.exact_score:.4f}, simulated {final.simulated_score:.4f}) at BitOps "
        f"{final.relative_bitops:.3f} x baseline, against {first.relative_bitops:.3f} for the chosen point"
    )
    if between:
        tail += (
            f"; the {between} point{'s' if between > 1 else ''} tried in between (dearer than the chosen one) "
            "missed the target too"
        )
    if not final.meets_target:
        tail += "; it misses the target as well: no verified point meets it"
    return [text, tail]


def verification_warnings(
    verified: list[VerifiedPoint],
    *,
    reference: float,
    reference_name: str,
    tolerance: float,
    simulated: bool,
    saved_model: str,
) -> list[str]:
    """Loud warnings: the runtime session diverging from exact QDQ semantics; the simulation from the model."""
    out: list[str] = []
    final = verified[-1] if verified else None
    runtime_off = [v for v in verified if diverges(v.runtime_score, v.exact_score, tolerance)]
    if runtime_off:
        v = runtime_off[0]
        lower = "lower" if v.runtime_gap < 0 else "higher"
        text = (
            f"onnxruntime's default session scores {v.label} {v.runtime_score:.4f}, but exact QDQ semantics "
            f"score the same model {v.exact_score:.4f}: {abs(v.runtime_gap):.4f} {lower} "
            f"({_share(v.runtime_gap, reference, reference_name)}; tolerance {tolerance:.4g}). The "
            "onnxruntime fused integer kernels on this CPU diverge from QDQ semantics (on x86 without VNNI "
            "its u8s8 kernels saturate int16 pair sums), so users of the default session do not get the "
            "scores AMP searched with"
        )
        if v.kind == "chosen" and final is not None and final is not v:
            text += f"; AMP fell back from it to {final.label}, at BitOps {final.relative_bitops:.3f} x baseline"
        if len(runtime_off) > 1:
            worst = max(runtime_off, key=lambda w: abs(w.runtime_gap))
            text += (
                f"; {len(runtime_off)} of the {len(verified)} points verified diverge (the largest gap: "
                f"{abs(worst.runtime_gap):.4f}, {worst.label})"
            )
        text += (
            f". Localize it: qpasses check {saved_model} --runtime ort; fix it: quantize for target 'ort' "
            "(portable uint8 storage: --target ort)"
        )
        out.append(text)
    if simulated:
        sim_off = [v for v in verified if diverges(v.simulated_score, v.exact_score, tolerance)]
        if sim_off:
            v = sim_off[0]
            gap = v.simulated_score - v.exact_score
            out.append(
                f"the simulation scored {v.label} {v.simulated_score:.4f}, but its lowered QDQ model scores "
                f"{v.exact_score:.4f} with exact QDQ semantics: off by {gap:+.4f} "
                f"({_share(gap, reference, reference_name)}; tolerance {tolerance:.4g}). The search's "
                "scores do not match the real lowering here: please report it; simulate=False "
                "(--no-simulate) searches on rebuilt models instead"
            )
    return out
