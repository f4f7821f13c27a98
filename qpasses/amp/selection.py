"""Choosing an assignment: phase 2 of an AMP run, or the demotion search in its place.

Phase 2 walks the phase-1 list as a pareto curve (``pareto``; after a proxy-ranked phase 1, each
step that stops it is checked with the metric first: ``blockers``) and takes its cheapest point
that meets the goal. The demotion search starts from all-high instead (``demotion``). Either way
the result is the chosen assignment and the curve the final check may step back along.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from qpasses.amp.blockers import BlockerCheck, phase2_with_blocker_checks
from qpasses.amp.candidates import Assignment, Candidate
from qpasses.amp.demotion import DemotionResult, demotion_search
from qpasses.amp.pareto import ParetoPoint, forward_steps, reverse_steps, run_phase2
from qpasses.amp.reference_points import References
from qpasses.amp.run_state import AmpRun
from qpasses.amp.sensitivity import SensitivityEntry, with_group


@dataclass
class Selection:
    """What the search chose, and what it measured on the way (for the results and the final check)."""

    chosen: dict[str, Candidate]
    phase1: list[SensitivityEntry] = field(default_factory=list)
    points: list[ParetoPoint] = field(default_factory=list)
    demotion: DemotionResult | None = None
    checks: list[BlockerCheck] = field(default_factory=list)


def demotion_phase(run: AmpRun, refs: References, *, threshold: float, seed: int, progress: bool) -> Selection:
    """The demotion search from all-high; its history as pareto points (all-high first)."""
    partition, group_cands, macs = run.partition, run.group_candidates, run.macs
    baseline, lowest, goal = refs.baseline, refs.lowest, refs.goal
    start = time.perf_counter()
    high = {g: group_cands[g][-1] for g in partition.names}
    demotion = demotion_search(
        partition.names,
        high,
        lowest,
        lambda a: run.score(a, "phase2", "demotion"),
        goal,
        m=threshold,
        seed=seed,
        progress=progress,
    )
    chosen = dict(demotion.assignment)
    state = dict(high)
    base_bits = macs.bitops(baseline)
    high_bits = macs.bitops(high)
    points = [ParetoPoint(-1, high_bits, high_bits / base_bits, demotion.high_score, dict(high))]
    for i, d in enumerate(demotion.history):
        state[d.group] = lowest[d.group]
        bits = macs.bitops(state)
        points.append(ParetoPoint(i, bits, bits / base_bits, d.score, dict(state), d.group, lowest[d.group]))
    if demotion.promotions is None:
        run.messages.append(f"demotion: even all-high ({demotion.high_score:.4f}) misses the target {goal:.4f}")
    run.phase("demotion").seconds += time.perf_counter() - start
    return Selection(chosen, points=points, demotion=demotion)


def pareto_phase(
    run: AmpRun,
    refs: References,
    phase1_entries: list[SensitivityEntry],
    mode: str,
    *,
    allowed_accuracy_drop: float | None,
    algorithm: str,
    phase2_reverse: bool,
    max_proxy_repairs: int,
    progress: bool,
) -> Selection:
    """Phase 2 along the phase-1 list (``pareto.json``); the baseline when no point meets the goal."""
    macs, cache = run.macs, run.cache
    baseline, baseline_score, baseline_cand = refs.baseline, refs.baseline_score, refs.baseline_cand
    lowest, lowest_score, goal = refs.lowest, refs.lowest_score, refs.goal
    chosen: dict[str, Candidate] = dict(baseline)
    checks: list[BlockerCheck] = []
    start = time.perf_counter()

    def phase2_score(a: Assignment) -> float:
        return run.score(a, "phase2", "phase2")

    if mode == "proxy" and not phase2_reverse and allowed_accuracy_drop is not None:
        repaired = phase2_with_blocker_checks(
            phase1_entries,
            baseline,
            baseline_score,
            phase2_score,
            lambda g, c: run.score(with_group(baseline, g, c), "phase2", "phase2"),
            macs,
            macs.bitops(baseline),
            goal,
            algorithm=algorithm,
            max_repairs=max_proxy_repairs,
            progress=progress,
        )
        result2, checks = repaired.result, repaired.checks
        phase1_entries = repaired.order
        cache.save("phase1.json", [e.to_dict() for e in phase1_entries])
        run.messages += proxy_check_messages(checks, max_proxy_repairs)
    else:
        if phase2_reverse:
            steps, first, first_score = reverse_steps(phase1_entries, baseline, lowest), lowest, lowest_score
        else:
            steps, first, first_score = forward_steps(phase1_entries, baseline), baseline, baseline_score
        result2 = run_phase2(
            steps,
            first,
            first_score,
            phase2_score,
            macs,
            macs.bitops(baseline),
            goal,
            algorithm=algorithm,
            reverse=phase2_reverse,
            full=allowed_accuracy_drop is None,
            progress=progress,
        )
    points = result2.points
    cache.save("pareto.json", [p.to_dict() for p in points])
    if result2.chosen is None:
        run.messages.append(f"no pareto point meets the target {goal:.4f}: keeping the baseline {baseline_cand}")
    else:
        chosen = dict(result2.chosen.assignment)
    run.phase("phase2").seconds += time.perf_counter() - start
    return Selection(chosen, phase1_entries, points, checks=checks)


def proxy_check_messages(checks: Sequence[BlockerCheck], max_repairs: int) -> list[str]:
    """What the metric said about the proxy's order: one line per blocker checked."""
    out = []
    for c in checks:
        head = (
            f"proxy check: {c.group} at {c.candidate} (phase-1 position {c.position}"
            + (f", proxy {c.proxy:.1f} dB" if c.proxy is not None else "")
            + f") alone scores {c.score:.4f} (drop {c.drop:.4f})"
        )
        if c.verdict == "moved":
            out.append(f"{head}: misranked, moved to the end of the phase-1 list")
        elif c.verdict == "accumulated":
            out.append(f"{head} and stops phase 2 on the loss accumulated before it: the proxy's order holds")
        elif c.verdict == "sensitive":
            out.append(f"{head} and stops phase 2: only individually sensitive steps are left")
        else:
            out.append(
                f"{head} and stops phase 2, but the {max_repairs} repairs are used: the proxy misranks "
                "this model; phase1='exhaustive' (--phase1 exhaustive) may demote more groups"
            )
    return out
