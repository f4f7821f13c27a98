"""Everything an AMP run needs before it scores: the prepared graph, its quantizer groups, each
group's candidates (those the target runs), the calibration feeds, the cache, and the ``AmpRun``.

The graph is the default pipeline's structural stage, exactly what ``quantize_model`` runs first,
so AMP searches the graph the lowering will quantize.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import onnx

import graph_ir
from graph_ir import Graph
from qpasses.amp.bitops import mac_table
from qpasses.amp.cache import AmpCache, fingerprint
from qpasses.amp.candidates import Candidate, OpKernel, collapse_unweighted, filter_candidates
from qpasses.amp.errors import AmpError
from qpasses.amp.evaluation import EvalFn, callback_identity
from qpasses.amp.groups import GroupPartition, find_groups
from qpasses.amp.run_state import AmpRun
from qpasses.core.context import PassContext
from qpasses.data.sources import CalibrationData
from qpasses.passes import default_registry
from qpasses.quant.config import QuantConfig
from qpasses.quantize_pipeline import QuantizeOptions, build_quantize_pipeline, run_structural_stage


def prepare_graph(model: Any, *, fold_batchnorm: bool = True, cle: bool = False) -> Graph:
    """The graph AMP searches on: the default pipeline's structural stage (inline-functions, fold-batchnorm,
    cle), exactly what ``quantize_model`` runs first, done once."""
    graph = model.copy() if isinstance(model, Graph) else graph_ir.load(model)
    flow = build_quantize_pipeline(QuantConfig(), QuantizeOptions(fold_batchnorm=fold_batchnorm, cle=cle))
    run_structural_stage(graph, PassContext(), flow, default_registry(), verify="checker")
    return graph


def op_kernels(graph: Graph, partition: GroupPartition) -> dict[str, list[OpKernel]]:
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


def start_run(
    model: str | Path | onnx.ModelProto | Graph,
    calibration_data: Any,
    cands: list[Candidate],
    config: QuantConfig,
    target_desc: Any,
    eval_callback_for_phase1: EvalFn | None,
    eval_callback_for_phase2: EvalFn,
    results_dir: str | Path,
    clean_start: bool,
    *,
    use_all_amp_candidates: bool,
    simulate: bool,
    fold_batchnorm: bool,
    cle: bool,
    bias_correction: bool,
    batch_size: int,
    progress: bool,
    prune_sessions: bool | None,
) -> AmpRun:
    """The run of ``choose_mixed_precision``'s arguments: graph, groups, candidates, feeds and cache ready."""
    graph = prepare_graph(model, fold_batchnorm=fold_batchnorm, cle=cle)
    partition = find_groups(graph)
    if not partition.groups:
        raise AmpError("the model has no quantizable ops: nothing for AMP to choose")
    macs = mac_table(graph, partition)
    group_cands = collapse_unweighted(
        filter_candidates(
            op_kernels(graph, partition), cands, target_desc, use_all=use_all_amp_candidates, bias_bw=config.bias_bw
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
    run = AmpRun(
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
    return run
