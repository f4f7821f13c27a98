"""Quantization annotation: which tensor gets which kind of encoding.

Decided once, before calibration and lowering (the torch.ao pt2e order: annotate,
calibrate, lower). Vocabulary:

- activation roots: float activations that get their own encoding from calibration;
- shared: outputs of data-movement ops (Reshape, Transpose, MaxPool...) that reuse
  their input's encoding instead of getting a new one;
- weights: constant weights of Conv/ConvTranspose/Gemm/MatMul (per-channel capable);
- biases: derived int32 encodings, scale = input scale x weight scale;
- params: other float constants read by quantized ops (Add/Mul operands...), per tensor.

Ops outside these tables run in float (their quantized inputs are dequantized first), and so
do tensors annotated float by ``qpasses.targets.precision`` (unless an int op reads them: a convert).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import onnx

from graph_ir import Graph, Op
from qpasses.core.analyses import Analysis, Shapes
from qpasses.core.context import PassContext
from qpasses.quant.precision_type import is_float, needs_encoding, tensor_precision

FLOAT = onnx.TensorProto.FLOAT

# Ops whose output keeps (a subset of) its input's values: the output shares the input's encoding.
DATA_MOVEMENT: dict[str, tuple[int, ...]] = {
    op: (0,)
    for op in (
        "Reshape",
        "Transpose",
        "Flatten",
        "Squeeze",
        "Unsqueeze",
        "MaxPool",
        "GlobalMaxPool",
        "Identity",
        "Slice",
        "Gather",
        "Split",
        "Expand",
        "DepthToSpace",
        "SpaceToDepth",
        "Tile",
        "ReduceMax",
        "ReduceMin",
        "Pad",
    )
}

# Quantized compute ops and the input slots that carry data (others, like Clip's min/max or
# Reshape's shape, stay as they are).
_ALL = (0, 1, 2, 3, 4, 5, 6, 7)
COMPUTE: dict[str, tuple[int, ...]] = {
    "Conv": (0, 1, 2),
    "ConvTranspose": (0, 1, 2),
    "Gemm": (0, 1, 2),
    "MatMul": (0, 1),
    "Add": (0, 1),
    "Sub": (0, 1),
    "Mul": (0, 1),
    "Div": (0, 1),
    "Sum": _ALL,
    "Concat": _ALL,
    "Max": _ALL,
    "Min": _ALL,
    "Mean": _ALL,
    "PRelu": (0, 1),
    "Relu": (0,),
    "LeakyRelu": (0,),
    "Sigmoid": (0,),
    "Tanh": (0,),
    "HardSigmoid": (0,),
    "HardSwish": (0,),
    "Elu": (0,),
    "Selu": (0,),
    "Softplus": (0,),
    "Gelu": (0,),
    "Erf": (0,),
    "Abs": (0,),
    "Neg": (0,),
    "Clip": (0,),
    "AveragePool": (0,),
    "GlobalAveragePool": (0,),
    "Softmax": (0,),
    "LogSoftmax": (0,),
    "BatchNormalization": (0,),
    "InstanceNormalization": (0,),
    "LayerNormalization": (0,),
    "Resize": (0,),
    "ReduceMean": (0,),
    "ReduceSum": (0,),
    "Sqrt": (0,),
    "Exp": (0,),
}

# Activations that backends fuse into the preceding op (Conv+Relu, Add+Relu...): the
# intermediate tensor is never materialized, so it gets no encoding of its own.
FUSED_ACTIVATIONS = frozenset({"Relu", "Clip"})
FUSABLE_PRODUCERS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul", "Add", "Sub", "BatchNormalization"})

# op type -> (weight slot, bias slot or None)
WEIGHTED: dict[str, tuple[int, int | None]] = {
    "Conv": (1, 2),
    "ConvTranspose": (1, 2),
    "Gemm": (1, 2),
    "MatMul": (1, None),
}


def weighted_layer_inputs(graph: Graph) -> list[str]:
    """Data inputs of Conv/Gemm ops with a constant weight (what bias correction needs means of)."""
    names: dict[str, None] = {}
    for op in graph.ops:
        if (
            op.op_type in ("Conv", "Gemm")
            and op.is_standard
            and len(op.inputs) > 1
            and op.inputs[0]
            and op.inputs[1]
            and graph.tensors[op.inputs[1]].is_constant
        ):
            names.setdefault(op.inputs[0])
    return list(names)


def output_channel_axis(op_type: str, trans_b: bool, weight_rank: int) -> int:
    """Output-channel axis of a layer's weight: Conv 0, ConvTranspose 1, Gemm 0 if transB else 1, MatMul last."""
    if op_type == "Conv":
        return 0
    if op_type == "ConvTranspose":
        return 1
    if op_type == "Gemm":
        return 0 if trans_b else 1
    return weight_rank - 1


def weight_channel_axis(op: Op, weight_rank: int) -> int:
    """``output_channel_axis`` of one reader; which axis a shared weight is encoded along is ``weight_axes``' call."""
    return output_channel_axis(op.op_type, bool(op.attr("transB", 0)), weight_rank)


def weight_axes(graph: Graph) -> dict[str, int | None]:
    """The per-channel axis of every constant layer weight (Conv/ConvTranspose/Gemm/MatMul slot 1, rank >= 2).

    The one place that decides it, so that the plan, encode-weights, the overrides file check and the
    exported encodings agree. None when the weight's readers put their output channels on different axes
    (MatMul ``w[K, N]`` and Gemm ``transB=1`` on the same ``w``): one per-channel grid cannot serve both
    layers, so such a weight is quantized per tensor.
    """
    axes: dict[str, set[int]] = {}
    for op in graph.ops:
        if op.op_type not in WEIGHTED or not op.is_standard or len(op.inputs) < 2 or not op.inputs[1]:
            continue
        t = graph.tensors[op.inputs[1]]
        if t.is_constant and t.shape is not None and len(t.shape) >= 2:
            axes.setdefault(op.inputs[1], set()).add(weight_channel_axis(op, len(t.shape)))
    return {name: next(iter(found)) if len(found) == 1 else None for name, found in axes.items()}


@dataclass(frozen=True)
class WeightSpec:
    """A layer weight: ``op`` is its first reader; ``axis`` None: readers disagree, per tensor only."""

    name: str
    op: str
    axis: int | None


@dataclass(frozen=True)
class BiasSpec:
    name: str
    op: str
    input: str
    weight: str


@dataclass
class QuantPlanData:
    activations: list[str] = field(default_factory=list)
    shared: dict[str, str] = field(default_factory=dict)
    weights: dict[str, WeightSpec] = field(default_factory=dict)
    biases: dict[str, BiasSpec] = field(default_factory=dict)
    params: list[str] = field(default_factory=list)
    float_ops: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def root(self, name: str) -> str:
        return self.shared.get(name, name)

    @property
    def quantized_activations(self) -> list[str]:
        return [*self.activations, *self.shared]


def fused_intermediates(graph: Graph) -> dict[str, str]:
    """Outputs of Conv/Gemm/Add... read only by a Relu or Clip (which the backend fuses) -> that op's output."""
    fused: dict[str, str] = {}
    for op in graph.ops:
        if op.op_type not in FUSED_ACTIVATIONS or not op.is_standard or not op.inputs:
            continue
        src = op.inputs[0]
        producer = graph.producer(src)
        if (
            producer is not None
            and producer.op_type in FUSABLE_PRODUCERS
            and producer.is_standard
            and len(graph.uses(src)) == 1
            and not graph.is_graph_output(src)
            and op.outputs
            and op.outputs[0]
        ):
            fused[src] = op.outputs[0]
    return fused


class QuantPlan(Analysis):
    """The annotation as an analysis: recomputed whenever the graph or a precision changes."""

    reads_precisions: ClassVar[bool] = True

    def compute(self, graph: Graph, ctx: PassContext) -> None:
        self.plan = build_plan(graph, ctx.get(Shapes, graph))


def build_plan(graph: Graph, shapes: Shapes) -> QuantPlanData:
    plan = QuantPlanData()
    roots: dict[str, None] = {}
    skipped: dict[str, str] = {}
    qdq_tensors = {
        n
        for op in graph.ops
        if op.op_type in ("QuantizeLinear", "DequantizeLinear")
        for n in (*op.inputs, *op.outputs)
        if n
    }
    fused = fused_intermediates(graph)
    axes = weight_axes(graph)

    def dtype(name: str) -> int:
        t = graph.tensors[name]
        return t.dtype or shapes.dtype(name)

    def float_activation(name: str) -> bool:
        if not name or graph.tensors[name].is_constant or name in fused:
            return False
        if name in qdq_tensors:
            skipped.setdefault(name, "already quantized (next to QuantizeLinear/DequantizeLinear)")
            return False
        dt = dtype(name)
        if dt != FLOAT:
            if dt == 0:
                skipped.setdefault(name, "unknown dtype (shape inference could not type it)")
            return False
        # Annotated float: no encoding, unless an int op reads it (then insert-converts needs one).
        return needs_encoding(graph.tensors[name])

    def own_precision(src: str, out: str) -> bool:
        """A data-movement output annotated differently from its input needs its own encoding."""
        p, q = tensor_precision(graph.tensors[src]), tensor_precision(graph.tensors[out])
        return p is not None and q is not None and p != q

    for op in graph.ops:
        if not op.is_standard:
            plan.float_ops.append(op.name)
            continue
        if op.op_type in DATA_MOVEMENT:
            src = op.inputs[0] if op.inputs else ""
            if not float_activation(src):
                continue
            if src not in plan.shared:
                roots.setdefault(src)
            for out in op.outputs:
                if out and float_activation(out):
                    if own_precision(src, out):
                        roots.setdefault(out)
                    else:
                        plan.shared[out] = plan.root(src)
            continue
        slots = COMPUTE.get(op.op_type)
        if slots is None:
            if op.op_type not in ("Constant", "QuantizeLinear", "DequantizeLinear"):
                plan.float_ops.append(op.name)
            continue
        weight_slot, bias_slot = WEIGHTED.get(op.op_type, (None, None))
        for slot in slots:
            if slot >= len(op.inputs) or not op.inputs[slot]:
                continue
            name = op.inputs[slot]
            t = graph.tensors[name]
            if t.is_constant:
                if t.dtype != FLOAT or is_float(t):
                    continue
                if slot == weight_slot and name in axes:
                    plan.weights.setdefault(name, WeightSpec(name, op.name, axes[name]))
                elif (
                    slot == bias_slot
                    and weight_slot is not None
                    and t.shape is not None
                    and len(t.shape) == 1
                    and op.inputs[weight_slot]
                    and graph.tensors[op.inputs[weight_slot]].is_constant
                ):
                    plan.biases[name] = BiasSpec(name, op.name, op.inputs[0], op.inputs[weight_slot])
                elif name not in plan.params:
                    plan.params.append(name)
            elif float_activation(name) and name not in plan.shared:
                roots.setdefault(name)
        for out in op.outputs:
            if out and float_activation(out):
                roots.setdefault(out)
    # Around an INT32 op the float side is quantized even when only a Cast reads or writes it.
    for name, t in graph.tensors.items():
        if t.meta.get("int32_boundary") and name not in plan.shared and float_activation(name):
            roots.setdefault(name)
    # A bias's input must be quantized for its derived scale to exist; otherwise it stays float.
    for name, spec in list(plan.biases.items()):
        if plan.root(spec.input) not in roots:
            del plan.biases[name]
            skipped[name] = f"bias of {spec.op} left float: its input {spec.input} is not quantized"
    plan.activations = [n for n in roots if n not in plan.shared]
    plan.skipped = sorted(skipped.items())
    return plan
