"""What an AMP run returns and writes: the curve, the chosen point, its model, and how long it took.

``results_dir`` gets ``pareto.json`` (one entry per scored point: BitOps, score, precision of
each group), ``pareto.csv``, ``pareto.png`` (when matplotlib is installed: ``qpasses[plot]``),
``phase1.json`` (the sorted sensitivity list), ``groups.json``, ``amp_info.json`` (scores, the
final check's simulated / runtime-session / exact-QDQ scores of each point it lowered, warnings,
BitOps per group, conversions, timings), and for the chosen point ``model.qdq.onnx``,
``encodings.json``, ``overrides.json`` (the precision-only file to re-run ``qpasses quantize``
with) and ``report.txt``.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qpasses.amp.blockers import BlockerCheck
from qpasses.amp.candidates import Candidate
from qpasses.amp.convert_reduction import Phase3Result
from qpasses.amp.demotion import DemotionResult
from qpasses.amp.evaluators import ScorerStats
from qpasses.amp.groups import GroupPartition
from qpasses.amp.pareto import ParetoPoint
from qpasses.amp.sensitivity import SensitivityEntry
from qpasses.amp.verify import VerifiedPoint
from qpasses.quantize import QuantizeResult


@dataclass
class PhaseStats:
    """Evaluations (user callback calls) and sessions of one phase (cache hits cost neither), and its wall time."""

    evaluations: int = 0
    cache_hits: int = 0
    session_builds: int = 0
    seconds: float = 0.0
    proxy_runs: int = 0
    """Phase-1 proxy passes (simulation runs on a few samples; not calls of the user's callback)."""

    def add(self, stats: ScorerStats) -> None:
        self.evaluations += stats.evaluations
        self.session_builds += stats.session_builds
        self.proxy_runs += stats.proxy_runs


@dataclass
class AmpResult:
    """The outcome of ``choose_mixed_precision``."""

    partition: GroupPartition
    candidates: dict[str, list[Candidate]]
    fp32_score: float
    baseline: Candidate
    baseline_score: float
    uniform_scores: dict[str, float]
    target: float
    assignment: dict[str, Candidate]
    score: float
    """The chosen model's phase-2 score, measured on the real QDQ model in onnxruntime's default session
    (``runtime_score``: what users run)."""
    bitops: float
    baseline_bitops: float
    bitops_per_group: dict[str, float]
    phase1: list[SensitivityEntry] = field(default_factory=list)
    pareto: list[ParetoPoint] = field(default_factory=list)
    phase3: Phase3Result | None = None
    demotion: DemotionResult | None = None
    conversions: int = 0
    quantized: QuantizeResult | None = None
    simulated: bool = True
    messages: list[str] = field(default_factory=list)
    stats: dict[str, PhaseStats] = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)
    simulated_score: float = math.nan
    """The saved point's score in the search (phase 2/3: the simulation, or rebuilt models without it)."""
    runtime_score: float = math.nan
    """The saved model in onnxruntime's default session (fused integer kernels: CPU dependent); = ``score``."""
    exact_score: float = math.nan
    """The saved model with exact QDQ semantics (``qpasses.core.verification.exact_session``)."""
    divergence_tolerance: float = math.nan
    """How far two of those scores may differ before it is a warning (0.5% of |FP32 score|)."""
    verification: list[VerifiedPoint] = field(default_factory=list)
    """Every point lowered and scored in the final check: the chosen one first, the saved one last."""
    warnings: list[str] = field(default_factory=list)
    """The loud subset of ``messages`` (also raised as ``AmpWarning``; the CLI prints ``warning: ...``)."""
    phase1_mode: str | None = None
    """``exhaustive`` or ``proxy``; None when phase 1 did not run (early exit, demotion)."""
    proxy_checks: list[BlockerCheck] = field(default_factory=list)
    """With the proxy: each step that stopped phase 2, scored alone with the metric (``qpasses.amp.blockers``)."""

    @property
    def promotions(self) -> list[str] | None:
        """Demotion search: the groups kept at the high candidate."""
        return self.demotion.promotions if self.demotion is not None else None

    @property
    def model(self) -> Any:
        return self.quantized.model if self.quantized is not None else None

    def info(self) -> dict[str, Any]:
        return {
            "fp32_score": self.fp32_score,
            "baseline_candidate": str(self.baseline),
            "baseline_score": self.baseline_score,
            "uniform_scores": self.uniform_scores,
            "target": self.target,
            "final_score": self.score,
            "simulated_score": self.simulated_score,
            "runtime_score": self.runtime_score,
            "exact_score": self.exact_score,
            "divergence_tolerance": self.divergence_tolerance,
            "verification": [v.to_dict() for v in self.verification],
            "bitops": self.bitops,
            "baseline_bitops": self.baseline_bitops,
            "relative_bitops": self.bitops / self.baseline_bitops if self.baseline_bitops else math.nan,
            "bitops_per_group": self.bitops_per_group,
            "conversions": self.conversions,
            "precisions": {g: str(c) for g, c in self.assignment.items()},
            "candidates": {g: [str(c) for c in cs] for g, cs in self.candidates.items()},
            "phase3": None
            if self.phase3 is None
            else {
                "converts_before": self.phase3.converts_before,
                "converts_after": self.phase3.converts_after,
                "flips": [f.to_dict() for f in self.phase3.flips],
            },
            "demotion": None if self.demotion is None else self.demotion.to_dict(),
            "simulated": self.simulated,
            "phase1_mode": self.phase1_mode,
            "proxy_checks": [c.to_dict() for c in self.proxy_checks],
            "messages": self.messages,
            "warnings": self.warnings,
            "stats": {k: vars(v) for k, v in self.stats.items()},
        }

    def summary(self) -> str:
        rel = self.bitops / self.baseline_bitops if self.baseline_bitops else math.nan
        lowered = sum(1 for c in self.assignment.values() if c != self.baseline)
        evals = sum(s.evaluations for s in self.stats.values())
        builds = sum(s.session_builds for s in self.stats.values())
        proxies = sum(s.proxy_runs for s in self.stats.values())
        search = "simulated" if self.simulated else "search"
        return (
            f"AMP: score {self.score:.4f} in onnxruntime's default session (exact QDQ {self.exact_score:.4f}, "
            f"{search} {self.simulated_score:.4f}; FP32 {self.fp32_score:.4f}, baseline {self.baseline} "
            f"{self.baseline_score:.4f}, target {self.target:.4f}); {lowered}/{len(self.assignment)} groups below "
            f"baseline; BitOps {self.bitops:.4g} = {rel:.3f} x baseline; {self.conversions} conversions; "
            f"{evals} evaluations"
            + (f" (phase 1 by proxy: {proxies} proxy runs)" if proxies else "")
            + f", {builds} session builds"
        )


def pareto_csv(points: list[ParetoPoint], groups: list[str]) -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["index", "bitops", "relative_bitops", "score", "changed_group", "candidate", *groups])
    for p in points:
        writer.writerow(
            [
                p.index,
                p.bitops,
                p.relative_bitops,
                p.score,
                p.group or "",
                "" if p.candidate is None else str(p.candidate),
                *(str(p.assignment[g]) for g in groups),
            ]
        )
    return out.getvalue()


def plot_pareto(points: list[ParetoPoint], path: Path, *, target: float, chosen: float | None) -> str | None:
    """Write the accuracy-vs-BitOps PNG; returns why not when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "pareto.png skipped: matplotlib is not installed (pip install 'qpasses[plot]')"
    ordered = sorted(points, key=lambda p: p.bitops)
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    ax.plot([p.relative_bitops for p in ordered], [p.score for p in ordered], "o-", label="pareto points")
    if math.isfinite(target):
        ax.axhline(target, color="tab:red", linestyle="--", label=f"target {target:.4f}")
    if chosen is not None:
        ax.axvline(chosen, color="tab:green", linestyle=":", label="chosen")
    ax.set_xlabel("BitOps relative to the baseline")
    ax.set_ylabel("score")
    ax.set_title("AMP: score vs BitOps")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return None


def _write(path: Path, text: str) -> Path:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def write_results(result: AmpResult, results_dir: str | os.PathLike[str], overrides: dict[str, Any]) -> list[Path]:
    """Every output file of a run (see the module docstring)."""
    out = Path(results_dir)
    out.mkdir(parents=True, exist_ok=True)
    groups = result.partition.names
    files = [
        _write(out / "pareto.json", json.dumps([p.to_dict() for p in result.pareto], indent=1) + "\n"),
        _write(out / "pareto.csv", pareto_csv(result.pareto, groups)),
        _write(out / "phase1.json", json.dumps([e.to_dict() for e in result.phase1], indent=1) + "\n"),
        _write(out / "groups.json", json.dumps([g.to_dict() for g in result.partition], indent=1) + "\n"),
        _write(out / "overrides.json", json.dumps(overrides, indent=1) + "\n"),
    ]
    if result.pareto:
        rel = result.bitops / result.baseline_bitops if result.baseline_bitops else None
        skipped = plot_pareto(result.pareto, out / "pareto.png", target=result.target, chosen=rel)
        if skipped:
            result.messages.append(skipped)
        else:
            files.append(out / "pareto.png")
    if result.quantized is not None:
        result.quantized.save(out)
        files += [out / "model.qdq.onnx", out / "encodings.json", out / "report.txt"]
    files.append(_write(out / "amp_info.json", json.dumps(result.info(), indent=1, default=str) + "\n"))
    result.files = files
    return files
