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

High-bias absorption moves ``c`` (per channel) out of ``b1`` into ``b2 += W2 . c``, where
``c = max(0, beta - 3|gamma|)`` if a Relu sits between and ``c = beta`` otherwise, from the
folded BN's ``(gamma, beta)`` (kept in the ``FoldedBatchNorms`` artifact, scaled with the layer); into a
Gemm it is ``b2 += alpha W2 . c`` (Gemm computes ``alpha W2 x + beta C``).
Exactness: through linear glue (pools, Flatten, Identity) it is exact. Through a Relu it
is exact for every input whose pre-activation stays >= ``beta - 3|gamma|`` (the DFQ
assumption, 99.87% of a Gaussian); inputs below that change the output, so the pass is
only approximately semantics-preserving with absorption on. It is never exact into a
zero-padded Conv or a ConvTranspose (border outputs see fewer taps): AIMET absorbs there
anyway; we skip those with a remark unless ``absorb_into_padded`` asks for it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from graph_ir import Graph, Op
from qpasses.core.context import PassContext
from qpasses.core.pass_base import Pass, PassResult
from qpasses.core.patterns import Match, NearMiss, Pattern, Step
from qpasses.passes.equalize.fold_batchnorm import FoldedBatchNorms, LazyShapes, fold_batchnorms
from qpasses.passes.equalize.linear_layer import (
    LAYER_TYPES,
    LayerError,
    LinearLayer,
    drop_if_unused,
    matmul_bias_problem,
)

# Ops between two layers that commute with positive per-channel scaling (checked further below).
SCALE_COMMUTING = (
    "Relu",
    "Clip",
    "MaxPool",
    "AveragePool",
    "GlobalMaxPool",
    "GlobalAveragePool",
    "Flatten",
    "Identity",
)
# Activations we recognise only to say why a chain ends there.
OTHER_ACTIVATIONS = (
    "Sigmoid",
    "Tanh",
    "LeakyRelu",
    "PRelu",
    "Elu",
    "Selu",
    "Celu",
    "HardSigmoid",
    "HardSwish",
    "Softplus",
    "Softsign",
    "Gelu",
    "Mish",
    "ThresholdedRelu",
    "Swish",
    "Exp",
    "Abs",
)
GLOBAL_POOLS = ("GlobalMaxPool", "GlobalAveragePool")

LayerLookup = Callable[[Op], "LinearLayer | str"]


def clip_bounds(graph: Graph, op: Op) -> tuple[float, float] | None:
    """Clip's (min, max) from attributes (opset < 11) or constant inputs; None if not constant."""
    if graph.opset() < 11 or len(op.inputs) == 1 and ("min" in op.attributes or "max" in op.attributes):
        return float(op.attr("min", -np.inf)), float(op.attr("max", np.inf))
    bounds = [-np.inf, np.inf]
    for i, name in enumerate(op.inputs[1:3]):
        if not name:
            continue
        t = graph.tensors.get(name)
        data = t.data if t is not None and t.is_constant else None
        if data is None or data.size != 1:
            return None
        bounds[i] = float(data.reshape(()))
    return bounds[0], bounds[1]


def _is_relu6(graph: Graph, op: Op) -> bool:
    return op.op_type == "Clip" and clip_bounds(graph, op) == (0.0, 6.0)


def _is_relu(graph: Graph, op: Op) -> bool:
    return op.op_type == "Relu" or (op.op_type == "Clip" and clip_bounds(graph, op) == (0.0, np.inf))


@dataclass
class Link:
    """Consecutive layers equalized together: a pair, or a triple around a depthwise layer."""

    layers: list[LinearLayer]
    glue: list[list[Op]]  # ops between layers[i] and layers[i + 1]
    scales: list[np.ndarray] = field(default_factory=list)  # accumulated per junction
    initial: tuple[np.ndarray, np.ndarray] | None = None  # (first layer out, last layer in) ranges

    @property
    def names(self) -> list[str]:
        names = [self.layers[0].op.name]
        for glue, layer in zip(self.glue, self.layers[1:], strict=True):
            names += [op.name for op in glue] + [layer.op.name]
        return names

    def describe(self, graph: Graph) -> str:
        parts = [_kind(self.layers[0])]
        for glue, layer in zip(self.glue, self.layers[1:], strict=True):
            parts += ["Relu6" if _is_relu6(graph, op) else op.op_type for op in glue] + [_kind(layer)]
        return "->".join(parts)


def _kind(layer: LinearLayer) -> str:
    return "DepthwiseConv" if layer.is_depthwise and layer.op.op_type == "Conv" else layer.op.op_type


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

        links = self._find_links(graph, layer)
        if not links:
            return self.result(bool(folded))

        sweeps, converged = self._equalize(links)
        described = [(link, link.describe(graph)) for link in links]  # before Relu6 becomes Relu
        absorbed = self._absorb(graph, links) if opts.high_bias_absorption else []

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
        # Relu6 -> Relu changes outputs above 6: tell numeric verification not to compare.
        return self.result(modified or swapped, exact=not swapped)

    # --- matching -----------------------------------------------------------------------------
    def _pattern(self, layer: LayerLookup) -> Pattern:
        def layer1_problem(graph: Graph, op: Op) -> str | None:
            found = layer(op)
            return found if isinstance(found, str) else None

        def layer2_problem(graph: Graph, op: Op) -> str | None:
            found = layer(op)
            if isinstance(found, str):
                return f"'{op.name}': {found}"
            if op.op_type == "Gemm" and int(op.attr("transA", 0)):
                return f"Gemm '{op.name}' has transA=1 (its input channels are not the last axis)"
            return None

        def glue_problem(graph: Graph, op: Op) -> str | None:
            if op.op_type in OTHER_ACTIVATIONS:
                return f"unsupported activation {op.op_type} '{op.name}' (only Relu/Relu6 commute with scaling)"
            if op.op_type == "Clip":
                bounds = clip_bounds(graph, op)
                if bounds is None:
                    return f"Clip '{op.name}' has non-constant bounds"
                if bounds == (0.0, 6.0):
                    return (
                        None
                        if self.options.relu6_to_relu
                        else (f"Relu6 Clip '{op.name}' does not commute with scaling (relu6_to_relu is off)")
                    )
                if bounds[1] != np.inf or bounds[0] not in (0.0, -np.inf):  # Relu-like or no-op Clips pass
                    return f"unsupported activation Clip({bounds[0]:g}, {bounds[1]:g}) '{op.name}'"
            if op.op_type == "Flatten" and int(op.attr("axis", 1)) != 1:
                return f"Flatten '{op.name}' has axis {op.attr('axis')}"
            return None

        def check(graph: Graph, match: Match) -> str | None:
            l1, l2 = layer(match.roles["layer1"][0]), layer(match.roles["layer2"][0])
            assert isinstance(l1, LinearLayer) and isinstance(l2, LinearLayer)
            channels_first, pooled = l1.channels_first, False
            for op in match.all("glue"):
                if op.op_type in ("MaxPool", "AveragePool", *GLOBAL_POOLS):
                    if not channels_first:
                        return f"{op.op_type} '{op.name}' pools over the channel axis of '{l1.op.name}'"
                    pooled = op.op_type in GLOBAL_POOLS
                elif op.op_type == "Flatten" and channels_first:
                    if not pooled:
                        return f"Flatten '{op.name}' mixes channels with spatial positions"
                    channels_first = False
            if channels_first != l2.channels_first:
                return (
                    f"'{l2.op.name}' does not contract the channel axis of '{l1.op.name}' "
                    f"({'axis 1' if channels_first else 'last axis'})"
                )
            if l1.out_channels != l2.in_channels:
                return f"'{l1.op.name}' has {l1.out_channels} output channels, '{l2.op.name}' reads {l2.in_channels}"
            return None

        return Pattern(
            "cle-pair",
            (
                Step("layer1", LAYER_TYPES, where=layer1_problem),
                Step("bias", ("Add",), optional=True, strict=False, slots=(0, 1), where=matmul_bias_problem),
                Step("glue", SCALE_COMMUTING + OTHER_ACTIVATIONS, optional=True, repeat=True, where=glue_problem),
                Step("layer2", LAYER_TYPES, where=layer2_problem),
            ),
            check=check,
        )

    def _find_links(self, graph: Graph, layer: LayerLookup) -> list[Link]:
        pattern = self._pattern(layer)
        nxt: dict[int, tuple[Op, list[Op]]] = {}
        seconds: set[int] = set()
        order = [op for op in graph.ops if op.op_type in LAYER_TYPES]
        for op in order:
            result = pattern.match(graph, op)
            if isinstance(result, Match):
                l2 = result.roles["layer2"][0]
                nxt[op.id] = (l2, result.all("glue"))
                seconds.add(l2.id)
            elif isinstance(result, NearMiss) and result.step > 0 and result.kind != "mismatch":
                self.remarks.missed(f"chain from '{op.name}' ends", result.names, reason=result.reason)
        links: list[Link] = []
        for op in order:
            if op.id not in nxt or op.id in seconds:
                continue
            chain, glue = [op], []
            while chain[-1].id in nxt:
                l2, between = nxt[chain[-1].id]
                chain.append(l2)
                glue.append(between)
            resolved = [found for o in chain if isinstance(found := layer(o), LinearLayer)]
            assert len(resolved) == len(chain)  # every op of a chain matched the pattern as a layer
            i = 0
            while i < len(chain) - 1:
                size = 3 if i + 2 < len(chain) and resolved[i + 1].is_depthwise else 2
                links.append(Link(resolved[i : i + size], glue[i : i + size - 1]))
                i += size - 1
        for link in links:
            link.scales = [np.ones(a.out_channels) for a in link.layers[:-1]]
            link.initial = (link.layers[0].out_ranges(), link.layers[-1].in_ranges())
        return links

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

    # --- high-bias absorption -------------------------------------------------------------------
    def _absorb(self, graph: Graph, links: list[Link]) -> list[Callable[[], None]]:
        """Absorb high biases; returns the remarks to emit once layers are committed (and named)."""
        pending: list[Callable[[], None]] = []
        no_stats: list[LinearLayer] = []
        for link in links:
            for l1, glue, l2 in zip(link.layers[:-1], link.glue, link.layers[1:], strict=True):
                if l1.stats is None:
                    no_stats.append(l1)
                    continue
                gamma, beta = l1.stats
                through_relu = any(_is_relu(graph, op) or _is_relu6(graph, op) for op in glue)
                c = np.maximum(0.0, beta - 3 * np.abs(gamma)) if through_relu else beta.copy()
                if not np.any(c):
                    continue
                padded = l2.pads_input or any(
                    op.op_type == "AveragePool"
                    and int(op.attr("count_include_pad", 0))
                    and any(op.attr("pads", []) or [])
                    for op in glue
                )
                if padded and not self.options.absorb_into_padded:
                    pending.append(
                        self._remark(
                            "missed",
                            "high bias not absorbed",
                            l1,
                            glue,
                            l2,
                            f"'{l2.op.name}' zero-pads its input, so absorption would change "
                            "border outputs (absorb_into_padded=true allows it)",
                        )
                    )
                    continue
                l1.add_bias(-c)
                # Gemm computes alpha * W2 . x + beta * C; LinearLayer's bias is already beta * C,
                # but its weight is W2 without alpha, so the shift W2 . c reaches the output times alpha.
                l2.add_bias(_gemm_alpha(l2) * l2.response(c))
                # beta - c, written so that a second run computes c = 0 exactly (idempotence)
                l1.stats = (gamma, np.minimum(beta, 3 * np.abs(gamma)) if through_relu else np.zeros_like(beta))
                how = "beta - 3|gamma| through Relu" if through_relu else "beta, no activation"
                pending.append(
                    self._remark(
                        "applied",
                        "absorbed high bias",
                        l1,
                        glue,
                        l2,
                        f"{np.count_nonzero(c)} channels, max {float(np.max(np.abs(c))):.3g} ({how})",
                    )
                )
        if no_stats:
            pending.append(
                lambda: self.remarks.missed(
                    "high-bias absorption skipped",
                    [x.op.name for x in no_stats],
                    reason="no folded BatchNormalization statistics for these layers",
                )
            )
        return pending

    def _remark(
        self, kind: str, message: str, l1: LinearLayer, glue: list[Op], l2: LinearLayer, reason: str
    ) -> Callable[[], None]:
        def emit() -> None:
            nodes = [l1.op.name, *(op.name for op in glue), l2.op.name]
            text = f"{message} from '{l1.op.name}' into '{l2.op.name}'"
            (self.remarks.applied if kind == "applied" else self.remarks.missed)(text, nodes, reason=reason)

        return emit

    # --- Relu6 -> Relu --------------------------------------------------------------------------
    def _relu6_to_relu(self, graph: Graph, links: list[Link]) -> bool:
        """Turn the Relu6 Clips inside equalized links into Relu, in place (names are kept)."""
        changed = False
        for op in (op for link in links for glue in link.glue for op in glue):
            if not _is_relu6(graph, op):
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


def _gemm_alpha(layer: LinearLayer) -> float:
    """The factor a layer applies to ``W . x`` beyond its weight: Gemm's ``alpha``, 1 for the others."""
    return float(layer.op.attr("alpha", 1.0)) if layer.op.op_type == "Gemm" else 1.0


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
