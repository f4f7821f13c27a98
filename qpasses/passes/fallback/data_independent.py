"""Tensors computed only from shapes and constants are never quantized.

Detectors build anchor grids and strides from ``Shape -> Range -> ... -> Cast`` arithmetic;
transformers build position ids and masks the same way. None of it depends on the input's
values, so calibration sees one value per run and 8 bits only add error (YOLOv8: 15 Q/DQ pairs on
its grid). When every graph input has a static shape the tensors are constant-folded (onnxruntime
evaluates them once); either way they, and the ops where they meet data, stay float.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper

from graph_ir import Graph
from qpasses.core import verification
from qpasses.core.analyses import Shapes
from qpasses.core.context import PassContext
from qpasses.core.pass_base import Pass, PassResult
from qpasses.quant.keep_float import keep_float

# Ops whose output depends on the input's shape, not its values.
SHAPE_OF = frozenset({"Shape", "Size"})
# Quantization ops of an already-quantized model: their constant inputs are weights, not shape
# arithmetic, and folding them would undo the quantization.
QUANT_OPS = frozenset({"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"})
# Ops with no data inputs whose values still change from run to run.
RANDOM = frozenset(
    {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli"}
)
_FLOATS = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16)


def data_independent(graph: Graph) -> set[str]:
    """Computed (non-constant) tensors that no graph input's values reach."""
    dependent = {n for n in graph.inputs if not graph.tensors[n].is_constant}
    independent: set[str] = set()
    for op in graph.topological_order():
        outs = [o for o in op.outputs if o]
        if op.op_type == "Constant":
            continue
        reads = [n for n in [*op.inputs, *op.captures] if n]
        if op.op_type in SHAPE_OF and op.is_standard:
            independent.update(outs)
        elif (
            any(n in dependent for n in reads)
            or op.subgraphs
            or not op.is_standard
            or op.op_type in RANDOM
            or op.op_type in QUANT_OPS
        ):
            dependent.update(outs)
        else:
            independent.update(outs)
    return independent


def _static_inputs(graph: Graph) -> dict[str, np.ndarray] | None:
    feeds: dict[str, np.ndarray] = {}
    for name in graph.inputs:
        t = graph.tensors[name]
        if t.is_constant:
            continue
        shape = t.static_shape
        if shape is None or not all(d > 0 for d in shape):
            return None
        feeds[name] = np.zeros(shape, helper.tensor_dtype_to_np_dtype(t.dtype))
    return feeds


class KeepDataIndependentFloat(Pass):
    name = "keep-data-independent-float"
    modifies_values = True  # constant folding (graph edits): statistics measured before do not hold after
    description = "constant-fold shape/constant arithmetic when shapes are static; keep it and its uses float"
    preserves_semantics = True

    @dataclass
    class Options:
        fold: bool = True

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        independent = data_independent(graph)
        if not independent:
            return self.result(False)
        # The frontier: independent tensors read by data-dependent ops or leaving the graph.
        frontier = sorted(
            n
            for n in independent
            if graph.is_graph_output(n) or any(not set(op.outputs) <= independent for op in graph.consumers(n))
        )
        folded: dict[str, str] = {}
        if self.options.fold and frontier:
            folded = self._fold(graph, frontier)
        shapes = ctx.get(Shapes, graph)

        def is_float(name: str) -> bool:
            return (graph.tensors[name].dtype or shapes.dtype(name)) in _FLOATS

        remaining = independent & set(graph.tensors)
        floats = [n for n in [*folded.values(), *sorted(remaining)] if is_float(n)]
        # Where they meet data: the op runs float (a constant marked float makes its op float by the
        # spec's rule; an activation input needs the op's output marked).
        meets = sorted(
            {
                o
                for n in floats
                if not graph.tensors[n].is_constant
                for op in graph.consumers(n)
                for o in op.outputs
                if o and o not in independent and is_float(o)
            }
        )
        marked = keep_float(graph, floats + meets, "computed from shapes/constants only", ctx.target)
        if marked:
            self.remarks.applied(
                f"kept {len(marked)} shape/constant-derived tensors and the ops they feed float",
                marked[:10],
                reason="no input values reach them: 8 bits would only add error",
            )
        return self.result(bool(folded))

    def _fold(self, graph: Graph, frontier: list[str]) -> dict[str, str]:
        """Replace the frontier by initializers computed once; returns old name -> constant name."""
        feeds = _static_inputs(graph)
        if feeds is None:
            self.remarks.missed(
                "shape arithmetic not folded",
                frontier[:5],
                reason="a graph input has a dynamic shape; kept float instead",
            )
            return {}
        model = graph.to_onnx()
        for name in frontier:
            if name not in {o.name for o in model.graph.output}:
                model.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
        try:
            values = verification.exact_session(model).run(frontier, feeds)
        except Exception as exc:  # noqa: BLE001 - onnxruntime's errors have no common base
            self.remarks.missed(
                "shape arithmetic not folded",
                frontier[:5],
                reason=f"onnxruntime could not evaluate it ({str(exc).splitlines()[0][:120]})",
            )
            return {}
        folded: dict[str, str] = {}
        for name, value in zip(frontier, values, strict=True):
            if graph.is_graph_output(name):
                continue
            const = graph.add_initializer(graph.unique_name(f"{name}_folded"), np.asarray(value))
            graph.replace_all_uses(name, const.name, graph_outputs=False)
            folded[name] = const.name
        removed = graph.remove_dead_ops()
        if folded:
            self.remarks.applied(
                f"constant-folded {len(folded)} shape/constant-derived tensors ({removed} ops removed)",
                list(folded)[:10],
            )
        return folded
