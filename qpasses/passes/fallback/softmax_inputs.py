"""The logits a Softmax reads stay float (int16 on quantized-only targets); its probabilities are quantized.

Softmax exponentiates: an absolute error d in one logit multiplies that probability by e^d, however
large the logit. An 8-bit grid over attention logits' range gives d up to half a step, and their
range is wide (khmer_segmenter's three attention layers: [-9.4, 10.1], [-14.0, 19.1], [-10.1, 13.4],
steps 0.08-0.13): every attention weight off by up to 4-7%. The probabilities themselves (0..1, a
step of 1/255) quantize as well as any activation. Measured (W8A8, exact / default session):
khmer_segmenter's CRF tags on 4096 lists 404 / 394 differing from FP32 -> 363 / 357, unidic_tagger
(ALBERT) on 1024 sentences 0.99889 / 0.99887 -> 0.99896 / 0.99908, the integer MAC share unchanged
(onnxruntime still runs the score MatMul on 8-bit inputs, with a float output).

So a Softmax's input stays float, and the Softmax runs in float (an integer Softmax would
re-quantize its input on its own grid: ``with_readers``); the MatMul reading the probabilities
quantizes them itself. The input is followed back through what computes it from the scores without MACs (a
mask Add/Sub/Where, a 1/sqrt(d) scale Mul/Div, data movement), each tensor read only by the next
op, to and including the output of a MatMul of two activations (attention scores: onnxruntime runs
it on its 8-bit inputs with a float output, MatMulIntegerToFloat; on ``ort``, which quantizes only
MACs' inputs and outputs, ``keep-non-mac-activations-float`` leaves those inputs quantized). A layer with
constant weights is left quantized: with a float output onnxruntime runs it in float (PP-OCR rec's
per-position CTC head: 12% of its MACs, and 0.916 -> 0.909 agreement). So is a tensor an earlier
analysis already chose for (a -inf mask's readers stay float32 even on quantized-only targets), and
a Softmax whose probabilities the model returns (``keep-output-heads-float`` decides those). A
Softmax built from primitives (``keep-decomposed-blocks-float`` finds it) counts the same.
LogSoftmax is not included: it subtracts one value per row, so a logit's error stays the same size.
"""

from __future__ import annotations

from onnx import TensorProto

from graph_ir import Graph, Op
from qpasses.core.analyses import Shapes
from qpasses.core.context import PassContext
from qpasses.core.pass_base import Pass, PassResult
from qpasses.passes.fallback.block_patterns import find_blocks
from qpasses.quant.keep_float import keep_float, kept_precision, with_readers

COPIES = frozenset({"Cast"})  # besides data movement: the same values (a float->float Cast)
MASKS = frozenset({"Add", "Sub"})  # either operand may carry the scores (a mask or a bias on the other)
SCALES = frozenset({"Mul", "Div"})  # by a constant: 1/sqrt(d), a temperature
SHOWN = 5


def _data_inputs(graph: Graph, op_type: str, inputs: list[str]) -> list[str] | None:
    """The inputs of a mask/scale op that carry the scores (None: not such an op)."""
    from qpasses.quant.plan import DATA_MOVEMENT

    variable = [n for n in inputs if n and not graph.tensors[n].is_constant]
    if op_type in DATA_MOVEMENT or op_type in COPIES:
        return [inputs[0]] if inputs and inputs[0] in variable else []
    if op_type in MASKS:
        return variable
    if op_type in SCALES:  # a product of two activations (a gate) is not a scale
        return variable if len(variable) == 1 and (op_type == "Mul" or variable[0] == inputs[0]) else None
    if op_type == "Where":
        return [n for n in inputs[1:] if n in variable]
    return None


def activation_product(graph: Graph, op: Op) -> bool:
    """A MatMul of two activations (attention scores): onnxruntime keeps its 8-bit inputs with a float output."""
    return op.op_type == "MatMul" and not any(graph.tensors[n].is_constant for n in op.inputs if n)


def logit_chain(graph: Graph, name: str) -> list[str]:
    """``name`` and the float tensors it is computed from without MACs, each read by one op, back to and
    including the output of a MatMul of two activations. A tensor another MAC op writes is left out
    (with a float output it runs in float)."""
    from qpasses.quant.plan import WEIGHTED

    out: dict[str, None] = {}
    todo = [name]
    while todo:
        n = todo.pop()
        t = graph.tensors[n]
        if n in out or t.is_constant or t.dtype not in (TensorProto.FLOAT, 0):
            continue
        op = graph.producer(n)
        if op is not None and op.op_type in WEIGHTED and not activation_product(graph, op):
            continue
        out[n] = None
        if op is None or op.op_type in WEIGHTED or not op.is_standard:
            continue
        for data in _data_inputs(graph, op.op_type, list(op.inputs)) or []:
            if len(graph.consumers(data)) == 1:  # a tensor other ops read too keeps its own grid
                todo.append(data)
    return list(out)


def _returned(graph: Graph, name: str) -> bool:
    """Whether the model returns ``name`` (through data movement)."""
    from qpasses.quant.plan import DATA_MOVEMENT

    todo, seen = [name], set()
    while todo:
        n = todo.pop()
        if graph.is_graph_output(n):
            return True
        seen.add(n)
        for op in graph.consumers(n):
            if op.op_type in DATA_MOVEMENT or op.op_type in COPIES:
                todo += [o for o in op.outputs if o and o not in seen]
    return False


def softmax_inputs(graph: Graph, shapes: Shapes) -> list[str]:
    """The input of every Softmax op and decomposed Softmax block whose probabilities the model does not
    return, in graph order."""
    found = {op.inputs[0]: op.outputs[0] for op in graph.ops if op.op_type == "Softmax" and op.inputs and op.inputs[0]}
    for block in find_blocks(graph, shapes)[0]:
        if block.kind == "Softmax":
            found[block.x] = block.y
    return [x for x, y in found.items() if not _returned(graph, y)]


class KeepSoftmaxInputsFloat(Pass):
    name = "keep-softmax-inputs-float"
    description = (
        "keep the logits each Softmax reads (back through mask/scale ops to the score MatMul) float "
        "(int16 on quantized-only targets): exp turns a logit's rounding into a relative error"
    )
    preserves_semantics = True

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        def unchosen(name: str) -> bool:  # an earlier analysis's choice stands (a -inf mask's readers: float32)
            return "auto_precision" not in graph.tensors[name].meta

        inputs = softmax_inputs(graph, ctx.get(Shapes, graph))
        chains = {n: [t for t in logit_chain(graph, n) if unchosen(t)] for n in inputs}
        names = with_readers(graph, [t for chain in chains.values() for t in chain])
        kept = keep_float(
            graph,
            [n for n in names if unchosen(n)],
            "a Softmax's logits (exp turns their rounding into a relative error)",
            ctx.target,
        )
        if kept:
            shown = [n for n in inputs if chains[n]][:SHOWN]
            count = sum(1 for c in chains.values() if c)
            self.remarks.applied(
                f"kept the logits of {count} Softmax op{'s' if count > 1 else ''} in "
                f"{kept_precision(ctx.target)} ({len(kept)} tensors)",
                shown,
                reason="an absolute rounding error d in a logit multiplies its probability by e^d; "
                "the probabilities stay quantized",
            )
        return self.result(False)
