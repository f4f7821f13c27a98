"""Phase 2: the pareto curve of BitOps vs score, and the point that meets the target.

Point ``i`` applies the first ``i + 1`` steps of the phase-1 list cumulatively to the start
(everything at baseline; with ``phase2_reverse``, everything at its lowest candidate and the
list walked from the most sensitive group, each step promoting it to its next candidate, as
AIMET does). A step that would not move its group the right way (a later, more sensitive entry
for a group already demoted further) is dropped, so BitOps change monotonically along the curve.
Only the points the search evaluates are scored; ``full`` scores them all (``allowed drop None``).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from tqdm import tqdm

from qpasses.amp.bitops import MacTable
from qpasses.amp.candidates import Assignment, Candidate, parse_candidate
from qpasses.amp.search import SEARCHES, full_scan, gallop_search
from qpasses.amp.sensitivity import SensitivityEntry


@dataclass(frozen=True)
class Step:
    """Move ``group`` to ``candidate`` (its phase-1 score says how much that alone cost)."""

    group: str
    candidate: Candidate
    phase1_score: float


def forward_steps(accuracy_list: Sequence[SensitivityEntry], baseline: Assignment) -> list[Step]:
    """Least sensitive first; each step lowers its group below where it is."""
    current = dict(baseline)
    steps = []
    for e in accuracy_list:
        if e.candidate.sort_key < current[e.group].sort_key:
            steps.append(Step(e.group, e.candidate, e.score))
            current[e.group] = e.candidate
    return steps


def reverse_steps(accuracy_list: Sequence[SensitivityEntry], baseline: Assignment, lowest: Assignment) -> list[Step]:
    """Most sensitive first; each entry promotes its group to the next candidate in that order (last: baseline)."""
    reversed_list = list(reversed(accuracy_list))
    order: dict[str, list[Candidate]] = {}
    for e in reversed_list:
        order.setdefault(e.group, []).append(e.candidate)
    current = dict(lowest)
    steps = []
    for e in reversed_list:
        seq = order[e.group]
        i = seq.index(e.candidate) + 1
        target = seq[i] if i < len(seq) else baseline[e.group]
        if target.sort_key > current[e.group].sort_key:
            steps.append(Step(e.group, target, e.score))
            current[e.group] = target
    return steps


def apply_steps(start: Assignment, steps: Sequence[Step], count: int) -> dict[str, Candidate]:
    out = dict(start)
    for s in steps[:count]:
        out[s.group] = s.candidate
    return out


@dataclass
class ParetoPoint:
    """One scored point of the curve; ``index`` -1 is the start (no step applied)."""

    index: int
    bitops: float
    relative_bitops: float
    score: float
    assignment: dict[str, Candidate]
    group: str | None = None
    candidate: Candidate | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "bitops": self.bitops,
            "relative_bitops": self.relative_bitops,
            "score": self.score,
            "changed_group": self.group,
            "candidate": None if self.candidate is None else str(self.candidate),
            "precisions": {g: str(c) for g, c in self.assignment.items()},
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ParetoPoint:
        return cls(
            int(data["index"]),
            float(data["bitops"]),
            float(data["relative_bitops"]),
            float(data["score"]),
            {g: parse_candidate(c) for g, c in data["precisions"].items()},
            data.get("changed_group"),
            None if data.get("candidate") is None else parse_candidate(data["candidate"]),
        )


@dataclass
class Phase2Result:
    points: list[ParetoPoint]
    chosen: ParetoPoint | None
    """The point meeting the target (None: none does; the caller falls back to the baseline)."""
    steps: list[Step] = field(default_factory=list)


def run_phase2(
    steps: Sequence[Step],
    start: Assignment,
    start_score: float,
    score: Callable[[Assignment], float],
    macs: MacTable,
    reference_bitops: float,
    target: float,
    *,
    algorithm: str = "binary",
    reverse: bool = False,
    full: bool = False,
    progress: bool = True,
    resume_after: int | None = None,
    known: Mapping[int, ParetoPoint] | None = None,
) -> Phase2Result:
    """Search the cumulative sequence for the lowest-BitOps point meeting ``target``.

    ``resume_after``: point ``i`` (forward sequences only; -1 is the start) is known to meet the target,
    so only the points after it are searched (``gallop_search``); ``known`` are points already scored
    (the same first steps), reported again without scoring them.
    """
    evaluated: dict[int, ParetoPoint] = dict(known or {})
    bar = tqdm(total=len(steps), desc="AMP phase 2", unit="point", file=sys.stderr, disable=not progress, leave=False)

    def point(i: int) -> ParetoPoint:
        if i not in evaluated:
            assignment = apply_steps(start, steps, i + 1)
            bitops = macs.bitops(assignment)
            value = score(assignment)
            evaluated[i] = ParetoPoint(
                i,
                bitops,
                bitops / reference_bitops if reference_bitops else math.nan,
                value,
                assignment,
                steps[i].group,
                steps[i].candidate,
            )
            bar.update()
        return evaluated[i]

    start_bitops = macs.bitops(start)
    first = ParetoPoint(
        -1, start_bitops, start_bitops / reference_bitops if reference_bitops else math.nan, start_score, dict(start)
    )
    with bar:
        if not steps:
            return Phase2Result([first], first if start_score >= target else None, [])
        values = [lambda i=i: point(i).score for i in range(len(steps))]
        if resume_after is not None and not (full or reverse):
            if resume_after < 0 and values[0]() < target:
                index = 0  # nothing after the start meets the target: as the searches answer it
            else:
                index = gallop_search(values, target, max(resume_after, 0), brute_force=algorithm == "brute-force")
        else:
            search = full_scan if full else SEARCHES[algorithm]
            index = search(values, target, reverse)
        hit = point(index)
    points = [first, *(evaluated[i] for i in sorted(evaluated))]
    chosen: ParetoPoint | None = hit if hit.score >= target else None
    if chosen is None and start_score >= target and not reverse:
        chosen = first  # no demotion meets the target: everything stays at baseline
    return Phase2Result(points, chosen, list(steps))
