"""CLE's links: chains of layers joined by ops that commute with per-channel positive scaling.

A chain (Conv, ConvTranspose, grouped/depthwise Conv, Gemm, MatMul+bias, through Relu,
Clip(0, inf), Relu6 when it may become Relu, pools, Flatten after a global pool, Identity; each
joint read by exactly one op and not a graph output) is cut into pairs and, around a depthwise
layer, triples. A chain that stops for any other reason says why in a 'missed' remark.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from graph_ir import Graph, Op
from qpasses.core.patterns import Match, NearMiss, Pattern, Step
from qpasses.core.remarks import RemarkCollector
from qpasses.passes.equalize.linear_layer import LAYER_TYPES, LinearLayer, matmul_bias_problem

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


def is_relu6(graph: Graph, op: Op) -> bool:
    return op.op_type == "Clip" and clip_bounds(graph, op) == (0.0, 6.0)


def is_relu(graph: Graph, op: Op) -> bool:
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
        parts = [layer_kind(self.layers[0])]
        for glue, layer in zip(self.glue, self.layers[1:], strict=True):
            parts += ["Relu6" if is_relu6(graph, op) else op.op_type for op in glue] + [layer_kind(layer)]
        return "->".join(parts)


def layer_kind(layer: LinearLayer) -> str:
    return "DepthwiseConv" if layer.is_depthwise and layer.op.op_type == "Conv" else layer.op.op_type


def link_pattern(layer: LayerLookup, relu6_to_relu: bool) -> Pattern:
    """Two layers joined by glue that commutes with per-channel scaling (the ``where``s say why not)."""

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
                    if relu6_to_relu
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


def find_links(graph: Graph, layer: LayerLookup, relu6_to_relu: bool, remarks: RemarkCollector) -> list[Link]:
    """The chains of layers, cut into pairs and (around a depthwise layer) triples; a chain that ends
    past its first layer for a reason other than an op type gets a 'missed' remark."""
    pattern = link_pattern(layer, relu6_to_relu)
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
            remarks.missed(f"chain from '{op.name}' ends", result.names, reason=result.reason)
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
