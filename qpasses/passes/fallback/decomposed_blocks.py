"""Normalizations and activations built from primitive ops keep their insides out of 8 bits.

Exporters write LayerNorm, RMSNorm, GELU, Softmax and HardSwish as chains of ReduceMean/Pow/Sqrt/
Erf/Tanh/Exp/Clip. The tensors inside have ranges no 8-bit grid holds: a LayerNorm variance spans
1e-4..1e5 across tokens, GELU's x^3 reaches thousands, a softmax denominator 1..N. Quantizing them
collapses the model (a real file-type classifier: 2-4% top-1 agreement in onnxruntime's quantizer
and AIMET alike), while the block's input and output quantize as well as any activation.

Each block is matched with the anchored pattern matcher (``qpasses.core.patterns``) along its one-reader
spine; the side links (``Sub(x, ReduceMean(x))``, the ``x`` a GELU multiplies by, ``Div(e, sum)``)
and the constants (epsilon small, 0.5, 0.044715, sqrt(2/pi), 1/sqrt(2), 3, 6, within a relative
1e-3) are checked by the pattern's ``check``. The internal tensors then stay float (int16 on
quantized-only targets, see ``qpasses.quant.keep_float``), with their readers (``with_readers``): the op
writing the block's output runs float too, or it would re-quantize the last internals on their own
range (a Softmax's sum, a LayerNorm's standard deviation). The output is still quantized where int
ops read it, and the input where it is produced: the block's boundaries stay on the 8-bit grid.

With ``fuse=True``, where the model's opset has the op (LayerNormalization 17, Gelu 20,
RMSNormalization 23, Softmax 13, HardSwish 14) and the constants are the op's own (relative 1e-5),
the block is replaced by that single op instead, as QNN's converter does; otherwise it is kept float.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from onnx import TensorProto

from graph_ir import Graph, Op
from qpasses.core.analyses import Shapes
from qpasses.core.context import PassContext
from qpasses.core.pass_base import Pass, PassResult
from qpasses.passes.fallback.block_matching import Block, tensor_rank
from qpasses.passes.fallback.block_patterns import find_blocks
from qpasses.quant.keep_float import keep_float, kept_precision, with_readers

FUSE_RTOL = 1e-5  # a fused op computes with its own constants: only float rounding may differ
SHOWN_BLOCKS = 5  # blocks whose ops a remark lists

# Op fused in place of each block, with the opset that introduced it.
FUSED_OP = {
    "LayerNorm": ("LayerNormalization", 17),
    "RMSNorm": ("RMSNormalization", 23),
    "GELU(erf)": ("Gelu", 20),
    "GELU(tanh)": ("Gelu", 20),
    "Softmax": ("Softmax", 13),
    "HardSwish": ("HardSwish", 14),
}


@dataclass
# --- fusion -----------------------------------------------------------------------------------------


@dataclass
class _Fusion:
    op_type: str
    inputs: list[str | np.ndarray]  # arrays become new initializers
    attributes: dict[str, Any]
    ops: list[Op]  # the ops replaced (the block's, or all but a trailing Add it cannot absorb)
    output: str


def _normalized_param(graph: Graph, name: str | None, shape: tuple[int, ...], fill: float) -> np.ndarray | str:
    """gamma/beta as an array of the normalized shape (what LayerNormalization's Scale/B must be)."""
    if name is None:
        return np.full(shape, fill, np.float32)
    data = graph.tensors[name].data
    if data is None:
        return f"{name} has no data"
    data = np.asarray(data, np.float32)
    extra = data.ndim - len(shape)
    if extra > 0:
        if any(d != 1 for d in data.shape[:extra]):
            return f"{name} {data.shape} varies outside the normalized axes"
        data = data.reshape(data.shape[extra:])
    try:
        return np.ascontiguousarray(np.broadcast_to(data, shape))
    except ValueError:
        return f"{name} {data.shape} does not broadcast to the normalized shape {shape}"


def _fuse_norm(graph: Graph, block: Block, shapes: Shapes) -> _Fusion | str:
    shape = shapes.shape(block.x)
    if shape is None:
        return f"the rank of {block.x} is unknown"
    rank, axes = len(shape), block.params["axes"]
    normalized = list(range(rank)) if axes is None else sorted(a % rank for a in axes)
    if normalized != list(range(rank - len(normalized), rank)):
        return f"it normalizes axes {list(axes)}, not the trailing ones"
    axis = rank - len(normalized)
    dims = tuple(shape[axis:])
    if not all(isinstance(d, int) and d > 0 for d in dims):
        return f"the normalized shape {dims} of {block.x} is not static"
    gamma = _normalized_param(graph, block.params["gamma"], dims, 1.0)
    if isinstance(gamma, str):
        return gamma
    attrs = {"axis": axis - rank, "epsilon": float(block.params["eps"])}
    if block.kind == "RMSNorm":
        shift = block.params["shift"]
        ops = [op for op in block.ops if op is not shift]
        output = shift.inputs[0] if shift is not None else block.y  # a trailing bias Add stays as it is
        return _Fusion("RMSNormalization", [block.x, gamma], attrs, ops, output)
    inputs: list[str | np.ndarray] = [block.x, gamma]
    if block.params["beta"] is not None:
        beta = _normalized_param(graph, block.params["beta"], dims, 0.0)
        if isinstance(beta, str):
            return beta
        inputs.append(beta)
    return _Fusion("LayerNormalization", inputs, attrs, block.ops, block.y)


def _fuse_softmax(graph: Graph, block: Block, shapes: Shapes) -> _Fusion | str:
    axes = block.params["axes"]
    rank = tensor_rank(graph, shapes, block.x)
    if axes is None and rank == 1:
        axes = (0,)
    if axes is None or len(axes) != 1:
        return "it sums over several axes (Softmax takes one)"
    return _Fusion("Softmax", [block.x], {"axis": axes[0]}, block.ops, block.y)


def _fusion(graph: Graph, block: Block, shapes: Shapes) -> _Fusion | str:
    op_type, since = FUSED_OP[block.kind]
    opset = graph.opset()
    if opset < since:
        return f"{op_type} needs opset {since}, the model has {opset}"
    for what, found, exact in block.constants:
        if not abs(found - exact) <= FUSE_RTOL * abs(exact):  # NaN (never checked) is not exact
            return f"its constant {found:.8g} is not {op_type}'s {what} ({exact:.8g}): fusing would change outputs"
    if (shapes.dtype(block.x) or graph.tensors[block.x].dtype) != TensorProto.FLOAT:
        return f"{block.x} is not float32"
    if block.kind in ("LayerNorm", "RMSNorm"):
        return _fuse_norm(graph, block, shapes)
    if block.kind == "Softmax":
        return _fuse_softmax(graph, block, shapes)
    if block.kind.startswith("GELU"):
        return _Fusion("Gelu", [block.x], {"approximate": block.params["approximate"]}, block.ops, block.y)
    return _Fusion(op_type, [block.x], {}, block.ops, block.y)


def _replace(graph: Graph, fusion: _Fusion) -> Op:
    """Swap the block's ops for the fused op (writing the same output tensor); drop orphaned constants."""
    names = [op.name for op in fusion.ops]
    prefix = names[0][: len(_common_prefix(names))]
    prefix = prefix[: prefix.rfind("/") + 1]
    written = {o for op in fusion.ops for o in op.outputs}
    read = [n for op in fusion.ops for n in op.inputs if n and n not in written]
    for op in reversed(fusion.ops):
        graph.remove_op(op)
    op_name = graph.unique_name(prefix + fusion.op_type)
    inputs = [
        graph.add_initializer(graph.unique_name(f"{op_name}_{i}"), v).name if isinstance(v, np.ndarray) else v
        for i, v in enumerate(fusion.inputs)
    ]
    fused = graph.add_op(fusion.op_type, inputs, [fusion.output], name=op_name, attributes=fusion.attributes)
    for name in dict.fromkeys(read):
        if name not in graph.tensors or graph.uses(name) or graph.is_graph_output(name) or name in graph.inputs:
            continue
        producer = graph.producer(name)
        if producer is not None and producer.op_type == "Constant":
            graph.remove_op(producer)
        elif graph.tensors[name].initializer is not None:
            graph.remove_tensor(name)
    return fused


def _common_prefix(names: list[str]) -> str:
    first, last = min(names), max(names)
    i = 0
    while i < min(len(first), len(last)) and first[i] == last[i]:
        i += 1
    return first[:i]


# --- the pass ---------------------------------------------------------------------------------------


class KeepDecomposedBlocksFloat(Pass):
    name = "keep-decomposed-blocks-float"
    description = (
        "keep the insides of LayerNorm/RMSNorm/GELU/Softmax/HardSwish built from primitive ops float "
        "(int16 on quantized-only targets), or fuse them into the ONNX op (fuse=true)"
    )
    preserves_semantics = True

    @dataclass
    class Options:
        fuse: bool = False

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        shapes = ctx.get(Shapes, graph)
        blocks, misses = find_blocks(graph, shapes)
        kept: dict[str, list[Block]] = {}
        fused: dict[str, list[str]] = {}
        unfused: dict[tuple[str, str], list[Block]] = {}
        for block in blocks:
            if self.options.fuse:
                fusion = _fusion(graph, block, shapes)
                if not isinstance(fusion, str):
                    fused.setdefault(f"{block.kind} -> {fusion.op_type}", []).append(_replace(graph, fusion).name)
                    continue
                unfused.setdefault((block.kind, fusion), []).append(block)
            # The op reading the last internals (writing y) runs float too, or it would re-quantize them.
            if keep_float(graph, with_readers(graph, block.internals), f"inside a decomposed {block.kind}", ctx.target):
                kept.setdefault(block.kind, []).append(block)
        precision = kept_precision(ctx.target)
        for kind, found in kept.items():
            shown = found[:SHOWN_BLOCKS]
            more = len(found) - len(shown)
            inputs = ", ".join(b.x for b in shown) + (f" and {more} more" if more else "")
            self.remarks.applied(
                f"kept {len(found)} decomposed {kind} block{'s' if len(found) > 1 else ''} in {precision} "
                f"(inputs {inputs})",
                [op.name for b in shown for op in b.ops],
                reason="its internal ranges (variances, x^3, exp sums) collapse on an 8-bit grid; "
                "the block's input and output stay quantized",
            )
        for what, names in fused.items():
            self.remarks.applied(f"fused {len(names)} decomposed {what}", names[:10])
        for (kind, why), found in unfused.items():
            self.remarks.missed(
                f"{len(found)} decomposed {kind} block{'s' if len(found) > 1 else ''} not fused"
                + (f", kept in {precision}" if precision is not None else ""),
                [b.ops[-1].name for b in found[:10]],
                reason=why,
            )
        for miss in misses:
            self.remarks.missed(f"not a decomposed block ({miss.pattern.name})", miss.names, reason=miss.reason)
        return self.result(bool(fused))
