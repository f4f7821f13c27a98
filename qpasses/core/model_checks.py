"""Checks that a loaded model can be quantized at all, run before any pass touches it.

A model nothing can observe must fail early with a user error, not quantize "successfully": a graph
without outputs went through the whole flow ("quantized 9 activations"), dead-code elimination
then removed every node, and the 0-node model written out could not be loaded by onnxruntime.
"""

from __future__ import annotations

import onnx

from graph_ir import Graph
from qpasses.core.errors import GraphError


class ModelCheckError(GraphError):
    """The model cannot be quantized as given (no graph outputs, outputs nothing produces)."""


def _interface(model: Graph | onnx.ModelProto) -> tuple[str, list[str], set[str]]:
    """(model name, graph outputs, names a graph output may refer to: node outputs, inputs, initializers)."""
    if isinstance(model, Graph):
        available = set(model.inputs)
        available.update(name for name, t in model.tensors.items() if t.is_constant or model.producer(name))
        return model.name or "model", list(model.outputs), available
    g = model.graph
    available = {vi.name for vi in g.input} | {t.name for t in g.initializer}
    available |= {t.values.name for t in g.sparse_initializer}
    available |= {o for node in g.node for o in node.output if o}
    return g.name or "model", [vi.name for vi in g.output], available


def check_quantizable(model: Graph | onnx.ModelProto, source: str | None = None) -> None:
    """Raise ``ModelCheckError`` when ``model`` has no graph outputs or an output nothing defines.

    ``source`` (e.g. the model's path) names the model in the message; the graph name otherwise.
    """
    name, outputs, available = _interface(model)
    where = source or f"model '{name}'"
    if not outputs:
        raise ModelCheckError(
            f"{where} has no graph outputs: nothing it computes can be observed, so there is nothing to "
            "quantize (every node is dead code) and onnxruntime cannot load the result; list the tensors "
            "the model should return in graph.output"
        )
    missing = [o for o in outputs if o not in available]
    if missing:
        shown = ", ".join(f"'{o}'" for o in missing)
        raise ModelCheckError(
            f"{where}: graph output(s) {shown} are produced by no node and are neither a graph input nor an "
            "initializer, so onnxruntime cannot load the model"
        )
