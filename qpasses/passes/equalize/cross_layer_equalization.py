"""Cross-layer equalization (Nagel et al. 2019, "Data-Free Quantization").

Per-channel weight ranges of consecutive layers are balanced by a positive rescaling
that cancels out: ``layer1 -> Relu -> layer2`` computes the same function with
``W1 /= s`` (output channels), ``b1 /= s`` and ``W2 *= s`` (input channels), because
``Relu(x / s) = Relu(x) / s`` for ``s > 0``. With ``s = sqrt(r1 / r2)`` both sides end
up with range ``sqrt(r1 r2)``, so per-tensor weight quantization loses far less.

Chains: layers (Conv, ConvTranspose, grouped/depthwise Conv, Gemm, MatMul+bias) joined
through ops that commute with per-channel positive scaling (Relu, Clip(0, inf), Relu6
turned into Relu, MaxPool/AveragePool, global pools, Flatten after a global pool,
Identity), each joint read by exactly one op and not a graph output. A chain is cut into
pairs and, around a depthwise layer, triples (closed-form cube-root scaling). Sweeps over
all links repeat until every scale is within ``tolerance`` of 1 (the DFQ fixed point;
AIMET stops after one sweep, which leaves overlapping pairs unbalanced).

BatchNormalization: any BN still in the graph is folded first with ``fold-batchnorm``'s
logic, so ``cle`` alone is a complete pipeline and its statistics reach high-bias absorption.
High-bias absorption (``high_bias_absorption``) then moves what the folded BNs' statistics say
is a constant part of ``b1`` into ``b2``; finding the links is ``cle_links``'.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from graph_ir import Graph, Op
from qpasses.core.context import PassContext
from qpasses.core.errors import CalibrationDataError, PassError
from qpasses.core.pass_base import Pass, PassResult
from qpasses.data.statistics import ChannelRangeRequest, measure
from qpasses.passes.equalize.cle_links import Link, find_links, is_relu6
from qpasses.passes.equalize.fold_batchnorm import FoldedBatchNorms, LazyShapes, fold_batchnorms
from qpasses.passes.equalize.high_bias_absorption import absorb_high_biases, dfq_amount
from qpasses.passes.equalize.linear_layer import LayerError, LinearLayer, drop_if_unused


def _safe(s: np.ndarray) -> np.ndarray:
    """Scales that are 0, negative, NaN or inf (dead channels) become 1: leave those alone."""
    return np.where(np.isfinite(s) & (s > 0), s, 1.0)


def pair_scales(r1: np.ndarray, r2: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return _safe(np.sqrt(r1 / r2))


def triple_scales(r0: np.ndarray, r1: np.ndarray, r2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """DFQ closed form: all three ranges become cbrt(r0 r1 r2)."""
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        cube = np.cbrt(r0 * r1 * r2)
        return _safe(r0 / cube), _safe(cube / r2)


class CrossLayerEqualization(Pass):
    name = "cle"
    modifies_values = True  # rescaled weights: statistics measured before do not hold after
    description = "cross-layer equalization with high-bias absorption (folds remaining BatchNorms first)"
    # Exact up to the two documented approximations (Relu6->Relu, absorption through a Relu);
    # turn those options off for a bit-for-bit (up to rounding) FP32 rewrite.
    preserves_semantics = True

    @dataclass
    class Options:
        iterations: int = 100  # most sweeps over all links; stops once converged (0: no scaling)
        tolerance: float = 1e-4  # converged when every scale is within this of 1
        high_bias_absorption: bool = True
        absorb_into_padded: bool = False  # AIMET's behaviour: inexact at zero-padded borders
        # Through a Relu: "verified" caps the amount at the calibration data's per-channel minimum (none without
        # data), "always" absorbs DFQ's beta - 3|gamma| (inexact below it), "never" absorbs only across linear glue.
        absorb_through_relu: str = "verified"
        relu6_to_relu: bool = True

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        opts = self.options
        folded = fold_batchnorms(graph, ctx, self.remarks)
        stats = ctx.artifacts.setdefault(FoldedBatchNorms)
        shapes = LazyShapes(graph, ctx)
        layers: dict[int, LinearLayer | str] = {}

        def layer(op: Op) -> LinearLayer | str:
            if op.id not in layers:
                try:
                    found = LinearLayer.load(graph, op, shapes() if op.op_type == "MatMul" else None)
                    entry = stats.get(op.name)
                    if entry is not None and np.shape(entry[0]) == (found.out_channels,):
                        found.stats = (np.asarray(entry[0], np.float64), np.asarray(entry[1], np.float64))
                    layers[op.id] = found
                except LayerError as exc:
                    layers[op.id] = str(exc)
            return layers[op.id]

        links = find_links(graph, layer, opts.relu6_to_relu, self.remarks)
        if not links:
            return self.result(bool(folded))

        sweeps, converged = self._equalize(links)
        described = [(link, link.describe(graph)) for link in links]  # before Relu6 becomes Relu
        absorbed = (
            absorb_high_biases(
                graph,
                links,
                self.remarks,
                absorb_into_padded=opts.absorb_into_padded,
                minima=self._relu_input_minima(graph, ctx, links),
            )
            if opts.high_bias_absorption
            else []
        )

        # Write back, then remark: committing may rename ops, and remarks must name what exists.
        modified = bool(folded)
        for edited in {id(x): x for link in links for x in link.layers}.values():
            name = edited.op.name
            if edited.weight_dirty or edited.bias_dirty:
                old = [*edited.op.inputs, *(edited.bias_add.inputs if edited.bias_add else [])]
                edited.commit()
                drop_if_unused(graph, old)
                modified = True
            if edited.stats is not None:
                stats.pop(name, None)
                stats[edited.op.name] = (edited.stats[0].copy(), edited.stats[1].copy())
        for link, text in described:
            if any(np.any(np.abs(s - 1) >= opts.tolerance) for s in link.scales):
                self.remarks.applied(f"equalized {text}", link.names, reason=_spread(link))
            else:
                self.remarks.analysis(f"already equalized {text}", link.names)
        self.remarks.analysis(f"{len(links)} links {'converged' if converged else 'stopped'} after {sweeps} sweeps")
        for emit in absorbed:
            emit()
        swapped = self._relu6_to_relu(graph, links)
        # Relu6 -> Relu changes outputs above 6, and DFQ's unverified absorption through a Relu changes those
        # below beta - 3|gamma|: tell numeric verification not to compare.
        dfq = opts.high_bias_absorption and opts.absorb_through_relu == "always"
        return self.result(modified or swapped, exact=not swapped and not dfq)

    def _relu_input_minima(
        self, graph: Graph, ctx: PassContext, links: list[Link]
    ) -> Callable[[LinearLayer], np.ndarray | None] | None:
        """What caps a high bias absorbed through a Relu (``absorb_through_relu``): the per-channel minimum of
        each such layer's output on the calibration data, measured on the equalized weights; None: no cap."""
        mode = self.options.absorb_through_relu
        if mode not in ("verified", "always", "never"):
            raise PassError(f"pass 'cle': absorb_through_relu must be verified, always or never, got {mode!r}")
        if mode == "always":
            return None
        layers = []
        for link in links:
            for l1, glue in zip(link.layers[:-1], link.glue, strict=True):
                amount = dfq_amount(graph, l1, glue)
                if amount is not None and amount[1] and np.any(amount[0]):  # DFQ would move something across a Relu
                    layers.append(l1)
        if mode == "never" or not layers or ctx.calibration_data is None:
            if layers and mode == "verified":
                self.remarks.missed(
                    "high bias not absorbed through Relu",
                    [x.op.name for x in layers],
                    reason="no calibration data to verify that pre-activations stay above the amount "
                    "(absorb_through_relu=always absorbs beta - 3|gamma| as DFQ does, inexact below it)",
                )
            return lambda layer: None
        for layer in layers:  # measure on the equalized weights
            if layer.weight_dirty or layer.bias_dirty:
                layer.commit()
        names = [layer.output for layer in layers]
        try:
            found = measure(graph, ctx, [ChannelRangeRequest(tuple(names))])
        except CalibrationDataError as exc:
            self.remarks.missed("high bias not absorbed through Relu", reason=str(exc))
            return lambda layer: None
        observed = found[ChannelRangeRequest(tuple(names))]
        minima = {name: extremes.mins for name, extremes in observed.items() if extremes.mins is not None}
        return lambda layer: minima.get(layer.output)

    # --- scaling --------------------------------------------------------------------------------
    def _equalize(self, links: list[Link]) -> tuple[int, bool]:
        tol = self.options.tolerance
        for sweep in range(1, self.options.iterations + 1):
            moved = False
            for link in links:
                if len(link.layers) == 2:
                    a, b = link.layers
                    factors = [pair_scales(a.out_ranges(), b.in_ranges())]
                else:
                    a, m, b = link.layers
                    factors = list(triple_scales(a.out_ranges(), m.out_ranges(), b.in_ranges()))
                if all(np.all(np.abs(s - 1) < tol) for s in factors):
                    continue
                moved = True
                for j, s in enumerate(factors):
                    link.layers[j].scale_out(1 / s)
                    link.layers[j + 1].scale_in(s)
                    link.scales[j] = link.scales[j] * s
            if not moved:
                return sweep, True
        return self.options.iterations, self.options.iterations == 0

    # --- Relu6 -> Relu --------------------------------------------------------------------------
    def _relu6_to_relu(self, graph: Graph, links: list[Link]) -> bool:
        """Turn the Relu6 Clips inside equalized links into Relu, in place (names are kept)."""
        changed = False
        for op in (op for link in links for glue in link.glue for op in glue):
            if not is_relu6(graph, op):
                continue
            bounds = op.inputs[1:]
            graph.truncate_inputs(op, 1)  # Relu has a single input
            graph.set_op_type(op, "Relu")
            op.attributes = {}
            drop_if_unused(graph, bounds)
            self.remarks.applied(
                f"replaced Relu6 '{op.name}' with Relu",
                [op.name],
                reason="Clip(0, 6) does not commute with per-channel scaling; "
                "outputs are unchanged while activations stay below 6",
            )
            changed = True
        return changed


def _spread(link: Link) -> str:
    """Max/min channel-range ratio at both ends of the link, before -> after (lower is better)."""

    def ratio(r: np.ndarray) -> str:
        live = r[r > 0]
        return f"{float(live.max() / live.min()):.3g}" if live.size else "1"

    first, last = link.layers[0], link.layers[-1]
    before = link.initial or (first.out_ranges(), last.in_ranges())
    return (
        f"channel range spread: '{first.op.name}' outputs {ratio(before[0])} -> {ratio(first.out_ranges())}, "
        f"'{last.op.name}' inputs {ratio(before[1])} -> {ratio(last.in_ranges())}"
    )
