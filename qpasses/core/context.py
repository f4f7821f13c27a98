"""The context a pipeline shares between passes: analyses cache, remarks, shared state."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, TypeVar

from graph_ir import Graph
from qpasses.core.analyses import Analysis
from qpasses.core.remarks import Remark

A = TypeVar("A", bound=Analysis)
log = logging.getLogger("qpasses")


@dataclass
class PassContext:
    """Per-run state. ``state`` carries data one pass leaves for a later one
    (e.g. folded batch-norm statistics for high-bias absorption, calibration data)."""

    target: Any = None
    calibration_data: Any = None
    seed: int = 0
    state: dict[str, Any] = field(default_factory=dict)
    remarks: list[Remark] = field(default_factory=list)
    _analyses: dict[type[Analysis], tuple[int, Analysis]] = field(default_factory=dict)

    def get(self, analysis: type[A], graph: Graph) -> A:
        """Cached analysis result, recomputed if the graph changed since it was stamped."""
        hit = self._analyses.get(analysis)
        if hit is not None and hit[0] == graph.version and isinstance(hit[1], analysis):  # always its class
            return hit[1]
        result = analysis(graph, self)
        self._analyses[analysis] = (graph.version, result)
        return result

    def preserve(self, analyses: tuple[type[Analysis], ...], graph: Graph) -> None:
        """Re-stamp analyses a pass declared preserved so they survive its edits."""
        for a in analyses:
            hit = self._analyses.get(a)
            if hit is not None:
                self._analyses[a] = (graph.version, hit[1])

    def invalidate(self) -> None:
        self._analyses.clear()

    def log(self, message: str) -> None:
        log.info(message)
