"""``qpasses check --target``: annotate a model exactly as ``quantize`` does, then list the ops the
target cannot run as annotated.

The annotation is the default pipeline's own (``build_quantize_pipeline``): its structural stage
(inline-functions, remove-identity, sink-transposes, fold-channel-affine, fold-batchnorm), the
overrides file loaded after it, and its annotate stage (the keep-float passes, annotate-precision), so
the check cannot drift from what ``quantize --target`` lowers.
"""

from __future__ import annotations

import dataclasses
import os

import onnx

import graph_ir
from graph_ir import Graph
from qpasses.core.context import PassContext
from qpasses.core.pass_manager import PassManager
from qpasses.core.pipeline import PassSpec, build_passes
from qpasses.core.registry import Registry
from qpasses.passes import default_registry
from qpasses.passes.quantize.conformance import Finding, check_conformance
from qpasses.quant.config import QuantConfig
from qpasses.quantize_pipeline import QuantizeOptions, build_quantize_pipeline, run_structural_stage
from qpasses.targets import resolve_target
from qpasses.targets.descriptor import TargetDescriptor
from qpasses.targets.precision import PrecisionOptions


def check_model(
    model: str | os.PathLike[str] | onnx.ModelProto | Graph,
    target: str | os.PathLike[str] | TargetDescriptor,
    *,
    overrides: str | os.PathLike[str] | None = None,
    options: PrecisionOptions | None = None,
    fold_batchnorm: bool = True,
    registry: Registry | None = None,
) -> list[Finding]:
    """The ops of ``model`` that ``target`` cannot run once annotated as ``quantize`` would."""
    registry = registry or default_registry()
    descriptor = resolve_target(target, registry)
    assert descriptor is not None
    graph = model.copy() if isinstance(model, Graph) else graph_ir.load(model)
    opts = options or PrecisionOptions()
    flow = build_quantize_pipeline(
        QuantConfig(),
        QuantizeOptions(
            calibrated=opts.calibrated,
            overrides=str(overrides) if overrides is not None else None,
            fold_batchnorm=fold_batchnorm,
        ),
    )
    # The precision options given here (None: the target's default) replace the config's; int32-overrides
    # would stop at the first INT32 op the target cannot run, which the check lists with the others.
    annotate = [
        PassSpec(spec.name, dataclasses.asdict(opts)) if spec.name == "annotate-precision" else spec
        for spec in flow.stages["annotate"]
        if spec.name != "int32-overrides"
    ]
    ctx = PassContext(target=descriptor)
    run_structural_stage(graph, ctx, flow, registry, overrides=overrides)
    PassManager(build_passes(annotate, registry)).run(graph, ctx)
    return check_conformance(graph, descriptor)
