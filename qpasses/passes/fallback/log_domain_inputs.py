"""Inputs of ops singular near zero (Log, Reciprocal, Div by data, negative Pow) stay float.

``Log`` of a quantized power spectrum: every power below one quantization step rounds to 0 and
``log(0)`` is -inf (or the epsilon floor), so the log-power front end of an audio model collapses
(DNSMOS: MOS MAE 0.85, also at 16-bit activations). An absolute error that is harmless elsewhere is
unbounded relative error next to a singularity. So the data input of such an op stays float, back
through the elementwise ops that compute it from a magnitude (Max/Min/Clip floors, Pow, Sqrt,
squares, sums, Abs, data movement) to the first op that is not one of them, and so does the op's
output (its integer reader would re-quantize it on its own range: ``with_readers``).

A Log's output is a ratio scale too: log features (a log-power spectrogram, scaled and moved to the
layer reading them) put an 8-bit grid over decades, so one step is a fixed share of the power
(DNSMOS: log10 power over [-10.3, 2.05], a step of 0.048, 11.7% of the power) and every
time-frequency bin reaches the first layer off by up to half of that. They stay float (int16 on a
target with 16-bit activations) up to and including the input of the layer reading them, when that
layer is small (``layer_size.small_layer``: a front-end filter): DNSMOS MOS MAE 0.040 -> 0.022 on its
32 test clips (weights-only 0.017), its first Conv (0.9% of the MACs) then running in float.
"""

from __future__ import annotations

import numpy as np

from graph_ir import Graph, Op
from qpasses.core.context import PassContext
from qpasses.core.pass_base import Pass, PassResult
from qpasses.passes.fallback.layer_size import small_layer
from qpasses.passes.fallback.output_heads import CONSTANT_OPERAND_OPS
from qpasses.quant.keep_float import FLOAT32, keep_float, kept_precision, with_readers

# Elementwise ops through which a value near zero reaches the singular op: its inputs are kept too.
MAGNITUDE = frozenset(
    {
        "Max",
        "Min",
        "Clip",
        "Pow",
        "Sqrt",
        "Mul",
        "Add",
        "Abs",
        "Relu",
        "ReduceSum",
        "ReduceSumSquare",
        "ReduceMean",
        "ReduceL2",
    }
)
# Copies of the values (Concat is not data movement for the quantization plan, but is here).
COPIES = frozenset({"Concat"})
LINEAR = frozenset({"Conv", "MatMul", "Gemm", "ConvTranspose"})


def _constant(graph: Graph, name: str) -> np.ndarray | None:
    t = graph.tensors.get(name)
    return t.data if t is not None and t.is_constant else None


# Divisors that normalizations compute (std = Sqrt(var + eps), softmax sums): never near zero.
NORMALIZERS = frozenset({"Sqrt", "ReduceSum", "ReduceMean", "ReduceL2"})


def singular_inputs(graph: Graph) -> list[tuple]:
    """(op, data input) of every op whose result blows up as that input nears zero."""
    found = []
    for op in graph.ops:
        ins = [n for n in op.inputs if n]
        if not ins:
            continue
        if op.op_type == "Log":
            data = ins[0]
        elif op.op_type == "Reciprocal":
            divisor = graph.producer(ins[0])
            if divisor is not None and divisor.op_type in NORMALIZERS:
                continue  # 1 / std of a normalization: bounded away from 0
            data = ins[0]
        elif op.op_type == "Div" and len(ins) == 2 and _constant(graph, ins[1]) is None:
            divisor = graph.producer(ins[1])
            if divisor is not None and divisor.op_type in NORMALIZERS:
                continue  # a norm's std / a softmax's sum: bounded away from 0, keep-decomposed-blocks' domain
            data = ins[1]
        elif op.op_type == "Pow" and len(ins) == 2:
            exp = _constant(graph, ins[1])
            if exp is None or not exp.size or not (np.asarray(exp) < 0).any():
                continue
            data = ins[0]
        else:
            continue
        if not graph.tensors[data].is_constant:
            found.append((op, data))
    return found


def magnitude_chain(graph: Graph, name: str) -> list[str]:
    """``name`` and, back through MAGNITUDE ops and data movement, the tensors it is computed from.
    One linear op (Conv/MatMul/Gemm: an STFT or filter bank) is crossed too: a quiet input quantized
    to 0 gives an exactly-zero spectrum, the same singularity; past it only data movement is
    followed (back to the raw input), so a deep network before a Log is not kept float."""
    from qpasses.quant.plan import DATA_MOVEMENT

    out: dict[str, None] = {}
    todo = [(name, True)]
    while todo:
        n, linear_left = todo.pop()
        if n in out or graph.tensors[n].is_constant:
            continue
        out[n] = None
        op = graph.producer(n)
        if op is None:
            continue
        if op.op_type in DATA_MOVEMENT or op.op_type in COPIES or (linear_left and op.op_type in MAGNITUDE):
            todo += [(i, linear_left) for i in op.inputs if i]
        elif linear_left and op.op_type in LINEAR:
            todo += [(i, False) for i in op.inputs if i]
    return list(out)


def log_features(graph: Graph, log: Op) -> tuple[list[str], list[Op]]:
    """The Log's output and, forward through shifts/scales by constants and data movement, the tensors
    computed from it alone (still log values); and the ops that read them otherwise (their readers)."""
    from qpasses.quant.plan import DATA_MOVEMENT

    names: dict[str, None] = {}
    readers: dict[int, Op] = {}
    todo = [o for o in log.outputs if o]
    while todo:
        n = todo.pop()
        if n in names:
            continue
        names[n] = None
        for op in graph.consumers(n):
            others = [i for i in op.inputs if i and i != n]
            affine = (
                op.op_type in CONSTANT_OPERAND_OPS  # a shift or scale by a constant: still a log value
                and len(op.inputs) == 2
                and all(_constant(graph, i) is not None for i in others)
                and not (op.op_type == "Div" and op.inputs[1] == n)  # c / log: a reciprocal
            )
            if op.op_type in DATA_MOVEMENT or affine:
                todo += [o for o in op.outputs if o]
            else:
                readers[id(op)] = op
    return list(names), list(readers.values())


class KeepLogDomainInputsFloat(Pass):
    name = "keep-log-domain-inputs-float"
    description = "keep the data inputs of Log/Reciprocal/Div/negative Pow float: singular near zero"
    preserves_semantics = True

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        for op, data in singular_inputs(graph):
            names = [*magnitude_chain(graph, data), *with_readers(graph, [o for o in op.outputs if o])]
            marked = keep_float(graph, names, f"input of {op.op_type} (singular near zero)", ctx.target)
            if marked:
                self.remarks.applied(
                    f"kept {len(marked)} tensors around {op.op_type} '{op.name}' float",
                    marked[:10],
                    reason=f"{op.op_type} is singular at 0: values below one quantization "
                    "step round to 0 and come out -inf/huge (log-power, 1/x)",
                )
            if op.op_type == "Log":
                self._log_features(graph, ctx, op)
        return self.result(False)

    def _log_features(self, graph: Graph, ctx: PassContext, log: Op) -> None:
        features, readers = log_features(graph, log)
        layers = [r for r in readers if r.op_type in LINEAR]
        large = [r.name for r in layers if not small_layer(graph, r)]  # a MatMul of two activations counts as large
        if large:
            self.remarks.missed(
                f"log features of '{log.name}' quantized",
                large,
                reason="the layers reading them hold 1% or more of the model's weights (or multiply two activations): "
                "float features would run them in float",
            )
            return
        # Where float runs, the readers' outputs too (``with_readers``): the layer then runs in float instead of
        # re-quantizing them. On an integer-only target it reads the int16 features and writes its own grid.
        if kept_precision(ctx.target) == FLOAT32:
            features = with_readers(graph, features)
        # The Log's output and its readers' were kept above, as the singular op's; mark only the rest here.
        features = [n for n in features if "auto_precision" not in graph.tensors[n].meta]
        reason = f"log features of {log.name} (8-bit steps are shares of the power)"
        marked = keep_float(graph, features, reason, ctx.target)
        if marked:
            self.remarks.applied(
                f"kept {len(marked)} log-feature tensors of '{log.name}' float",
                marked[:10],
                reason="a log value's 8-bit step is a fixed share of what it measures (a power spectrum: "
                "decades over 256 levels); the small layers reading them "
                f"({', '.join(r.name for r in layers) or 'no Conv/Gemm/MatMul'}) run on them unrounded",
            )
