"""Fold inference-mode BatchNormalization into the linear layer that feeds it.

``BN(W x + b) = (W * k) x + (b - mean) * k + beta`` with ``k = gamma / sqrt(var + eps)``
per output channel, so the BN disappears and quantization sees the weights the
accelerator will actually run. The folded BN's ``(gamma, beta)`` describe the layer's
output distribution afterwards; they are kept in the ``FoldedBatchNorms`` artifact by op name
because cross-layer equalization needs them for high-bias absorption.

``LinearLayer`` is the per-channel view of Conv / ConvTranspose / Gemm / MatMul(+bias
Add) that both this pass and ``cle`` edit: weights are held in one canonical layout
``[group, out/group, in/group, taps]`` so output- and input-channel scaling are written
once instead of once per op type and transpose flag.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from graph_ir import Graph, Op
from qpasses.core.analyses import Shapes
from qpasses.core.context import PassContext
from qpasses.core.pass_base import Pass, PassResult
from qpasses.core.patterns import NearMiss, Pattern, Step
from qpasses.core.remarks import RemarkCollector
from qpasses.passes.equalize.linear_layer import (
    LAYER_TYPES,
    LayerError,
    LinearLayer,
    drop_if_unused,
    matmul_bias_problem,
)


class FoldedBatchNorms(dict[str, tuple[np.ndarray, np.ndarray]]):
    """Artifact: per layer op name, the (gamma, beta) of the BatchNormalization folded into it
    (CLE's high-bias absorption reads them)."""


class KeptBatchNorms(set[str]):
    """Artifact: BatchNormalizations already reported as kept (reported once across fold-batchnorm and cle)."""


# --------------------------------------------------------------------------- the fold


def _bn_problem(graph: Graph, bn: Op) -> str | None:
    if len(bn.inputs) < 5:
        return "missing inputs"
    if int(bn.attr("training_mode", 0)):
        return "training_mode=1"
    if int(bn.attr("spatial", 1)) != 1:
        return "spatial=0 (per-activation statistics)"
    for extra in bn.outputs[1:]:
        if extra and (graph.uses(extra) or graph.is_graph_output(extra)):
            return f"training-mode output {extra} is used"
    for what, name in zip(("scale", "B", "mean", "var"), bn.inputs[1:5], strict=True):
        t = graph.tensors.get(name)
        if t is None or not t.is_constant:
            return f"{what} input {name or '(missing)'} is not a constant"
    return None


def _fold_pattern(shapes: Callable[[], Shapes]) -> Pattern:
    def layer_problem(graph: Graph, op: Op) -> str | None:
        try:
            layer = LinearLayer.load(graph, op, shapes() if op.op_type == "MatMul" else None)
        except LayerError as exc:
            return str(exc)
        if op.op_type == "MatMul" and layer.input_rank != 2:
            return (
                f"MatMul '{op.name}' input rank is {layer.input_rank or 'unknown'}; BatchNormalization "
                "normalizes axis 1, which is MatMul's output channel only for 2-D inputs"
            )
        return None

    return Pattern(
        "layer-batchnorm",
        (
            Step("layer", LAYER_TYPES, where=layer_problem),
            Step("bias", ("Add",), optional=True, strict=False, slots=(0, 1), where=matmul_bias_problem),
            Step("bn", ("BatchNormalization",), where=_bn_problem),
        ),
    )


def _fold_anchor(graph: Graph, bn: Op) -> Op | None:
    """The layer that could absorb ``bn``: its producer, or the MatMul behind a bias Add."""
    op = graph.producer(bn.inputs[0]) if bn.inputs else None
    if op is not None and op.op_type == "Add":
        for name in op.inputs:
            mm = graph.producer(name)
            if mm is not None and mm.op_type == "MatMul":
                return mm
    return op


class LazyShapes:
    """Shape inference runs only if a MatMul needs its input rank, and then once."""

    def __init__(self, graph: Graph, ctx: PassContext) -> None:
        self.graph, self.ctx = graph, ctx
        self.value: Shapes | None = None

    def __call__(self) -> Shapes:
        if self.value is None:
            self.value = self.ctx.get(Shapes, self.graph)
        return self.value


def fold_batchnorms(graph: Graph, ctx: PassContext, remarks: RemarkCollector) -> list[LinearLayer]:
    """Fold every foldable BatchNormalization; remark the rest. Returns the layers changed."""
    shapes = LazyShapes(graph, ctx)
    pattern = _fold_pattern(shapes)
    stats = ctx.artifacts.setdefault(FoldedBatchNorms)
    # BNs already reported as kept (by fold-batchnorm before cle) are not reported twice.
    reported = ctx.artifacts.setdefault(KeptBatchNorms)
    done: list[LinearLayer] = []

    def missed(bn: Op, nodes: list[str], reason: str) -> None:
        if bn.name not in reported:
            reported.add(bn.name)
            remarks.missed(f"kept {bn.name}", nodes, reason=reason)

    for bn in [op for op in graph.ops if op.op_type == "BatchNormalization" and op.is_standard]:
        anchor = _fold_anchor(graph, bn)
        result = pattern.match(graph, anchor) if anchor is not None else None
        if result is None:
            what = f"{anchor.op_type} '{anchor.name}'" if anchor is not None else "a graph input"
            missed(bn, [bn.name], f"its input comes from {what}, not a Conv/ConvTranspose/Gemm/MatMul")
            continue
        if isinstance(result, NearMiss):
            missed(bn, result.names if bn in result.ops else [*result.names, bn.name], result.reason)
            continue
        assert anchor is not None
        layer = LinearLayer.load(graph, anchor, shapes() if anchor.op_type == "MatMul" else None)
        params = [graph.tensors[n].data for n in bn.inputs[1:5]]
        gamma, beta, mean, var = (np.asarray(p, np.float64).reshape(-1) for p in params)
        if not all(a.shape == (layer.out_channels,) for a in (gamma, beta, mean, var)):
            missed(bn, [anchor.name, bn.name], f"parameters are not [{layer.out_channels}] vectors")
            continue
        k = gamma / np.sqrt(var + float(bn.attr("epsilon", 1e-5)))
        layer.scale_out(k)
        layer.add_bias(beta - mean * k)
        old_inputs = [*anchor.inputs, *(layer.bias_add.inputs if layer.bias_add else [])]
        layer.commit()
        out = bn.outputs[0]
        if graph.is_graph_output(out):
            graph.remove_op(bn)
            layer.take_output(out)
        else:
            graph.replace_all_uses(out, layer.output, graph_outputs=False)
            graph.remove_op(bn)
        drop_if_unused(graph, [*bn.inputs[1:], *old_inputs])
        layer.stats = (gamma, beta)
        stats[layer.op.name] = (gamma.copy(), beta.copy())
        remarks.applied(f"folded {bn.name} into {layer.op.op_type} {layer.op.name}", [layer.op.name, bn.name])
        done.append(layer)
    return done


class FoldBatchNorm(Pass):
    name = "fold-batchnorm"
    modifies_values = True  # folded weights (graph edits): statistics measured before do not hold after
    description = "fold inference BatchNormalization into the preceding Conv/ConvTranspose/Gemm/MatMul"
    preserves_semantics = True

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        folded = fold_batchnorms(graph, ctx, self.remarks)
        return self.result(bool(folded))
