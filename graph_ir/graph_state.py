"""What an IR graph holds, and every read of it: ``GraphState``, the base of ``Graph``.

The ops, the tensors, and the producer/use indices kept in sync with the networkx edges; lookups
through them (O(1) producer and consumer queries) and the topological order cached per
``version``. Every edit is ``Graph``'s (``graph.py``): keeping the reads apart makes plain which
code may change the indices, and nothing here does.
"""

from __future__ import annotations

import heapq
import itertools
from typing import Any

import networkx as nx
import onnx
from onnx import helper

from graph_ir.elements import Op, Tensor
from graph_ir.errors import GraphError

Use = tuple[Op, int]


class GraphState:
    """The state of a ``Graph`` and its lookups (build graphs with ``graph_ir.load`` / ``graph_ir.from_onnx``)."""

    def __init__(self, shell: onnx.ModelProto | None = None) -> None:
        self.nx = nx.MultiDiGraph()
        self.tensors: dict[str, Tensor] = {}
        self.inputs: list[str] = []
        self.outputs: list[str] = []
        # Everything of the model that is not nodes/tensors: opsets, functions, metadata...
        self.shell = shell if shell is not None else _default_shell()
        self._ops: dict[int, Op] = {}
        self._producer: dict[str, tuple[Op, int]] = {}
        self._uses: dict[str, dict[tuple[int, int], None]] = {}
        self._op_names: set[str] = set()
        self._ids = itertools.count()
        self._names = itertools.count()
        self.version = 0  # bumped by structural edits (ops, tensors, data, types)
        self.precision_version = 0  # bumped when a tensor's precision annotation changes
        self._topo: tuple[int, list[Op]] | None = None
        # graph.value_info entries of graph inputs/outputs and initializers, which the tensor's own
        # value_info slot cannot hold: name -> (entry, the tensor's value_info/initializer at load).
        # Lowered only while that anchor is unchanged, so an edited tensor never gets a stale entry.
        self._value_info_extra: dict[str, tuple[onnx.ValueInfoProto, Any]] = {}

    # --- model-level properties ----------------------------------------------------
    @property
    def name(self) -> str:
        return self.shell.graph.name

    @property
    def ir_version(self) -> int:
        return self.shell.ir_version

    def opset(self, domain: str = "") -> int:
        """Imported opset version of a domain (0 when not imported)."""
        for imp in self.shell.opset_import:
            if imp.domain in ((domain, "ai.onnx") if domain == "" else (domain,)):
                return imp.version
        return 0

    # --- lookups -------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._ops)

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def tensor(self, name: str) -> Tensor:
        try:
            return self.tensors[name]
        except KeyError:
            raise GraphError(f"unknown tensor {name!r}") from None

    def op(self, name: str) -> Op:
        for op in self._ops.values():
            if op.name == name:
                return op
        raise GraphError(f"unknown op {name!r}")

    def op_by_id(self, op_id: int) -> Op:
        return self._ops[op_id]

    @property
    def ops(self) -> list[Op]:
        """Ops in a topological order (cached until the next mutation)."""
        return self.topological_order()

    def producer(self, name: str) -> Op | None:
        entry = self._producer.get(name)
        return entry[0] if entry else None

    def uses(self, name: str) -> list[Use]:
        """(op, slot) for every read of a tensor; slot < 0 marks a subgraph capture."""
        return [(self._ops[i], slot) for i, slot in self._uses.get(name, ())]

    def consumers(self, name: str) -> list[Op]:
        """Distinct ops reading a tensor, in first-use order."""
        seen: dict[int, None] = {}
        for i, _ in self._uses.get(name, ()):
            seen.setdefault(i)
        return [self._ops[i] for i in seen]

    def is_graph_output(self, name: str) -> bool:
        return name in self.outputs

    def initializers(self) -> list[Tensor]:
        return [t for t in self.tensors.values() if t.initializer is not None]

    def constants(self) -> list[Tensor]:
        """All weights: initializers and Constant-node outputs alike."""
        return [t for t in self.tensors.values() if t.is_constant]

    def topological_order(self) -> list[Op]:
        """Stable topological order (ties broken by creation order, so load order survives)."""
        if self._topo is not None and self._topo[0] == self.version:
            return self._topo[1]
        indeg = {i: 0 for i in self._ops}
        for _, v in self.nx.edges():
            indeg[v] += 1
        heap = [i for i, d in indeg.items() if d == 0]
        heapq.heapify(heap)
        order: list[Op] = []
        succ = self.nx.succ
        while heap:
            i = heapq.heappop(heap)
            order.append(self._ops[i])
            for j, keys in succ[i].items():
                indeg[j] -= len(keys)
                if indeg[j] == 0:
                    heapq.heappush(heap, j)
        if len(order) != len(self._ops):
            stuck = [i for i, d in indeg.items() if d > 0]
            try:
                cycle = [u for u, _, *_ in nx.find_cycle(self.nx.subgraph(stuck))]
            except nx.NetworkXNoCycle:  # pragma: no cover - Kahn's leftovers always hold a cycle
                cycle = stuck
            names = [self._ops[i].name or f"{self._ops[i].op_type}(->{','.join(self._ops[i].outputs)})" for i in cycle]
            raise GraphError(
                f"graph has a cycle: {' -> '.join(names[:8])}{' ...' if len(names) > 8 else ''} -> back to {names[0]}"
            )
        self._topo = (self.version, order)
        return order


def _default_shell() -> onnx.ModelProto:
    shell = onnx.ModelProto()
    shell.ir_version = 8
    shell.producer_name = "qpasses"
    shell.opset_import.append(helper.make_opsetid("", 17))
    shell.graph.name = "graph"
    return shell
