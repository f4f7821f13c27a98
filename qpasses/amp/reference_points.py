"""The reference points of an AMP run: FP32, each candidate on every group, the lowest assignment.

From them come the *baseline* phase 1 holds the other groups at (``baseline_rule``: the highest
candidate, or AIMET's best-scoring one), the *reference* the allowed drop is measured from (FP32,
or the baseline when FP32 scores non-finite) and the *goal*; the flow's early exits read them too.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

from qpasses.amp.candidates import Candidate
from qpasses.amp.executors import progress_bar
from qpasses.amp.groups import GroupPartition
from qpasses.amp.run_state import AmpRun


@dataclass
class References:
    """The scores and assignments the search starts from and is measured against."""

    fp32: float
    uniform: dict[str, tuple[Candidate, dict[str, Candidate], float]]  # str(candidate) -> (it, everywhere, score)
    lowest: dict[str, Candidate]
    lowest_score: float
    baseline_cand: Candidate
    baseline: dict[str, Candidate]
    baseline_score: float
    reference: float  # what the allowed drop is measured from
    goal: float  # the target score (-inf without an allowed drop)


def reference_points(
    run: AmpRun,
    cands: list[Candidate],
    baseline_rule: str,
    allowed_accuracy_drop: float | None,
    progress: bool,
) -> References:
    """Score FP32, every candidate applied to every group and the lowest assignment; pick the baseline."""
    partition, group_cands = run.partition, run.group_candidates
    # Reference points: FP32, every candidate on every group, the lowest assignment.
    start = time.perf_counter()
    uniform: dict[str, tuple[Candidate, dict[str, Candidate], float]] = {}
    with progress_bar(len(cands) + 2, progress, "AMP reference") as bar:
        bar.set_postfix_str("FP32")
        fp32 = run.score_model(run.model_bytes, "fp32|phase2", "reference", "the FP32 model", finite=False)
        bar.update()
        for c in cands:
            bar.set_postfix_str(f"all {c}")
            assignment = uniform_assignment(partition, group_cands, c)
            uniform[str(c)] = (c, assignment, run.score(assignment, "phase2", "reference"))
            bar.update()
        bar.set_postfix_str("lowest")
        lowest = {g: group_cands[g][0] for g in partition.names}
        lowest_score = run.score(lowest, "phase2", "reference")
        bar.update()
    if baseline_rule == "best":  # AIMET: the candidate scoring best on every group
        baseline_cand, baseline, baseline_score = max(uniform.values(), key=lambda u: (u[2], u[0].sort_key))
    else:  # the issue's: everything at the highest candidate
        baseline_cand, baseline, baseline_score = uniform[str(cands[-1])]
    reference = fp32 if math.isfinite(fp32) else baseline_score
    if not math.isfinite(fp32):
        run.messages.append(f"FP32 score is {fp32}: the allowed drop is measured from the baseline instead")
    goal = reference - allowed_accuracy_drop if allowed_accuracy_drop is not None else -math.inf
    run.phase("reference").seconds += time.perf_counter() - start
    return References(fp32, uniform, lowest, lowest_score, baseline_cand, baseline, baseline_score, reference, goal)


def nearest(available: Sequence[Candidate], wanted: Candidate) -> Candidate:
    """``wanted`` if the group supports it, else its dearest candidate not above it, else its cheapest."""
    if wanted in available:
        return wanted
    below = [c for c in available if c.sort_key <= wanted.sort_key]
    return below[-1] if below else available[0]


def uniform_assignment(
    partition: GroupPartition, group_candidates: dict[str, list[Candidate]], candidate: Candidate
) -> dict[str, Candidate]:
    """Every group at ``candidate`` (or its nearest supported one)."""
    return {g: nearest(group_candidates[g], candidate) for g in partition.names}
