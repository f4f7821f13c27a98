"""``choose_mixed_precision``: AIMET's AMP on ONNX models, plus phase 3 and a demotion search.

Flow (AIMET's, see ``shared/reference/aimet-amp-api.txt``):

1. groups and per-group candidates (filtered by the target's supported kernels);
2. FP32 score, and each candidate applied to every group: the best is the *baseline*, the cheapest
   the *lowest*; the target is ``FP32 - allowed_accuracy_drop`` (early exits when the baseline
   already misses it or the lowest already meets it);
3. phase 1 (sensitivity, through an executor: the user's metric per (group, candidate), or with
   ``phase1="proxy"`` the output SQNR on a few samples, ranked per BitOps saved), phase 2 (pareto
   search; after a proxy, each step that stops it is checked with the metric, ``blockers``), phase 3
   (converts, in batches); or, with ``algorithm="demotion"``, the demotion search from all-high;
4. the chosen assignment lowered by the real pipeline (``insert-converts`` included) and scored
   again on that model, in onnxruntime's default session (the reported score: what users run;
   a miss steps back along the curve) and with exact QDQ semantics; the two diverging, or the
   simulation diverging from the real model, is a loud warning (``qpasses.amp.verify``).

Scores come from the one-session simulation where it is exact (int candidates; pruned per-layout
sessions where an evaluation is dear) and from rebuilt QDQ models otherwise. Every score, proxy
ones included, is cached in ``results_dir/.cache``, except step 4's, measured on every run; every
score is checked (a finite number; ``evaluators.check_score``).
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import onnx

import graph_ir
from graph_ir import Graph
from qpasses.amp.bitops import MacTable, mac_table
from qpasses.amp.blockers import DEFAULT_MAX_REPAIRS, BlockerCheck, phase2_with_blocker_checks
from qpasses.amp.cache import AmpCache, fingerprint
from qpasses.amp.candidates import (
    Assignment,
    Candidate,
    OpKernel,
    collapse_unweighted,
    filter_candidates,
    parse_candidates,
    signature,
)
from qpasses.amp.convert_reduction import Phase3Result, conversions, reduce_converts
from qpasses.amp.demotion import demotion_search
from qpasses.amp.errors import AmpError, AmpWarning
from qpasses.amp.evaluation import EvalFn, callback_identity
from qpasses.amp.evaluators import ModelScorer, Phase, Scorer, ScorerSpec, ScorerStats, describe
from qpasses.amp.executors import Executor, Task, make_executor, progress_bar
from qpasses.amp.groups import GroupPartition, find_groups
from qpasses.amp.overrides import precision_overrides, quantize_assignment
from qpasses.amp.pareto import ParetoPoint, forward_steps, reverse_steps, run_phase2
from qpasses.amp.proxy import DEFAULT_SAMPLES, sample_feeds
from qpasses.amp.results import AmpResult, PhaseStats, write_results
from qpasses.amp.search import ALGORITHMS
from qpasses.amp.sensitivity import make_entry, phase1_tasks, sort_accuracy_list, with_group
from qpasses.amp.simulation import unsupported_reason
from qpasses.amp.statistics import CalibrationTables, calibrate_once
from qpasses.amp.verify import PointKind, VerifiedPoint, divergence_tolerance, fallback_messages, verification_warnings
from qpasses.core.analyses import Shapes
from qpasses.core.context import PassContext
from qpasses.core.pass_manager import PassManager
from qpasses.core.pipeline import build_passes
from qpasses.data.sources import CalibrationData
from qpasses.passes import default_registry
from qpasses.quant.config import QuantConfig
from qpasses.quant.plan import build_plan
from qpasses.quantize_pipeline import QuantizeOptions, build_quantize_pipeline
from qpasses.targets import resolve_target

ALL_ALGORITHMS = (*ALGORITHMS, "demotion")
PHASE1_MODES = ("auto", "exhaustive", "proxy")
AUTO_PROXY_MIN_TASKS = 24
"""``phase1="auto"`` uses the proxy from this many phase-1 evaluations on (and only with the simulation)."""


def phase1_mode(requested: str, tasks: int, simulated: bool) -> str:
    """``exhaustive`` or ``proxy`` for a ``phase1`` option (``auto``: the proxy for many tasks, when simulated)."""
    if requested == "auto":
        return "proxy" if simulated and tasks >= AUTO_PROXY_MIN_TASKS else "exhaustive"
    return requested


def prepare_graph(model: Any, *, fold_batchnorm: bool = True, cle: bool = False) -> Graph:
    """The graph AMP searches on: the default pipeline's structural stage (inline-functions, fold-batchnorm,
    cle), exactly what ``quantize_model`` runs first, done once."""
    graph = model.copy() if isinstance(model, Graph) else graph_ir.load(model)
    flow = build_quantize_pipeline(QuantConfig(), QuantizeOptions(fold_batchnorm=fold_batchnorm, cle=cle))
    PassManager(build_passes(flow.structural, default_registry()), verify="checker").run(graph, PassContext())
    return graph


def _op_kernels(graph: Graph, partition: GroupPartition) -> dict[str, list[OpKernel]]:
    ops = {op.name: op for op in graph.ops}
    out: dict[str, list[OpKernel]] = {}
    for group in partition:
        kernels = []
        for name in group.ops:
            op = ops[name]
            inputs = set(op.inputs)
            kernels.append(OpKernel(op.op_type, bool(inputs & set(group.weights)), bool(inputs & set(group.biases))))
        out[group.name] = kernels
    return out


def _nearest(available: Sequence[Candidate], wanted: Candidate) -> Candidate:
    """``wanted`` if the group supports it, else its dearest candidate not above it, else its cheapest."""
    if wanted in available:
        return wanted
    below = [c for c in available if c.sort_key <= wanted.sort_key]
    return below[-1] if below else available[0]


class _Run:
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


def choose_mixed_precision(
    model: str | Path | onnx.ModelProto | Graph,
    calibration_data: Any,
    candidates: Sequence[Any] | str,
    eval_callback_for_phase1: EvalFn | None,
    eval_callback_for_phase2: EvalFn,
    allowed_accuracy_drop: float | None,
    results_dir: str | Path,
    clean_start: bool = True,
    *,
    config: QuantConfig | dict[str, Any] | None = None,
    target: Any = None,
    use_all_amp_candidates: bool = False,
    phase2_reverse: bool = False,
    algorithm: str = "binary",
    reduce_converts: bool = True,
    max_phase3_bitops_increase: float = 0.0,
    executor: str | Executor = "local",
    workers: int | None = None,
    ray_address: str | None = None,
    simulate: bool = True,
    fold_batchnorm: bool = True,
    cle: bool = False,
    bias_correction: bool = True,
    batch_size: int = 16,
    progress: bool = True,
    demotion_threshold: float = 0.5,
    demotion_seed: int = 1,
    baseline_rule: str = "highest",
    phase1: str = "auto",
    proxy_samples: int = DEFAULT_SAMPLES,
    max_proxy_repairs: int = DEFAULT_MAX_REPAIRS,
    prune_sessions: bool | None = None,
) -> AmpResult:
    """Choose a precision per quantizer group so the model stays within ``allowed_accuracy_drop`` of FP32.

    ``candidates``: ``[((8, "int"), (8, "int")), ((16, "int"), (8, "int")), ...]`` or ``"8/8,16/8,16/16"``.
    Callbacks take an onnxruntime session (or the simulation's look-alike) and return a score,
    higher is better; phase 1 falls back to the phase-2 callback. ``allowed_accuracy_drop=None``
    scores the full pareto curve (the chosen point is its cheapest). ``algorithm``: ``binary``,
    ``interpolation``, ``brute-force`` (phase-2 searches) or ``demotion``. ``executor``: ``local``,
    ``process`` or ``ray`` (``ray_address`` connects to a cluster, else a local one starts).
    ``baseline_rule``: phase 1 holds the other groups at the ``highest`` candidate, or (AIMET) at the
    candidate scoring ``best`` when applied everywhere.

    ``phase1``: ``exhaustive`` scores every (group, lower candidate) with the phase-1 callback (AIMET);
    ``proxy`` ranks them by the output SQNR against the baseline on ``proxy_samples`` calibration samples
    in the simulation (no callback call), then checks with the phase-2 callback each step that stops
    phase 2, moving up to ``max_proxy_repairs`` individually sensitive ones to the end of the list
    (``qpasses.amp.blockers``); ``auto`` (default) is the proxy from ``AUTO_PROXY_MIN_TASKS`` phase-1
    evaluations on when the simulation scores, else exhaustive. ``prune_sessions``: per-layout pruned
    simulation sessions (None: where an evaluation costs several session builds; see ``evaluators``).
    """
    wall = time.perf_counter()
    if algorithm not in ALL_ALGORITHMS:
        raise AmpError(f"unknown algorithm {algorithm!r} (expected one of {', '.join(ALL_ALGORITHMS)})")
    if allowed_accuracy_drop is not None and not (math.isfinite(allowed_accuracy_drop) and allowed_accuracy_drop >= 0):
        raise AmpError(f"allowed_accuracy_drop must be a non-negative number or None, got {allowed_accuracy_drop!r}")
    if baseline_rule not in ("highest", "best"):
        raise AmpError(f"baseline_rule must be 'highest' or 'best', got {baseline_rule!r}")
    if phase1 not in PHASE1_MODES:
        raise AmpError(f"phase1 must be one of {', '.join(PHASE1_MODES)}, got {phase1!r}")
    if isinstance(proxy_samples, bool) or not isinstance(proxy_samples, int) or proxy_samples < 1:
        raise AmpError(f"proxy_samples must be a positive integer, got {proxy_samples!r}")
    if isinstance(max_proxy_repairs, bool) or not isinstance(max_proxy_repairs, int) or max_proxy_repairs < 0:
        raise AmpError(f"max_proxy_repairs must be a non-negative integer, got {max_proxy_repairs!r}")
    if algorithm == "demotion" and allowed_accuracy_drop is None:
        raise AmpError("the demotion search needs a target: give allowed_accuracy_drop")
    if not callable(eval_callback_for_phase2):
        raise AmpError("eval_callback_for_phase2 must be a callable taking a session and returning a score")
    cands = parse_candidates(candidates)
    if isinstance(config, dict):
        config = QuantConfig.from_dict(config)
    config = config or QuantConfig()
    registry = default_registry()
    target_desc = resolve_target(target, registry)
    if calibration_data is None:
        raise AmpError("AMP needs calibration data (activation encodings are calibrated per candidate)")
    pool = make_executor(executor, workers=workers, address=ray_address)

    graph = prepare_graph(model, fold_batchnorm=fold_batchnorm, cle=cle)
    partition = find_groups(graph)
    if not partition.groups:
        raise AmpError("the model has no quantizable ops: nothing for AMP to choose")
    macs = mac_table(graph, partition)
    group_cands = collapse_unweighted(
        filter_candidates(
            _op_kernels(graph, partition), cands, target_desc, use_all=use_all_amp_candidates, bias_bw=config.bias_bw
        ),
        {g.name for g in partition if g.weights},
    )
    feeds = [dict(f) for f in CalibrationData.from_source(calibration_data, graph, batch_size=batch_size)]
    callbacks = {"phase1": eval_callback_for_phase1 or eval_callback_for_phase2, "phase2": eval_callback_for_phase2}
    stamp = fingerprint(
        graph.to_onnx().SerializeToString(),
        candidates=[str(c) for c in cands],
        config=asdict(config),
        target=getattr(target_desc, "name", None),
        use_all_amp_candidates=use_all_amp_candidates,
        bias_correction=bias_correction,
        simulate=simulate,
        groups=partition.names,
        eval_callbacks={k: callback_identity(fn) for k, fn in callbacks.items()},
    )
    cache = AmpCache(results_dir, stamp, clean_start)
    run = _Run(
        graph,
        partition,
        macs,
        group_cands,
        feeds,
        config,
        target_desc,
        callbacks,
        cache,
        simulate=simulate,
        bias_correction=bias_correction,
        batch_size=batch_size,
        progress=progress,
        prune=prune_sessions,
    )
    run.messages += cache.messages
    if run.sim_reason is not None:
        run.messages.append(f"scoring with rebuilt QDQ models: {run.sim_reason}")
    if macs.unknown:
        run.messages.append(f"BitOps: unknown shapes, counted 0 MACs for {', '.join(macs.unknown[:5])}")

    # Reference points: FP32, every candidate on every group, the lowest assignment.
    start = time.perf_counter()
    uniform: dict[str, tuple[Candidate, dict[str, Candidate], float]] = {}
    with progress_bar(len(cands) + 2, progress, "AMP reference") as bar:
        bar.set_postfix_str("FP32")
        fp32 = run.score_model(run.model_bytes, "fp32|phase2", "reference", "the FP32 model", finite=False)
        bar.update()
        for c in cands:
            bar.set_postfix_str(f"all {c}")
            assignment = uniform_assignment(partition, group_cands, c)
            uniform[str(c)] = (c, assignment, run.score(assignment, "phase2", "reference"))
            bar.update()
        bar.set_postfix_str("lowest")
        lowest = {g: group_cands[g][0] for g in partition.names}
        lowest_score = run.score(lowest, "phase2", "reference")
        bar.update()
    if baseline_rule == "best":  # AIMET: the candidate scoring best on every group
        baseline_cand, baseline, baseline_score = max(uniform.values(), key=lambda u: (u[2], u[0].sort_key))
    else:  # the issue's: everything at the highest candidate
        baseline_cand, baseline, baseline_score = uniform[str(cands[-1])]
    reference = fp32 if math.isfinite(fp32) else baseline_score
    if not math.isfinite(fp32):
        run.messages.append(f"FP32 score is {fp32}: the allowed drop is measured from the baseline instead")
    goal = reference - allowed_accuracy_drop if allowed_accuracy_drop is not None else -math.inf
    run.phase("reference").seconds += time.perf_counter() - start

    phase1_entries, points, phase3, demotion = [], [], None, None
    mode, checks = None, []
    chosen: dict[str, Candidate] = dict(baseline)
    if algorithm == "demotion":
        start = time.perf_counter()
        high = {g: group_cands[g][-1] for g in partition.names}
        demotion = demotion_search(
            partition.names,
            high,
            lowest,
            lambda a: run.score(a, "phase2", "demotion"),
            goal,
            m=demotion_threshold,
            seed=demotion_seed,
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
    elif allowed_accuracy_drop is not None and reference - baseline_score > allowed_accuracy_drop:
        run.messages.append(
            f"the best candidate {baseline_cand} scores {baseline_score:.4f}, already more than "
            f"{allowed_accuracy_drop} below {reference:.4f}: keeping every group at it"
        )
    elif allowed_accuracy_drop is not None and lowest_score >= goal:
        chosen = dict(lowest)
        run.messages.append(
            f"the lowest candidates already score {lowest_score:.4f} >= {goal:.4f}: no sensitivity search needed"
        )
    else:
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

    if reduce_converts and algorithm != "demotion" and math.isfinite(goal) and chosen != baseline:
        start = time.perf_counter()
        current = run.score(chosen, "phase2", "phase3")
        phase3 = reduce_converts_step(run, chosen, current, goal, max_phase3_bitops_increase)
        chosen = dict(phase3.assignment)
        run.phase("phase3").seconds += time.perf_counter() - start

    # The real model of the chosen point, scored as saved: in onnxruntime's default session (what users run:
    # the target and the fallback follow it) and with exact QDQ semantics, beside its simulated score. When the
    # runtime score misses the target, step back along the curve (cheapest first), then to the baseline.
    start = time.perf_counter()
    tolerance = divergence_tolerance(reference)
    base_bits = macs.bitops(baseline)
    fallbacks = sorted(
        (p for p in points if p.score >= goal and p.assignment not in (chosen, baseline)), key=lambda p: p.bitops
    )
    todo: list[tuple[str, PointKind, dict[str, Candidate]]] = [("the chosen point", "chosen", chosen)]
    todo += [(f"pareto point {p.index}", "pareto", p.assignment) for p in fallbacks]
    todo.append((f"the baseline ({baseline_cand} on every group)", "baseline", baseline))
    unique: dict[str, tuple[str, PointKind, dict[str, Candidate]]] = {}
    for item in todo:  # the chosen point may be the baseline, or equal a pareto point
        unique.setdefault(signature(item[2]), item)
    verified: list[VerifiedPoint] = []
    quantized = None
    with progress_bar(len(unique), progress, "AMP verify", unit="point") as bar:
        for label, kind, assignment in unique.values():
            quantized = quantize_assignment(
                graph,
                partition,
                assignment,
                feeds,
                config,
                target=target_desc,
                bias_correction=bias_correction,
                batch_size=batch_size,
            )
            blob = quantized.model.SerializeToString()
            what = f"{label}'s QDQ model ({describe(assignment)})"  # measured every run: never from the cache
            runtime = run.score_model(blob, None, "verify", f"{what} in the default session")
            exact = run.score_model(blob, None, "verify", f"{what} with exact QDQ semantics", exact=True)
            simulated = run.score(assignment, "phase2", "verify")
            bits = macs.bitops(assignment)
            relative = bits / base_bits if base_bits else math.nan
            verified.append(
                VerifiedPoint(label, kind, dict(assignment), bits, relative, simulated, runtime, exact, runtime >= goal)
            )
            bar.update()
            if runtime >= goal:
                break
    final = verified[-1]
    chosen = dict(final.assignment)
    run.messages += fallback_messages(verified, goal, tolerance)
    reference_name = "FP32 score" if math.isfinite(fp32) else "baseline score"
    warns = verification_warnings(
        verified,
        reference=reference,
        reference_name=reference_name,
        tolerance=tolerance,
        simulated=run.sim_reason is None,
        saved_model=str(Path(results_dir) / "model.qdq.onnx"),
    )
    for text in warns:
        run.messages.append(text)
        warnings.warn(text, AmpWarning, stacklevel=2)
    run.phase("verify").seconds += time.perf_counter() - start
    run.phase("total").seconds = time.perf_counter() - wall

    result = AmpResult(
        partition=partition,
        candidates=group_cands,
        fp32_score=fp32,
        baseline=baseline_cand,
        baseline_score=baseline_score,
        uniform_scores={k: v[2] for k, v in uniform.items()},
        target=goal,
        assignment=chosen,
        score=final.runtime_score,
        bitops=macs.bitops(chosen),
        baseline_bitops=base_bits,
        bitops_per_group=macs.per_group(chosen),
        phase1=phase1_entries,
        pareto=points,
        phase3=phase3,
        demotion=demotion,
        conversions=len(conversions(partition, chosen)),
        quantized=quantized,
        simulated=run.sim_reason is None,
        messages=run.messages,
        stats=run.stats,
        phase1_mode=mode,
        proxy_checks=checks,
        simulated_score=final.simulated_score,
        runtime_score=final.runtime_score,
        exact_score=final.exact_score,
        divergence_tolerance=tolerance,
        verification=verified,
        warnings=warns,
    )
    write_results(result, results_dir, precision_overrides(partition, chosen))
    return result


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


def reduce_converts_step(
    run: _Run, chosen: Assignment, current: float, goal: float, max_increase: float
) -> Phase3Result:
    """Phase 3 on the run's scorer (kept apart so the flow above reads as the phases)."""
    return reduce_converts(
        run.partition,
        chosen,
        run.group_candidates,
        run.macs,
        lambda a: run.score(a, "phase2", "phase3"),
        goal,
        current_score=current,
        max_bitops_increase=max_increase,
        progress=run.progress,
    )


def uniform_assignment(
    partition: GroupPartition, group_candidates: dict[str, list[Candidate]], candidate: Candidate
) -> dict[str, Candidate]:
    """Every group at ``candidate`` (or its nearest supported one)."""
    return {g: _nearest(group_candidates[g], candidate) for g in partition.names}
