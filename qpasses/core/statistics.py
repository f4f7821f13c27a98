"""Statistics of the calibration data that passes declare, and the store of what was measured.

NNCF's StatisticPoints and LLVM's analysis declarations, for data: a pass that reads statistics of
the calibration data (tensor ranges, histograms, input channel means, captured values...) declares
them as typed requests (``Pass.statistics(graph, ctx)``). Before it runs, the pass manager gathers
the requests of the passes ahead that will see the same values (up to the first that declares
``modifies_values``) and has them measured together, in one read of the data; the pass then finds
its results in ``ctx.statistics``. A pass run alone (or asking for more than it declared) measures
on demand through the same collector.

Results are stamped with ``graph.version``: annotations (precisions, encodings) do not bump it, so
what was measured before ``annotate-precision`` serves ``calibrate``; a weight or bias value
(``Tensor.set_data``, ``graph.touch()``) or a structural edit does, and the store then starts over.

The concrete requests and their collector live in ``qpasses.data.statistics`` (this layer knows no
data): a request names its family's ``collect``, which the manager calls once per family.
"""

from __future__ import annotations

import hashlib
import weakref
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from graph_ir import Graph
    from qpasses.core.context import PassContext


class StatisticRequest:
    """Base of the typed statistic requests (frozen dataclasses; see ``qpasses.data.statistics``)."""

    def missing(self, graph: Graph, ctx: PassContext) -> bool:
        """True when ``ctx.statistics`` lacks some of what this request measures on the graph's state."""
        raise NotImplementedError

    @classmethod
    def collect(cls, graph: Graph, ctx: PassContext, requests: Sequence[StatisticRequest]) -> None:
        """Measure what ``ctx.statistics`` lacks of ``requests`` (all of this family) in one read, into it."""
        raise NotImplementedError


def content_fingerprint(graph: Graph) -> str:
    """A digest of what the calibration data's statistics depend on: ops (types, slots, attributes and the
    subgraphs in them), constants' values and the interface; not annotations. Streamed tensor by tensor,
    so a large model is never serialized whole."""
    h = hashlib.blake2b(digest_size=16)
    h.update(repr((graph.inputs, graph.outputs)).encode())
    for op in graph.ops:
        h.update(repr((op.op_type, op.domain, tuple(op.inputs), tuple(op.outputs))).encode())
        for attribute in op.attribute_protos():
            h.update(attribute.SerializeToString())
    for name in sorted(graph.tensors):  # Constant nodes' values are in their attributes, above
        initializer = graph.tensors[name].initializer
        if initializer is not None:
            h.update(initializer.SerializeToString())  # name, type, dims and values
    return h.hexdigest()


@dataclass
class StatisticsCarry:
    """What one run measured, by the content of each graph state it was measured on, for another run
    of the same flow on the same calibration data (``data``, by identity; bound by the first run that
    uses the carry). ``quantize_model``'s
    fallback quantizes again with a few tensors kept float: every state up to the annotations is
    the first run's, so are its statistics. Keying by content (not by ``graph.version``, a counter)
    makes a state that differs, however slightly, measure afresh."""

    data: object = None
    results: dict[str, dict[Hashable, Any]] = field(default_factory=dict)

    def serves(self, data: object) -> bool:
        """Whether a run on ``data`` may read and fill this carry (binding it to ``data`` when unbound)."""
        if self.data is None:
            self.data = data
        return self.data is data


class StatisticsStore:
    """What was measured on the calibration data, for one numeric state of one graph (``graph.version``).

    ``results(graph)`` is the mapping of that graph's current state (emptied when the state, or the
    graph, changed since it was filled); keys and values are the request families' own.
    ``collections`` counts the reads of the data made to fill it. With a ``carry``, each state's
    results are found there by content first, and what is measured goes there too.
    """

    def __init__(self, carry: StatisticsCarry | None = None) -> None:
        self._graph: weakref.ref[Graph] | None = None
        self._version: int | None = None
        self._results: dict[Hashable, Any] = {}
        self._carry = carry
        self._carried: tuple[weakref.ref[Graph], int] | None = None  # the state looked up in the carry
        self.collections = 0

    def results(self, graph: Graph) -> dict[Hashable, Any]:
        self.sync(graph)
        if self._carry is not None and self._carried != (self._graph, self._version):
            self._carried = (weakref.ref(graph), graph.version)
            key = content_fingerprint(graph)
            if key in self._carry.results:
                self._results.update(self._carry.results[key])
            self._carry.results[key] = self._results  # live: what this run measures on the state too
        return self._results

    def sync(self, graph: Graph) -> None:
        """Drop what was measured on another state of the graph (frees captured values at once)."""
        if self._version != graph.version or self._graph is None or self._graph() is not graph:
            self._results = {}
            self._graph, self._version = weakref.ref(graph), graph.version

    def carried_to(self, copy: Graph) -> StatisticsStore:
        """A store serving ``copy``, a value-identical copy of the graph these results were measured on
        (``graph.copy()`` before any edit)."""
        out = StatisticsStore()
        out._graph, out._version, out._results = weakref.ref(copy), copy.version, dict(self._results)
        return out

    def __len__(self) -> int:
        return len(self._results)

    def __repr__(self) -> str:
        return f"StatisticsStore(version={self._version}, {len(self._results)} results, {self.collections} collections)"
