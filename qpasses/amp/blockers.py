"""Phase 2 on a proxy-ranked list, with the metric checking where the proxy's order decides.

The proxy (``qpasses.amp.proxy``) orders phase 1 without calling the metric. What decides the result
is the *blocker*: the step right after the point phase 2 chooses, whose demotion makes the score
miss the target. Either the loss accumulated along the curve is what misses (the order does not
matter there: exhaustive phase 1 would stop about as far), or the proxy ranked an individually
sensitive group too early, which ends the curve before groups that could still be demoted.

So after each search the blocker is scored alone (the baseline with only that step applied, one
metric call, phase-2 callback). When that alone costs more than ``share`` of the room between the
baseline score and the target, the blocker is misranked: it moves to the end of the list (after
the other moved ones, least harmful first, as exhaustive phase 1 would rank it) and the search
resumes after the chosen point (``gallop_search``: the first points are unchanged and already
scored). The resumed curve starts with the same points, so the chosen BitOps can only fall. At most
``max_repairs`` blockers move; a last blocker still misranked then is reported.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from qpasses.amp.bitops import MacTable
from qpasses.amp.candidates import Assignment, Candidate
from qpasses.amp.pareto import Phase2Result, forward_steps, run_phase2
from qpasses.amp.sensitivity import SensitivityEntry

DEFAULT_MAX_REPAIRS = 4
DEFAULT_SHARE = 0.5


@dataclass(frozen=True)
class BlockerCheck:
    """One blocker scored alone, and the verdict:

    - ``moved``: it alone cost more than the allowed share of the room: misranked, moved to the end;
    - ``accumulated``: it alone costs little, the loss along the curve is what misses: the order holds;
    - ``sensitive``: an entry already moved (individually sensitive): only sensitive steps are left;
    - ``out of repairs``: misranked, but ``max_repairs`` blockers were moved already.
    """

    group: str
    candidate: Candidate
    position: int
    """Its index in the phase-1 list when checked."""
    proxy: float | None
    score: float
    drop: float
    verdict: str

    @property
    def moved(self) -> bool:
        return self.verdict == "moved"

    def to_dict(self) -> dict[str, Any]:
        return {
            "group": self.group,
            "candidate": str(self.candidate),
            "position": self.position,
            "proxy_db": self.proxy,
            "score_alone": self.score,
            "drop": self.drop,
            "verdict": self.verdict,
        }


@dataclass
class RepairedPhase2:
    result: Phase2Result
    order: list[SensitivityEntry]
    """The phase-1 list as finally searched (moved blockers at the end)."""
    checks: list[BlockerCheck] = field(default_factory=list)
    exhausted: bool = False
    """The last check found a misranked blocker and no repair was left."""


def phase2_with_blocker_checks(
    entries: Sequence[SensitivityEntry],
    baseline: Assignment,
    baseline_score: float,
    score: Callable[[Assignment], float],
    alone: Callable[[str, Candidate], float],
    macs: MacTable,
    reference_bitops: float,
    target: float,
    *,
    algorithm: str = "binary",
    max_repairs: int = DEFAULT_MAX_REPAIRS,
    share: float = DEFAULT_SHARE,
    progress: bool = True,
) -> RepairedPhase2:
    """Forward phase 2 over ``entries`` (proxy order), moving misranked blockers to the end (see module doc)."""
    front = list(entries)
    moved: list[tuple[float, SensitivityEntry]] = []  # (score alone, entry)
    room = baseline_score - target
    checks: list[BlockerCheck] = []

    def order() -> list[SensitivityEntry]:
        return front + [e for _, e in sorted(moved, key=lambda m: -m[0])]

    result = run_phase2(
        forward_steps(order(), baseline),
        baseline,
        baseline_score,
        score,
        macs,
        reference_bitops,
        target,
        algorithm=algorithm,
        progress=progress,
    )
    exhausted = False
    while True:
        cut = result.chosen.index if result.chosen is not None else -1
        if cut + 1 >= len(result.steps):
            break  # every step taken: nothing blocks
        blocker = result.steps[cut + 1]
        value = alone(blocker.group, blocker.candidate)
        drop = baseline_score - value
        entry = next(
            e for e in front + [m[1] for m in moved] if e.group == blocker.group and e.candidate == blocker.candidate
        )
        position = order().index(entry)
        if entry not in front:
            verdict = "sensitive"
        elif drop <= share * room:
            verdict = "accumulated"
        elif sum(c.moved for c in checks) >= max_repairs:
            verdict, exhausted = "out of repairs", True
        else:
            verdict = "moved"
        checks.append(BlockerCheck(blocker.group, blocker.candidate, position, entry.proxy, value, drop, verdict))
        if verdict != "moved":
            break
        front.remove(entry)
        moved.append((value, entry))
        known = {p.index: p for p in result.points if 0 <= p.index <= cut}
        result = run_phase2(
            forward_steps(order(), baseline),
            baseline,
            baseline_score,
            score,
            macs,
            reference_bitops,
            target,
            algorithm=algorithm,
            progress=progress,
            resume_after=cut,
            known=known,
        )
    return RepairedPhase2(result, order(), checks, exhausted)
