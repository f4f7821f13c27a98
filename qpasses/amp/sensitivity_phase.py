"""Phase 1 of an AMP run: what each (group, lower candidate) costs, alone against the baseline.

``exhaustive`` scores every pair with the phase-1 metric (AIMET); ``proxy`` ranks them by the
output SQNR against the baseline on a few calibration samples in the simulation, per BitOps saved,
calling no metric (phase 2 then checks the steps that stop it: ``blockers``); ``auto`` is the proxy
from ``AUTO_PROXY_MIN_TASKS`` phase-1 evaluations on, when the simulation scores.
"""

from __future__ import annotations

import math
import time

from qpasses.amp.candidates import Candidate
from qpasses.amp.executors import Executor
from qpasses.amp.run_state import AmpRun
from qpasses.amp.sensitivity import SensitivityEntry, make_entry, phase1_tasks, sort_accuracy_list, with_group

PHASE1_MODES = ("auto", "exhaustive", "proxy")
AUTO_PROXY_MIN_TASKS = 24
"""``phase1="auto"`` uses the proxy from this many phase-1 evaluations on (and only with the simulation)."""


def phase1_mode(requested: str, tasks: int, simulated: bool) -> str:
    """``exhaustive`` or ``proxy`` for a ``phase1`` option (``auto``: the proxy for many tasks, when simulated)."""
    if requested == "auto":
        return "proxy" if simulated and tasks >= AUTO_PROXY_MIN_TASKS else "exhaustive"
    return requested


def sensitivity_phase(
    run: AmpRun, baseline: dict[str, Candidate], phase1: str, proxy_samples: int, pool: Executor
) -> tuple[list[SensitivityEntry], str]:
    """The phase-1 list, sorted (saved as ``phase1.json``), and the mode that made it."""
    partition, group_cands, macs, cache = run.partition, run.group_candidates, run.macs, run.cache
    start = time.perf_counter()
    tasks = phase1_tasks(partition.names, group_cands, baseline)
    mode = phase1_mode(phase1, len(tasks), run.sim_reason is None)
    if mode == "proxy":
        key = run.set_proxy(baseline, proxy_samples)
        proxies = run.run_tasks([(with_group(baseline, g, c), "proxy") for g, c in tasks], pool, "phase1", key)
        phase1_entries = sort_accuracy_list(
            [make_entry(g, c, math.nan, baseline, macs, proxy=p) for (g, c), p in zip(tasks, proxies, strict=True)],
            partition.names,
            by="proxy",
        )
        run.messages.append(
            f"phase 1: {len(tasks)} (group, candidate) pairs ranked by the proxy (output SQNR vs "
            f"the baseline on {key[5:]} calibration samples, per BitOps saved) instead of "
            f"{len(tasks)} metric calls"
        )
    else:
        scores = run.run_tasks([(with_group(baseline, g, c), "phase1") for g, c in tasks], pool, "phase1")
        phase1_entries = sort_accuracy_list(
            [make_entry(g, c, s, baseline, macs) for (g, c), s in zip(tasks, scores, strict=True)], partition.names
        )
    cache.save("phase1.json", [e.to_dict() for e in phase1_entries])
    run.phase("phase1").seconds += time.perf_counter() - start
    return phase1_entries, mode
