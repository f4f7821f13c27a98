"""One AMP run's state: the lazily built scorer, the score cache and the per-phase statistics.

Every step of ``choose_mixed_precision`` scores through an ``AmpRun``: it answers from the cache
(``results_dir/.cache``) where it can, builds the scorer (the one-session simulation, or rebuilt
QDQ models) on first need, and counts evaluations and seconds per phase for the results.
"""

from __future__ import annotations

import time
from typing import Any

from graph_ir import Graph
from qpasses.amp.bitops import MacTable
from qpasses.amp.cache import AmpCache
from qpasses.amp.candidates import Assignment, Candidate, signature
from qpasses.amp.evaluation import EvalFn
from qpasses.amp.evaluators import ModelScorer, Phase, Scorer, ScorerSpec, ScorerStats
from qpasses.amp.executors import Executor, Task
from qpasses.amp.groups import GroupPartition
from qpasses.amp.proxy import sample_feeds
from qpasses.amp.results import PhaseStats
from qpasses.amp.simulation import unsupported_reason
from qpasses.amp.statistics import CalibrationTables, calibrate_once
from qpasses.core.analyses import Shapes
from qpasses.core.context import PassContext
from qpasses.quant.config import QuantConfig
from qpasses.quant.plan import build_plan


class AmpRun:
    """One AMP run's state: the lazily built scorer, the cache and the per-phase statistics."""

    def __init__(
        self,
        graph: Graph,
        partition: GroupPartition,
        macs: MacTable,
        group_candidates: dict[str, list[Candidate]],
        feeds: list[dict[str, Any]],
        config: QuantConfig,
        target: Any,
        callbacks: dict[str, EvalFn],
        cache: AmpCache,
        *,
        simulate: bool,
        bias_correction: bool,
        batch_size: int,
        progress: bool,
        prune: bool | None = None,
    ) -> None:
        self.graph, self.partition, self.macs = graph, partition, macs
        self.group_candidates, self.feeds, self.config, self.target = group_candidates, feeds, config, target
        self.callbacks, self.cache = callbacks, cache
        self.bias_correction, self.batch_size, self.progress = bias_correction, batch_size, progress
        self.model_bytes = graph.to_onnx().SerializeToString()
        self.stats: dict[str, PhaseStats] = {}
        self.messages: list[str] = []
        has_float = any(c.is_float for cs in group_candidates.values() for c in cs)
        plan = build_plan(graph, PassContext().get(Shapes, graph))
        self.sim_reason = unsupported_reason(partition, plan, has_float) if simulate else "simulate=False"
        self._tables: CalibrationTables | None = None
        self._scorer: Scorer | None = None
        self.prune = prune
        self.proxy_feeds: list[dict[str, Any]] = []
        self.proxy_baseline: dict[str, Candidate] | None = None

    def set_proxy(self, baseline: Assignment, samples: int) -> str:
        """Phase-1 proxy on the first ``samples`` calibration samples against ``baseline``; returns the cache key."""
        dims = {
            name: (self.graph.tensors[name].shape or (None,))[0]
            for name in self.graph.inputs
            if name in self.graph.tensors
        }
        self.proxy_feeds = sample_feeds(self.feeds, samples, dims)
        self.proxy_baseline = dict(baseline)
        if self._scorer is not None:
            spec = self._scorer.spec
            spec.proxy_feeds, spec.proxy_baseline = self.proxy_feeds, self.proxy_baseline
        rows = sum(min((len(v) for v in f.values()), default=1) for f in self.proxy_feeds)
        return f"proxy{rows}"

    def phase(self, name: str) -> PhaseStats:
        return self.stats.setdefault(name, PhaseStats())

    def spec(self) -> ScorerSpec:
        simulated = self.sim_reason is None
        if simulated and self._tables is None:
            start = time.perf_counter()
            acts = {c.act.bitwidth for cs in self.group_candidates.values() for c in cs if not c.is_float}
            weights = {c.param.bitwidth for cs in self.group_candidates.values() for c in cs if not c.is_float}
            self._tables = calibrate_once(
                self.graph,
                self.feeds,
                self.config,
                act_bitwidths=sorted(acts),
                weight_bitwidths=sorted(weights),
                bias_correction=self.bias_correction,
                batch_size=self.batch_size,
                progress=self.progress,
            )
            self.phase("setup").seconds += time.perf_counter() - start
        return ScorerSpec(
            self.model_bytes,
            self.partition,
            self.config,
            self.callbacks,
            self._tables if simulated else None,
            () if simulated else self.feeds,
            self.target.to_dict() if self.target is not None else None,
            self.bias_correction,
            self.batch_size,
            proxy_feeds=self.proxy_feeds,
            proxy_baseline=self.proxy_baseline,
            prune=self.prune,
        )

    def scorer(self) -> Scorer:
        if self._scorer is None:
            self._scorer = self.spec().build()
            self.phase("setup").add(self._scorer.stats)
            self._scorer.stats = ScorerStats()
        return self._scorer

    def score(self, assignment: Assignment, phase: Phase, where: str) -> float:
        key = f"{phase}|{signature(assignment)}"
        stats = self.phase(where)
        cached = self.cache.get(key)
        if cached is not None:
            stats.cache_hits += 1
            return cached
        scorer = self.scorer()
        before = scorer.stats.snapshot()
        value = scorer.score(assignment, phase)
        stats.add(scorer.stats.since(before))
        self.cache.put(key, value)
        return value

    def score_model(
        self, model: bytes, key: str | None, where: str, what: str, *, exact: bool = False, finite: bool = True
    ) -> float:
        """A fixed model's phase-2 score: in the default (runtime) session, or with exact QDQ semantics.

        ``key`` None: measured on every run, never cached (the final verification). ``what`` names the
        model in errors; ``finite=False`` lets the score be +-inf (the FP32 reference)."""
        stats = self.phase(where)
        cached = self.cache.get(key) if key is not None else None
        if cached is not None:
            stats.cache_hits += 1
            return cached
        scorer = ModelScorer(model, exact=exact, what=what, finite=finite)
        value = scorer.score_with(self.callbacks["phase2"], where)
        stats.add(scorer.stats)
        if key is not None:
            self.cache.put(key, value)
        return value

    def run_tasks(self, tasks: list[Task], executor: Executor, where: str, key: str | None = None) -> list[float]:
        """Phase-1 style batch: cached scores answered here, the rest through the executor (cache keys:
        ``key``, default the phase, then the assignment)."""
        stats = self.phase(where)
        keys = [f"{key or phase}|{signature(a)}" for a, phase in tasks]
        values: list[float | None] = [self.cache.get(k) for k in keys]
        stats.cache_hits += sum(v is not None for v in values)
        missing = [i for i, v in enumerate(values) if v is None]
        if missing:
            results = executor.map(
                self.spec, self.scorer, [tasks[i] for i in missing], progress=self.progress, desc=f"AMP {where}"
            )
            fresh: dict[str, float] = {}
            for i, (value, worker_stats) in zip(missing, results, strict=True):
                values[i] = fresh[keys[i]] = float(value)
                stats.add(worker_stats)
            self.cache.put_many(fresh)
        return [float(v) for v in values if v is not None]
