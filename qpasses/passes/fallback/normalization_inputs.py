"""A normalization runs in float: its input (a transformer's residual stream) and its output.

The tensor a LayerNorm reads is the residual stream: the sum of every earlier block's output, whose
few outlier channels (often 10-100x the rest) set an 8-bit scale that leaves the other channels a
handful of levels. Quantizing it buys no integer compute: onnxruntime has no integer LayerNorm (or
RMSNorm, GroupNorm, InstanceNorm) kernel, so the Q/DQ pair on its input only adds noise, and the
residual Add that writes it has no MACs. Measured on the corpus (W8A8 agreement with FP32, exact
semantics): khmer_segmenter 0.99840 -> 0.99872, unidic_tagger 0.99813 -> 0.99870 (weights-only
0.99975 / 0.99899), the integer MAC share unchanged at 100%.

So the data input of every normalization op (LayerNormalization, RMSNormalization, GroupNormalization,
InstanceNormalization, onnxruntime's SimplifiedLayerNormalization / SkipLayerNormalization) and of
every LayerNorm/RMSNorm built from primitives (``keep-decomposed-blocks-float`` finds those) stays
float (int16 on quantized-only targets), with the outputs of the ops reading it (``with_readers``:
the normalization itself, or an int op would re-quantize its input): the skip connection that adds
the normalized tensor to the next block's output stays float, and the MatMuls reading it quantize it
themselves. An input written by a Conv/MatMul/Gemm (through data movement) is left quantized: a MAC
op with a float output runs in float.
"""

from __future__ import annotations

from graph_ir import Graph
from qpasses.core.analyses import Shapes
from qpasses.core.context import PassContext
from qpasses.core.pass_base import Pass, PassResult
from qpasses.passes.fallback.block_patterns import find_blocks
from qpasses.quant.keep_float import keep_float, kept_precision, with_readers

NORMALIZATIONS = frozenset(
    {
        "LayerNormalization",
        "RMSNormalization",
        "GroupNormalization",
        "InstanceNormalization",
        "SimplifiedLayerNormalization",
        "SkipLayerNormalization",
        "SkipSimplifiedLayerNormalization",
    }
)
DECOMPOSED_NORMS = frozenset({"LayerNorm", "RMSNorm"})
SHOWN = 5


def normalization_inputs(graph: Graph, shapes: Shapes) -> list[str]:
    """The float data inputs of normalization ops and decomposed LayerNorm/RMSNorm blocks, in graph order."""
    found: dict[str, None] = {}
    for op in graph.ops:
        if op.op_type not in NORMALIZATIONS:
            continue
        # SkipLayerNormalization adds its skip input first: both operands are the stream.
        count = 2 if op.op_type.startswith("Skip") else 1
        for name in op.inputs[:count]:
            if name:
                found[name] = None
    for block in find_blocks(graph, shapes)[0]:
        if block.kind in DECOMPOSED_NORMS:
            found[block.x] = None
    return [n for n in found if not graph.tensors[n].is_constant]


def written_by_mac(graph: Graph, name: str) -> bool:
    """Whether a Conv/MatMul/Gemm writes ``name`` (through data movement ops)."""
    from qpasses.quant.plan import DATA_MOVEMENT, WEIGHTED

    op = graph.producer(name)
    while op is not None and op.op_type in DATA_MOVEMENT and op.inputs and op.inputs[0]:
        op = graph.producer(op.inputs[0])
    return op is not None and op.op_type in WEIGHTED


class KeepNormalizationInputsFloat(Pass):
    name = "keep-normalization-inputs-float"
    description = (
        "keep the input of each normalization (LayerNorm/RMSNorm/GroupNorm/InstanceNorm, fused or from "
        "primitives: a transformer's residual stream) float (int16 on quantized-only targets)"
    )
    preserves_semantics = True

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        candidates = normalization_inputs(graph, ctx.get(Shapes, graph))
        skipped = [n for n in candidates if written_by_mac(graph, n)]
        inputs = [n for n in candidates if n not in skipped]
        kept = keep_float(
            graph,
            with_readers(graph, inputs),
            "a normalization's input (residual stream)",
            ctx.target,
        )
        if kept:
            self.remarks.applied(
                f"kept {len(inputs)} normalization inputs and outputs in {kept_precision(ctx.target)}",
                inputs[:SHOWN],
                reason="a residual stream's outlier channels set an 8-bit scale that leaves the rest a few "
                "levels, and no integer normalization kernel reads it",
            )
        if skipped:
            self.remarks.missed(
                f"{len(skipped)} normalization inputs left quantized",
                skipped[:SHOWN],
                reason="a Conv/MatMul/Gemm writes them: with a float output it would run in float",
            )
        return self.result(False)
