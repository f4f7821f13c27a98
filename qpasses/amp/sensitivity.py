"""Phase 1: how much each group alone loses at each lower candidate (everything else at baseline).

The accuracy list is sorted as AIMET sorts it: score descending, then higher bit sum, then larger
BitOps reduction, then the group's position in the model. Least sensitive first: phase 2 demotes
in that order. With the proxy (``phase1="proxy"``) an entry's ``score`` is not measured (NaN): the
list is sorted by ``proxy``, the output SQNR of ``qpasses.amp.proxy``, per BitOps saved.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from qpasses.amp.bitops import MacTable
from qpasses.amp.candidates import Assignment, Candidate, effective_bits, parse_candidate


@dataclass(frozen=True)
class SensitivityEntry:
    """One phase-1 evaluation: ``group`` alone at ``candidate`` scored ``score``."""

    group: str
    candidate: Candidate
    score: float
    bitops_reduction: float
    proxy: float | None = None
    """Output SQNR (dB) of the proxy; None when phase 1 ran the metric (then ``score``; else ``score`` is NaN,
    written as null)."""

    def to_dict(self) -> dict[str, Any]:
        out = {
            "group": self.group,
            "candidate": str(self.candidate),
            "score": None if math.isnan(self.score) else self.score,
            "bitops_reduction": self.bitops_reduction,
        }
        if self.proxy is not None:
            out["proxy_db"] = self.proxy
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SensitivityEntry:
        proxy = data.get("proxy_db")
        score = data.get("score")
        return cls(
            str(data["group"]),
            parse_candidate(data["candidate"]),
            math.nan if score is None else float(score),
            float(data["bitops_reduction"]),
            None if proxy is None else float(proxy),
        )


def phase1_tasks(
    order: Sequence[str], group_candidates: Mapping[str, Sequence[Candidate]], baseline: Assignment
) -> list[tuple[str, Candidate]]:
    """(group, candidate) for every candidate cheaper than the group's baseline, in model order."""
    tasks = []
    for name in order:
        base = baseline[name]
        for c in group_candidates[name]:
            if c != base and c.sort_key < base.sort_key:
                tasks.append((name, c))
    return tasks


def with_group(baseline: Assignment, group: str, candidate: Candidate) -> dict[str, Candidate]:
    return {**baseline, group: candidate}


def make_entry(
    group: str, candidate: Candidate, score: float, baseline: Assignment, macs: MacTable, *, proxy: float | None = None
) -> SensitivityEntry:
    reduction = macs.group_bitops(group, baseline[group]) - macs.group_bitops(group, candidate)
    return SensitivityEntry(group, candidate, score, reduction, proxy)


def proxy_noise(entry: SensitivityEntry) -> float:
    """The proxy's noise-to-signal ratio (10^(-dB/10)); inf when unknown."""
    if entry.proxy is None or math.isnan(entry.proxy):
        return math.inf
    return 10.0 ** (-entry.proxy / 10.0) if entry.proxy > -math.inf else math.inf


def sort_accuracy_list(
    entries: Sequence[SensitivityEntry], order: Sequence[str], *, by: Literal["score", "proxy"] = "score"
) -> list[SensitivityEntry]:
    """The phase-1 list, least sensitive first.

    ``score`` (AIMET's order): score, bit sum, BitOps reduction (all descending), then model position.
    ``proxy``: the proxy's noise per BitOps saved, ascending (the greedy order of a knapsack in which
    each output's noise-to-signal ratios add up: cheapest noise for the most BitOps first), then the
    entries that save no BitOps (groups without MACs) by noise; ties by BitOps saved, model position.
    """
    position = {name: i for i, name in enumerate(order)}
    if by == "proxy":

        def ratio(e: SensitivityEntry) -> tuple[int, float, float, int]:
            noise = proxy_noise(e)
            if e.bitops_reduction > 0:
                return (0, noise / e.bitops_reduction, -e.bitops_reduction, position[e.group])
            return (1, noise, 0.0, position[e.group])

        return sorted(entries, key=ratio)

    def key(e: SensitivityEntry) -> tuple[float, float, float, int]:
        bits = effective_bits(e.candidate.act) + effective_bits(e.candidate.param)
        return (-math.inf if math.isnan(e.score) else e.score, bits, e.bitops_reduction, -position[e.group])

    return sorted(entries, key=key, reverse=True)
