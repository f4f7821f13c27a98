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

The steps live in their own modules: ``preparation`` (graph, groups, candidates, the ``AmpRun`` of
``run_state``), ``reference_points``, ``sensitivity_phase`` (phase 1), ``selection`` (phase 2 or the
demotion search), ``convert_reduction`` (phase 3), ``final_check`` (step 4); this one runs them.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import onnx

from graph_ir import Graph
from qpasses.amp.blockers import DEFAULT_MAX_REPAIRS
from qpasses.amp.candidates import Assignment, parse_candidates
from qpasses.amp.convert_reduction import Phase3Result, conversions, reduce_converts
from qpasses.amp.errors import AmpError, AmpWarning
from qpasses.amp.evaluation import EvalFn
from qpasses.amp.executors import Executor, make_executor
from qpasses.amp.final_check import final_check
from qpasses.amp.overrides import precision_overrides
from qpasses.amp.preparation import start_run
from qpasses.amp.proxy import DEFAULT_SAMPLES
from qpasses.amp.reference_points import reference_points
from qpasses.amp.results import AmpResult, write_results
from qpasses.amp.run_state import AmpRun
from qpasses.amp.search import ALGORITHMS
from qpasses.amp.selection import Selection, demotion_phase, pareto_phase
from qpasses.amp.sensitivity_phase import PHASE1_MODES, sensitivity_phase
from qpasses.passes import default_registry
from qpasses.quant.config import QuantConfig
from qpasses.quantize_pipeline import default_cle
from qpasses.targets import resolve_target

ALL_ALGORITHMS = (*ALGORITHMS, "demotion")


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
    cle: bool | None = None,
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
    ``cle``: as ``quantize_once``'s (None: on where the target quantizes weights per tensor).
    """
    wall = time.perf_counter()
    _check_arguments(
        algorithm,
        allowed_accuracy_drop,
        baseline_rule,
        phase1,
        proxy_samples,
        max_proxy_repairs,
        eval_callback_for_phase2,
    )
    cands = parse_candidates(candidates)
    if isinstance(config, dict):
        config = QuantConfig.from_dict(config)
    config = config or QuantConfig()
    registry = default_registry()
    target_desc = resolve_target(target, registry)
    cle = default_cle(target_desc) if cle is None else cle
    if calibration_data is None:
        raise AmpError("AMP needs calibration data (activation encodings are calibrated per candidate)")
    pool = make_executor(executor, workers=workers, address=ray_address)
    run = start_run(
        model,
        calibration_data,
        cands,
        config,
        target_desc,
        eval_callback_for_phase1,
        eval_callback_for_phase2,
        results_dir,
        clean_start,
        use_all_amp_candidates=use_all_amp_candidates,
        simulate=simulate,
        fold_batchnorm=fold_batchnorm,
        cle=cle,
        bias_correction=bias_correction,
        batch_size=batch_size,
        progress=progress,
        prune_sessions=prune_sessions,
    )
    refs = reference_points(run, cands, baseline_rule, allowed_accuracy_drop, progress)

    mode = None
    selection = Selection(dict(refs.baseline))
    if algorithm == "demotion":
        selection = demotion_phase(run, refs, threshold=demotion_threshold, seed=demotion_seed, progress=progress)
    elif allowed_accuracy_drop is not None and refs.reference - refs.baseline_score > allowed_accuracy_drop:
        run.messages.append(
            f"the best candidate {refs.baseline_cand} scores {refs.baseline_score:.4f}, already more than "
            f"{allowed_accuracy_drop} below {refs.reference:.4f}: keeping every group at it"
        )
    elif allowed_accuracy_drop is not None and refs.lowest_score >= refs.goal:
        selection = Selection(dict(refs.lowest))
        run.messages.append(
            f"the lowest candidates already score {refs.lowest_score:.4f} >= {refs.goal:.4f}: "
            "no sensitivity search needed"
        )
    else:
        phase1_entries, mode = sensitivity_phase(run, refs.baseline, phase1, proxy_samples, pool)
        selection = pareto_phase(
            run,
            refs,
            phase1_entries,
            mode,
            allowed_accuracy_drop=allowed_accuracy_drop,
            algorithm=algorithm,
            phase2_reverse=phase2_reverse,
            max_proxy_repairs=max_proxy_repairs,
            progress=progress,
        )
    chosen, goal, phase3 = selection.chosen, refs.goal, None

    if reduce_converts and algorithm != "demotion" and math.isfinite(goal) and chosen != refs.baseline:
        start = time.perf_counter()
        current = run.score(chosen, "phase2", "phase3")
        phase3 = reduce_converts_step(run, chosen, current, goal, max_phase3_bitops_increase)
        chosen = dict(phase3.assignment)
        run.phase("phase3").seconds += time.perf_counter() - start

    check = final_check(run, refs, chosen, selection.points, results_dir)
    final = check.final
    chosen = dict(final.assignment)
    for text in check.warnings:
        run.messages.append(text)
        warnings.warn(text, AmpWarning, stacklevel=2)
    run.phase("total").seconds = time.perf_counter() - wall

    partition, macs = run.partition, run.macs
    result = AmpResult(
        partition=partition,
        candidates=run.group_candidates,
        fp32_score=refs.fp32,
        baseline=refs.baseline_cand,
        baseline_score=refs.baseline_score,
        uniform_scores={k: v[2] for k, v in refs.uniform.items()},
        target=goal,
        assignment=chosen,
        score=final.runtime_score,
        bitops=macs.bitops(chosen),
        baseline_bitops=macs.bitops(refs.baseline),
        bitops_per_group=macs.per_group(chosen),
        phase1=selection.phase1,
        pareto=selection.points,
        phase3=phase3,
        demotion=selection.demotion,
        conversions=len(conversions(partition, chosen)),
        quantized=check.quantized,
        simulated=run.sim_reason is None,
        messages=run.messages,
        stats=run.stats,
        phase1_mode=mode,
        proxy_checks=selection.checks,
        simulated_score=final.simulated_score,
        runtime_score=final.runtime_score,
        exact_score=final.exact_score,
        divergence_tolerance=check.tolerance,
        verification=check.verified,
        warnings=check.warnings,
    )
    write_results(result, results_dir, precision_overrides(partition, chosen))
    return result


def _check_arguments(
    algorithm: str,
    allowed_accuracy_drop: float | None,
    baseline_rule: str,
    phase1: str,
    proxy_samples: int,
    max_proxy_repairs: int,
    eval_callback_for_phase2: EvalFn,
) -> None:
    """The option errors ``choose_mixed_precision`` raises before any work."""
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


def reduce_converts_step(
    run: AmpRun, chosen: Assignment, current: float, goal: float, max_increase: float
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
