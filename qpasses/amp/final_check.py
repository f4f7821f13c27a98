"""The final check of an AMP run: the chosen assignment lowered by the real pipeline and scored.

Each point is quantized as ``quantize_model`` would (``insert-converts`` included) and scored in
onnxruntime's default session (what users run: the reported score) and with exact QDQ semantics,
beside its simulated score. When the runtime score misses the goal the check steps back along the
curve (cheapest first), then to the baseline. Measured on every run, never cached. What the scores
mean (divergences, fallbacks) is ``verify``'s.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from qpasses.amp.candidates import Candidate, signature
from qpasses.amp.evaluators import describe
from qpasses.amp.executors import progress_bar
from qpasses.amp.overrides import quantize_assignment
from qpasses.amp.pareto import ParetoPoint
from qpasses.amp.reference_points import References
from qpasses.amp.run_state import AmpRun
from qpasses.amp.verify import PointKind, VerifiedPoint, divergence_tolerance, fallback_messages, verification_warnings
from qpasses.quantize import QuantizeResult


@dataclass
class FinalCheck:
    """The points verified (the chosen one first, the saved one last) and what to warn about."""

    verified: list[VerifiedPoint]
    tolerance: float
    warnings: list[str]
    quantized: QuantizeResult | None  # the saved point's model

    @property
    def final(self) -> VerifiedPoint:
        return self.verified[-1]


def final_check(
    run: AmpRun, refs: References, chosen: dict[str, Candidate], points: Sequence[ParetoPoint], results_dir: str | Path
) -> FinalCheck:
    """Lower and score ``chosen`` (then the fallbacks, until one meets the goal); messages go to the run."""
    graph, partition, feeds, config, macs = run.graph, run.partition, run.feeds, run.config, run.macs
    baseline, baseline_cand, goal, reference = refs.baseline, refs.baseline_cand, refs.goal, refs.reference
    # The real model of the chosen point, scored as saved: in onnxruntime's default session (what users run:
    # the target and the fallback follow it) and with exact QDQ semantics, beside its simulated score. When the
    # runtime score misses the target, step back along the curve (cheapest first), then to the baseline.
    start = time.perf_counter()
    tolerance = divergence_tolerance(reference)
    base_bits = macs.bitops(baseline)
    fallbacks = sorted(
        (p for p in points if p.score >= goal and p.assignment not in (chosen, baseline)), key=lambda p: p.bitops
    )
    todo: list[tuple[str, PointKind, dict[str, Candidate]]] = [("the chosen point", "chosen", chosen)]
    todo += [(f"pareto point {p.index}", "pareto", p.assignment) for p in fallbacks]
    todo.append((f"the baseline ({baseline_cand} on every group)", "baseline", baseline))
    unique: dict[str, tuple[str, PointKind, dict[str, Candidate]]] = {}
    for item in todo:  # the chosen point may be the baseline, or equal a pareto point
        unique.setdefault(signature(item[2]), item)
    verified: list[VerifiedPoint] = []
    quantized = None
    with progress_bar(len(unique), run.progress, "AMP verify", unit="point") as bar:
        for label, kind, assignment in unique.values():
            quantized = quantize_assignment(
                graph,
                partition,
                assignment,
                feeds,
                config,
                target=run.target,
                bias_correction=run.bias_correction,
                batch_size=run.batch_size,
            )
            blob = quantized.model.SerializeToString()
            what = f"{label}'s QDQ model ({describe(assignment)})"  # measured every run: never from the cache
            runtime = run.score_model(blob, None, "verify", f"{what} in the default session")
            exact = run.score_model(blob, None, "verify", f"{what} with exact QDQ semantics", exact=True)
            simulated = run.score(assignment, "phase2", "verify")
            bits = macs.bitops(assignment)
            relative = bits / base_bits if base_bits else math.nan
            verified.append(
                VerifiedPoint(label, kind, dict(assignment), bits, relative, simulated, runtime, exact, runtime >= goal)
            )
            bar.update()
            if runtime >= goal:
                break
    run.messages += fallback_messages(verified, goal, tolerance)
    reference_name = "FP32 score" if math.isfinite(refs.fp32) else "baseline score"
    warns = verification_warnings(
        verified,
        reference=reference,
        reference_name=reference_name,
        tolerance=tolerance,
        simulated=run.sim_reason is None,
        saved_model=str(Path(results_dir) / "model.qdq.onnx"),
    )
    run.phase("verify").seconds += time.perf_counter() - start
    return FinalCheck(verified, tolerance, warns, quantized)
