"""Layer demotion search: which groups must stay at the high candidate (int16) to meet a target.

The second algorithm (``algorithm="demotion"``), after one vendor's description:

1. ``high = metric(all high)``; below the target there is no solution (None). If the all-low
   model already beats the target nothing needs promotion ([]).
2. Threshold ``thr = high - m * (high - target)``, ``m = 0.5`` by default.
3. From all-high, demote one group per walk: walk the remaining groups from where the last walk
   stopped, trying each (demote, measure, undo); stop at the first whose score exceeds ``thr``
   and demote it, else demote the best seen. Wrapping to the start reshuffles the remaining
   groups with a seeded RNG (seed 1). Record (group, score after demotion).
4. Scores are not monotone in the number of demotions, so demote everything, then keep the
   longest recorded prefix whose score still meets the target. The rest is the promotion list.

The result always meets the target (its score was measured on exactly that assignment).
"""

from __future__ import annotations

import random
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from tqdm import tqdm

from qpasses.amp.candidates import Assignment, Candidate


@dataclass(frozen=True)
class Demotion:
    group: str
    score: float
    """Score with this group and every earlier one demoted."""


@dataclass
class DemotionResult:
    promotions: list[str] | None
    """Groups kept at the high candidate (None: even all-high misses the target)."""
    assignment: dict[str, Candidate]
    score: float
    history: list[Demotion] = field(default_factory=list)
    high_score: float = float("nan")
    low_score: float = float("nan")
    evaluations: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "promotions": self.promotions,
            "score": self.score,
            "high_score": self.high_score,
            "low_score": self.low_score,
            "evaluations": self.evaluations,
            "assignment": {g: str(c) for g, c in self.assignment.items()},
            "history": [{"group": d.group, "score": d.score} for d in self.history],
        }


def demotion_search(
    groups: Sequence[str],
    high: Candidate | Assignment,
    low: Candidate | Assignment,
    metric: Callable[[Assignment], float],
    target: float,
    *,
    m: float = 0.5,
    seed: int = 1,
    progress: bool = True,
    high_score: float | None = None,
    low_score: float | None = None,
) -> DemotionResult:
    """Demote groups from ``high`` to ``low`` while ``metric`` (higher is better) stays >= ``target``."""
    highs = {g: high for g in groups} if isinstance(high, Candidate) else dict(high)
    lows = {g: low for g in groups} if isinstance(low, Candidate) else dict(low)
    count = 0

    def measure(assignment: Assignment) -> float:
        nonlocal count
        count += 1
        return metric(assignment)

    acc_high = measure(highs) if high_score is None else high_score
    if acc_high < target:
        return DemotionResult(
            None, highs, acc_high, [], acc_high, low_score if low_score is not None else float("nan"), count
        )
    acc_low = measure(lows) if low_score is None else low_score
    if acc_low > target:
        return DemotionResult([], lows, acc_low, [], acc_high, acc_low, count)
    thr = acc_high - m * (acc_high - target)
    rng = random.Random(seed)
    current = dict(highs)
    remaining = [g for g in groups if highs[g] != lows[g]]
    history: list[Demotion] = []
    pos = 0
    bar = tqdm(
        total=len(remaining), desc="AMP demotion", unit="demotion", file=sys.stderr, disable=not progress, leave=False
    )
    with bar:
        while remaining:
            tried: dict[str, float] = {}
            chosen: str | None = None
            while len(tried) < len(remaining):
                if pos >= len(remaining):
                    rng.shuffle(remaining)
                    pos = 0
                g = remaining[pos]
                if g in tried:
                    pos += 1
                    continue
                tried[g] = measure({**current, g: lows[g]})
                if tried[g] > thr:
                    chosen = g
                    break
                pos += 1
            if chosen is None:
                chosen = max(tried, key=lambda name: tried[name])  # the next best
            pos = remaining.index(chosen)
            remaining.remove(chosen)
            current[chosen] = lows[chosen]
            history.append(Demotion(chosen, tried[chosen]))
            bar.update()
    keep = 0
    for k in range(len(history), 0, -1):
        if history[k - 1].score >= target:
            keep = k
            break
    demoted = {d.group for d in history[:keep]}
    assignment = {g: lows[g] if g in demoted else highs[g] for g in groups}
    promotions = [g for g in groups if g not in demoted and highs[g] != lows[g]]
    score = history[keep - 1].score if keep else acc_high
    return DemotionResult(promotions, assignment, score, history, acc_high, acc_low, count)
