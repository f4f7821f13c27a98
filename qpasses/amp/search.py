"""Phase-2 searches over a lazily evaluated pareto sequence (AIMET's three, same contracts).

``values[i]()`` evaluates point ``i`` (memoized by the caller). Forward sequences are assumed to
*fall* with ``i`` (more groups demoted); the answer is the last index still meeting ``target``.
Reverse sequences (``phase2_reverse``: start lowest, promote) are assumed to *rise*; the answer is
the first index meeting it. When no index meets the target the end the search gave up at is
returned, and the caller checks the score (AIMET then falls back to the baseline).
Binary and interpolation search trust monotonicity; brute force scans and tolerates bumps.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import numpy as np

Values = Sequence[Callable[[], float]]
Algorithm = Literal["binary", "interpolation", "brute-force"]
ALGORITHMS: tuple[str, ...] = ("binary", "interpolation", "brute-force")


def _ascending(values: Values, target: float, interpolate: bool) -> int:
    """Smallest index whose value is >= target in an ascending sequence (or an end)."""
    left, right = 0, len(values) - 1
    if target <= values[left]():
        return left
    if target >= values[right]():
        return right
    while right - left > 1:
        if interpolate:
            lo, hi = values[left](), values[right]()
            fraction = (target - lo) / (hi - lo) if hi != lo else 0.5
        else:
            fraction = 0.5
        mid = int(np.clip(left + (right - left) * fraction, left + 1, right - 1))
        value = values[mid]()
        if value < target:
            left = mid
        elif value > target:
            right = mid
        else:
            left = right = mid
    return left if values[left]() >= target else right


def _search(values: Values, target: float, reverse: bool, interpolate: bool) -> int:
    if not values:
        raise ValueError("nothing to search: the pareto sequence is empty")
    if reverse:
        return _ascending(values, target, interpolate)
    flipped = list(reversed(values))
    return len(values) - 1 - _ascending(flipped, target, interpolate)


def binary_search(values: Values, target: float, reverse: bool = False) -> int:
    return _search(values, target, reverse, interpolate=False)


def interpolation_search(values: Values, target: float, reverse: bool = False) -> int:
    """Binary search that probes where linear interpolation between the ends puts the target."""
    return _search(values, target, reverse, interpolate=True)


def brute_force_search(values: Values, target: float, reverse: bool = False) -> int:
    """Scan from the start: forward, stop before the first miss; reverse, stop at the first hit."""
    if not values:
        raise ValueError("nothing to search: the pareto sequence is empty")
    for i, value in enumerate(values):
        v = value()
        if reverse and v >= target:
            return i
        if not reverse and v < target:
            return max(i - 1, 0)
    return len(values) - 1


def full_scan(values: Values, target: float, reverse: bool = False) -> int:
    """Evaluate every point (the full curve), then answer as brute force would."""
    scores = [v() for v in values]
    return brute_force_search([_known(s) for s in scores], target, reverse)


def _known(score: float) -> Callable[[], float]:
    return lambda: score


def gallop_search(values: Values, target: float, good: int, *, brute_force: bool = False) -> int:
    """Falling sequence, ``values[good]`` known to meet ``target``: the last index meeting it after ``good``.

    Steps 1, 2, 4... past ``good`` until a miss, then bisects (``brute_force``: steps of 1, stopping at
    the first miss). About ``2 log2(d)`` evaluations for an answer ``d`` steps away, so a search that
    resumes next to where an earlier one stopped stays cheap.
    """
    last = len(values) - 1
    step = 1
    while good < last:
        probe = min(good + step, last)
        if values[probe]() < target:
            bad = probe
            break
        good = probe
        step = 1 if brute_force else step * 2
    else:
        return good
    while bad - good > 1:
        mid = (good + bad) // 2
        if values[mid]() >= target:
            good = mid
        else:
            bad = mid
    return good


SEARCHES: dict[str, Callable[[Values, float, bool], int]] = {
    "binary": binary_search,
    "interpolation": interpolation_search,
    "brute-force": brute_force_search,
}
