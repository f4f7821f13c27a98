"""On a target that runs float ops, quantizers sit only where an integer MAC kernel reads or writes.

onnxruntime's CPU provider (targets ``ort``, ``ort-vnni``: ``mac_io_only`` in the descriptor) runs any
op in float and turns three QDQ patterns into integer compute: DequantizeLinear -> Conv/ConvTranspose/Gemm/MatMul ->
QuantizeLinear (QLinearConv, QGemm, QLinearMatMul). A quantizer anywhere else (a bias Add, a Sigmoid
gate, attention scores before their Softmax) buys no integer MAC, and each one rounds the signal once
more. So an activation that no Conv/ConvTranspose/Gemm/MatMul writes stays float here, and a MAC reading it
quantizes it itself (``insert-converts``: the tensor's calibrated Q/DQ in front of the MAC), so the ops
before it run in float and no MAC loses its integer kernel. One that a MAC and another op both read
stays quantized for all of them: a ResNet's skip connection adds the same rounded tensor its next block
reads, and the two roundings partly cancel (open_nsfw with the residual Relu outputs float for the Add
only: output SQNR 41.6 -> 39.3 dB).

The default target (none) keeps quantizing every activation, AIMET-style: its encodings file serves
other compilers too, and on the corpus the gain is model-dependent (see the README). Quantized-only
targets need every tensor quantized; ``--quantize-outputs`` keeps the model's outputs quantized, and a
user's override always wins.
"""

from __future__ import annotations

from dataclasses import dataclass

from onnx import TensorProto

from graph_ir import Graph
from qpasses.core.analyses import Shapes
from qpasses.core.context import PassContext
from qpasses.core.pass_base import Pass, PassResult
from qpasses.passes.fallback.softmax_inputs import activation_product
from qpasses.quant.keep_float import keep_float
from qpasses.quant.plan import COMPUTE, DATA_MOVEMENT, WEIGHTED, fused_intermediates
from qpasses.quant.precision_type import is_float

SHOWN = 5


def quantizes_mac_io_only(target: object) -> bool:
    """A target whose descriptor says only integer MAC kernels' inputs and outputs are quantized."""
    return bool(getattr(target, "mac_io_only", False)) and not getattr(target, "needs_quantized", False)


def mac_written(graph: Graph, fused: dict[str, str]) -> set[str]:
    """Outputs of Conv/ConvTranspose/Gemm/MatMul, and of the Relu/Clip fused into them (``fused``:
    ``fused_intermediates``)."""
    out: set[str] = set()
    for op in graph.ops:
        if op.op_type in WEIGHTED and op.is_standard:
            for name in op.outputs:
                if name:
                    out.add(name)
                    if name in fused:
                        out.add(fused[name])
    return out


def non_mac_activations(graph: Graph, shapes: Shapes, keep_outputs: bool = False) -> list[str]:
    """Float activations (graph inputs, op outputs) no MAC op writes, unless a MAC and another op both
    read them, in graph order; data-movement outputs are left out (they follow their input)."""
    fused = fused_intermediates(graph)
    written = mac_written(graph, fused)
    outputs = set(graph.outputs)

    def is_float(name: str) -> bool:
        t = graph.tensors[name]
        return not t.is_constant and (t.dtype or shapes.dtype(name)) == TensorProto.FLOAT

    found = [n for n in graph.inputs if is_float(n)]
    for op in graph.ops:
        if op.op_type in DATA_MOVEMENT and op.is_standard:
            continue
        found += [n for n in op.outputs if n and n not in written and is_float(n)]

    def float_here(n: str) -> bool:
        mac, other = mac_readers(graph, n)
        # A MAC and another op read it: both must see the same rounding.
        return not (mac and other) and not read_by_float_output_product(graph, n)

    floats = [n for n in found if not (keep_outputs and n in outputs) and float_here(n)]
    # An Add/Sub... fused with the Relu/Clip after it shares that op's quantizer: it follows the Relu's output.
    kept = set(floats)
    return [n for n in floats if n not in fused or fused[n] in kept]


def read_by_float_output_product(graph: Graph, name: str) -> bool:
    """Whether a MatMul of two activations whose output an earlier analysis keeps float (attention scores:
    ``keep-softmax-inputs-float``) reads ``name``, through data movement. onnxruntime runs such a MatMul on
    its 8-bit inputs with a float output (MatMulIntegerToFloat), so its inputs stay quantized."""
    todo, seen = [name], set()
    while todo:
        t = todo.pop()
        seen.add(t)
        for op in graph.consumers(t):
            if activation_product(graph, op):
                out = graph.tensors[op.outputs[0]]
                if "auto_precision" in out.meta and is_float(out):
                    return True
            elif op.op_type in DATA_MOVEMENT and op.inputs and op.inputs[0] == t:
                todo += [o for o in op.outputs if o and o not in seen]
    return False


def mac_readers(graph: Graph, name: str) -> tuple[bool, bool]:
    """(a Conv/ConvTranspose/Gemm/MatMul reads ``name`` as data, something else reads it or it is a graph
    output), both through data movement."""
    todo, seen, mac, other = [name], set(), False, False
    while todo:
        t = todo.pop()
        seen.add(t)
        other = other or graph.is_graph_output(t)
        for op in graph.consumers(t):
            slots = (0, 1) if op.op_type == "MatMul" else (0,)
            if op.op_type in WEIGHTED and any(s < len(op.inputs) and op.inputs[s] == t for s in slots):
                mac = True
            elif op.op_type in DATA_MOVEMENT and op.inputs and op.inputs[0] == t:
                todo += [o for o in op.outputs if o and o not in seen]
            else:
                other = True
    return mac, other


def _read_by_integer_op(graph: Graph, name: str, marked: set[str]) -> bool:
    """Whether an op writing a quantized tensor reads ``name`` (it then quantizes ``name`` itself)."""
    todo = [name]
    while todo:
        for op in graph.consumers(todo.pop()):
            if op.op_type in DATA_MOVEMENT:
                todo += [o for o in op.outputs if o]
            elif op.op_type in COMPUTE and any(o and o not in marked for o in op.outputs):
                return True
    return False


class KeepNonMacActivationsFloat(Pass):
    name = "keep-non-mac-activations-float"
    description = (
        "on targets whose integer kernels are Conv/Gemm/MatMul alone (ort, ort-vnni): keep float every "
        "activation no Conv/Gemm/MatMul reads or writes"
    )
    preserves_semantics = True

    @dataclass
    class Options:
        keep_outputs: bool = False  # --quantize-outputs: the model's outputs stay quantized

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        if not quantizes_mac_io_only(ctx.target):
            return self.result(False)
        names = non_mac_activations(graph, ctx.get(Shapes, graph), self.options.keep_outputs)
        kept = keep_float(graph, names, "no integer MAC kernel writes it", ctx.target)
        marked = set(kept)
        floats = [n for n in kept if not _read_by_integer_op(graph, n, marked)]
        if floats:
            self.remarks.applied(
                f"kept {len(floats)} activations float that no Conv/Gemm/MatMul reads or writes",
                floats[:SHOWN],
                reason="onnxruntime runs only Conv/Gemm/MatMul as integer kernels: a quantizer elsewhere "
                "rounds once more and buys no integer compute",
            )
        return self.result(False)
