"""Phase 3: flip groups whose change removes Convert ops, keeping the score at or above the target.

A conversion sits on every edge where a group reads a tensor of another precision (what
``insert-converts`` lowers: int8<->int16 DQ->Q->DQ, which QNN fuses into one Convert; float->int
Q->DQ; float32<->float16 Cast). The greedy loop tries single-group flips that remove conversions
without raising BitOps by more than ``max_bitops_increase`` (default: none, so only demotions and
free flips of groups without MACs), best first (most conversions removed, then most BitOps
saved), and keeps those whose score still meets the target, tested in batches (``reduce_converts``:
one evaluation for every flip of a round that fits, halves where a batch misses). AIMET-ONNX
leaves this phase empty; AIMET-torch solves an ILP over a predicted convert cost.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from tqdm import tqdm

from qpasses.amp.bitops import MacTable
from qpasses.amp.candidates import Assignment, Candidate, signature
from qpasses.amp.groups import GroupPartition
from qpasses.quant.precision_type import FLOAT32, Precision


def conversions(partition: GroupPartition, assignment: Assignment) -> set[tuple[str, str]]:
    """(tensor, precision it is converted to): one conversion each, as the lowering shares them."""
    out: set[tuple[str, str]] = set()
    for group in partition:
        reader = assignment[group.name].act
        for tensor in group.reads:
            owner = partition.owner.get(tensor)
            source: Precision = assignment[owner].act if owner is not None else FLOAT32
            if reader.is_float and not source.is_float and reader == FLOAT32:
                continue  # an int tensor read in float32 is just its DequantizeLinear output
            if source != reader:
                out.add((tensor, str(reader)))
    return out


@dataclass
class Flip:
    group: str
    before: Candidate
    after: Candidate
    converts_removed: int
    bitops_change: float
    score: float
    accepted: bool
    batch: int = 1
    """How many flips the evaluation that decided this one applied together."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "group": self.group,
            "from": str(self.before),
            "to": str(self.after),
            "converts_removed": self.converts_removed,
            "bitops_change": self.bitops_change,
            "score": self.score,
            "accepted": self.accepted,
            "batch": self.batch,
        }


@dataclass
class Phase3Result:
    assignment: dict[str, Candidate]
    score: float | None
    converts_before: int
    converts_after: int
    flips: list[Flip] = field(default_factory=list)
    evaluations: int = 0


def reduce_converts(
    partition: GroupPartition,
    assignment: Assignment,
    group_candidates: Mapping[str, Sequence[Candidate]],
    macs: MacTable,
    score: Callable[[Assignment], float],
    target: float,
    *,
    current_score: float | None = None,
    max_bitops_increase: float = 0.0,
    max_evaluations: int | None = None,
    progress: bool = True,
) -> Phase3Result:
    """Greedy flips that remove conversions and keep ``score >= target``, tested in batches.

    Each round collects the flips that remove conversions (best first: most conversions removed, then
    most BitOps saved; at most one per group; each still removing conversions on top of the ones before
    it, within the BitOps budget) and scores them applied together: one evaluation when they all fit.
    A batch that misses is split in halves, each tested on top of what was accepted (a flip that misses
    alone is not tried again). Most flips of a CNN are free (a Sigmoid or Concat between two 8-bit
    convs back at 8 bits, or up at 16): one evaluation takes dozens of them.
    """
    current = dict(assignment)
    before = len(conversions(partition, current))
    result = Phase3Result(dict(current), current_score, before, before)
    budget = max_evaluations if max_evaluations is not None else 4 * len(partition)
    refused: set[tuple[str, Candidate]] = set()
    tried: set[str] = set()
    bar = tqdm(desc="AMP phase 3", unit="eval", file=sys.stderr, disable=not progress, leave=False)

    def fits(state: Assignment, name: str, c: Candidate, bits_start: float) -> tuple[int, float] | None:
        """(conversions removed, BitOps change) of flipping ``name`` to ``c`` on ``state``, if it qualifies."""
        trial = {**state, name: c}
        n_now, n = len(conversions(partition, state)), len(conversions(partition, trial))
        bits = macs.bitops(trial)
        if n < n_now and bits - bits_start <= max_bitops_increase * bits_start:
            return n_now - n, bits - macs.bitops(state)
        return None

    def test(flips: list[tuple[str, Candidate]]) -> bool:
        """Score ``flips`` together on ``current``; on a miss, bisect. True when any was accepted."""
        nonlocal current, budget
        bits_start = macs.bitops(current)
        state, kept = dict(current), []
        for name, c in flips:  # earlier acceptances may have made a flip pointless
            gain = fits(state, name, c, bits_start)
            if gain is not None:
                kept.append((name, c, *gain))
                state[name] = c
        if not kept or budget <= 0 or signature(state) in tried:
            return False
        tried.add(signature(state))
        value = score(state)
        budget -= 1
        result.evaluations += 1
        bar.update()
        if value >= target:
            for name, c, removed, dbits in kept:
                result.flips.append(Flip(name, current[name], c, removed, dbits, value, True, len(kept)))
            current, result.score = state, value
            return True
        if len(kept) == 1:
            name, c, removed, dbits = kept[0]
            result.flips.append(Flip(name, current[name], c, removed, dbits, value, False))
            refused.add((name, c))
            return False
        half = len(kept) // 2
        first = test([(n, c) for n, c, *_ in kept[:half]])
        second = test([(n, c) for n, c, *_ in kept[half:]])
        return first or second

    with bar:
        while budget > 0:
            bits_now = macs.bitops(current)
            options = []
            for group in partition:
                for c in group_candidates[group.name]:
                    if c == current[group.name] or (group.name, c) in refused:
                        continue
                    gain = fits(current, group.name, c, bits_now)
                    if gain is not None:
                        options.append((-gain[0], gain[1], group.name, c))
            if not options:
                break
            options.sort(key=lambda o: (o[0], o[1]))
            batch, seen = [], set()
            for _, _, name, c in options:
                if name not in seen:
                    seen.add(name)
                    batch.append((name, c))
            if not test(batch):
                break
    result.assignment = current
    result.converts_after = len(conversions(partition, current))
    return result
