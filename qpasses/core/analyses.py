"""Analyses: facts about a graph that passes share, computed lazily and cached.

The cache (``qpasses.core.context.AnalysisManager``) is keyed by analysis type and stamped with
``Graph.version`` (plus ``Graph.precision_version`` for analyses that read precision
annotations); a stale entry is recomputed unless the pass manager re-stamped it because the pass
declared it preserved.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import numpy as np
import onnx

from graph_ir import Graph, Op

if TYPE_CHECKING:
    from qpasses.core.context import PassContext

A = TypeVar("A", bound="Analysis")


class Analysis:
    """Base class: subclasses implement ``compute``; instances hold the result."""

    reads_precisions: ClassVar[bool] = False
    """True when the result depends on tensors' precision annotations, not only on the graph."""

    def __init__(self, graph: Graph, ctx: PassContext) -> None:
        self.graph = graph
        self.compute(graph, ctx)

    def compute(self, graph: Graph, ctx: PassContext) -> None:  # pragma: no cover - interface
        raise NotImplementedError


class TopologicalOrder(Analysis):
    def compute(self, graph: Graph, ctx: PassContext) -> None:
        self.order: list[Op] = list(graph.topological_order())
        self.position = {op.id: i for i, op in enumerate(self.order)}


class Shapes(Analysis):
    """Element types and shapes from ONNX shape inference (best effort: unknowns stay None)."""

    def compute(self, graph: Graph, ctx: PassContext) -> None:
        self.types: dict[str, tuple[int, tuple[Any, ...] | None]] = {}
        try:
            inferred = onnx.shape_inference.infer_shapes(graph.to_onnx(), strict_mode=False, data_prop=True)
        except Exception as exc:  # shape inference is advisory; a failure must not stop a pipeline
            ctx.log(f"shape inference failed: {exc}")
            inferred = None
        if inferred is not None:
            g = inferred.graph
            for vi in [*g.input, *g.value_info, *g.output]:
                if vi.type.HasField("tensor_type"):
                    tt = vi.type.tensor_type
                    dims = None
                    if tt.HasField("shape"):
                        dims = tuple(
                            d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim
                        )
                    self.types[vi.name] = (tt.elem_type, dims)
        for t in graph.tensors.values():
            if t.is_constant:
                self.types[t.name] = (t.dtype, t.shape)
            elif t.name not in self.types and t.dtype:
                self.types[t.name] = (t.dtype, t.shape)

    def dtype(self, name: str) -> int:
        return self.types.get(name, (0, None))[0]

    def shape(self, name: str) -> tuple[Any, ...] | None:
        return self.types.get(name, (0, None))[1]


class ConstantData(Analysis):
    """Decoded weight arrays (initializers and Constant nodes), decoded once on first access."""

    def compute(self, graph: Graph, ctx: PassContext) -> None:
        self._cache: dict[str, np.ndarray | None] = {}

    def get(self, name: str) -> np.ndarray | None:
        if name not in self._cache:
            t = self.graph.tensors.get(name)
            self._cache[name] = None if t is None else t.data
        return self._cache[name]
