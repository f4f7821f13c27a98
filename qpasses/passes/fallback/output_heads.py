"""What the model returns stays float: its outputs, back through the ops without MACs that write
them, to a head on pooled features (the final Gemm, or MatMul on 2-D input) included.

An 8-bit encoding of an output is fitted to the calibration data, so it clips whatever the
calibration never showed: DNSMOS's MOS output (its final MatMul + bias) got the range of its 8
calibration clips (at most 2.84) and a clean clip scoring 4.19 came out 2.84 (MOS MAE 0.135; with
its head float 0.047, the weights-only ceiling 0.023). A probability loses up to 1/510 to rounding
whatever the rest of the model does (open_nsfw: P(nsfw) MAE 0.0027 -> 0.0020). What keeping these
float costs: the ops after the last linear layer have no MACs (a bias Add, a scale, Softmax,
Sigmoid, data movement), and a head on pooled features computes once per sample (an op is
all-float or all-integer, so it runs in float: digits 0.1%, open_nsfw 0.02% of the MACs). So those
tensors stay float32; on a target that runs only integer kernels, int16 where it has 16-bit activation
kernels (htp: open_nsfw 0.0027 -> 0.0020, dnsmos_p808 0.0088 -> 0.0073 MOS MAE), else they are quantized
on its grids (hta, dsp: the spec's default). A head that a Conv or a
MatMul applied per position writes (PP-OCR's CTC head: 12% of its MACs) stays quantized; only a
Softmax/Sigmoid output after it is kept. Unless its weight is under 1% of the model's Conv/Gemm/MatMul
weights (khmer_segmenter's CRF emissions: a 192x2 MatMul, 0.03%): then it is a few MACs per position
too, and the two roundings it would add (its 8-bit output, the output's grid) cost the model 1 dB
of output SQNR. NNCF leaves graph outputs unquantized too.
``quantize_model(..., quantize_outputs=True)`` / ``--quantize-outputs`` leaves this pass out.
"""

from __future__ import annotations

from graph_ir import Graph, Op
from qpasses.core.analyses import Shapes
from qpasses.core.context import PassContext
from qpasses.core.pass_base import Pass, PassResult
from qpasses.passes.fallback.layer_size import small_layer
from qpasses.quant.keep_float import keep_float, kept_precision

PROBABILITY_OPS = frozenset({"Softmax", "Sigmoid"})
CONSTANT_OPERAND_OPS = frozenset({"Add", "Sub", "Mul", "Div"})  # a bias, a scale
FLOAT_OUTPUT_LINEAR = frozenset({"MatMul", "Gemm"})


def _per_sample(op: Op, shapes: Shapes) -> bool:
    """A Gemm, or a MatMul on 2-D input: a head on pooled features, computed once per sample."""
    if op.op_type == "Gemm":
        return True
    shape = shapes.shape(op.inputs[0]) if op.inputs else None
    return shape is not None and len(shape) == 2


def returned_chain(graph: Graph, name: str) -> tuple[list[str], int, Op | None]:
    """What the model returns as ``name``: (``name`` and the tensors back from it through data movement,
    Softmax/Sigmoid and bias/scale ops (Add/Sub/Mul/Div with a constant), each read only by the next; how
    many of them reach down to the last Softmax/Sigmoid output; the op writing the last one, None for an
    input). The chain stops at a MatMul/Gemm, whose output it includes."""
    from qpasses.quant.plan import DATA_MOVEMENT

    chain = [name]
    probability = 0
    op = graph.producer(name)
    while op is not None and op.is_standard and op.op_type not in FLOAT_OUTPUT_LINEAR:
        if op.op_type in DATA_MOVEMENT or op.op_type in PROBABILITY_OPS:
            data = [op.inputs[0]] if op.inputs and op.inputs[0] else []
        elif op.op_type in CONSTANT_OPERAND_OPS and len(op.inputs) == 2:
            data = [i for i in op.inputs if i and not graph.tensors[i].is_constant]
        else:
            break
        if op.op_type in PROBABILITY_OPS:
            probability = len(chain)
        if len(data) != 1 or len(graph.uses(data[0])) != 1 or graph.tensors[data[0]].is_constant:
            break
        chain.append(data[0])
        op = graph.producer(data[0])
    return chain, probability, op


def returned_linears(graph: Graph) -> set[str]:
    """Names of the MatMul/Gemm ops whose result the model returns (``returned_chain`` ends on them)."""
    found = set()
    for name in graph.outputs:
        if not graph.tensors[name].is_constant:
            op = returned_chain(graph, name)[2]
            if op is not None and op.is_standard and op.op_type in FLOAT_OUTPUT_LINEAR:
                found.add(op.name)
    return found


def output_heads(graph: Graph, shapes: Shapes) -> list[list[str]]:
    """Per graph output: its ``returned_chain`` to and including the output of a Gemm or of a MatMul on
    2-D input (a head on pooled features: a few MACs per sample) or with a small weight. When another op
    writes the chain (a Conv, a per-position MatMul), only a probability output is kept: the tensors down
    to the Softmax/Sigmoid output. Outputs of anything else: none (a Conv with a float output would run in
    float)."""
    found = []
    for name in graph.outputs:
        if graph.tensors[name].is_constant:
            continue
        chain, probability, op = returned_chain(graph, name)
        head = (
            op is not None
            and op.is_standard
            and op.op_type in FLOAT_OUTPUT_LINEAR
            and (_per_sample(op, shapes) or small_layer(graph, op))
        )
        kept = chain if head else chain[:probability]
        if kept:
            found.append(kept)
    return found


class KeepOutputHeadsFloat(Pass):
    name = "keep-output-heads-float"
    description = "keep what the model returns float: outputs, back through ops without MACs to a pooled head"
    preserves_semantics = True
    uses = (Shapes,)

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        if kept_precision(ctx.target) is None:  # a quantized-only target with nothing above 8 bits
            self.remarks.missed(
                "outputs quantized",
                reason="the target runs only integer kernels, none above 8 bits: its outputs are quantized",
            )
            return self.result(False)
        for chain in output_heads(graph, ctx.get(Shapes, graph)):
            marked = keep_float(graph, chain, "what the model returns", ctx.target)
            if marked:
                self.remarks.applied(
                    f"kept output '{chain[0]}' in {kept_precision(ctx.target)}"
                    + (f" back to '{chain[-1]}'" if len(chain) > 1 else ""),
                    marked[:10],
                    reason="an output's 8-bit grid clips values the calibration data never reached and rounds "
                    "every probability; a head on pooled features is a few MACs per sample "
                    "(--quantize-outputs quantizes it)",
                )
        return self.result(False)
