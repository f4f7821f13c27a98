"""What a pipeline run shares between passes: run inputs, the analysis manager, typed artifacts.

- run inputs: the target descriptor, the calibration dataset, the seed (read-only for passes);
- ``analyses``: cached analyses, each stamped with the graph version it was computed on (and the
  precision version, for analyses that read precision annotations), so a stale one is recomputed;
- ``artifacts``: results a pass leaves for later passes, keyed by class (``qpasses.core.artifacts``);
- ``statistics``: what was measured on the calibration data for the graph's current values
  (``qpasses.core.statistics``), filled by the requests passes declare.

``calibration_data`` is a run input; the first pass that reads it may replace it by its normalised
``CalibrationData`` (the same feeds), which from then on owns the record of a one-shot source.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from graph_ir import Graph
from qpasses.core.analyses import Analysis
from qpasses.core.artifacts import Artifacts
from qpasses.core.remarks import Remark
from qpasses.core.statistics import StatisticsStore

A = TypeVar("A", bound=Analysis)
log = logging.getLogger("qpasses")

Stamp = tuple[int, int]


def _stamp(analysis: type[Analysis], graph: Graph) -> Stamp:
    return graph.version, (graph.precision_version if analysis.reads_precisions else 0)


@dataclass
class AnalysisManager:
    """Analyses computed on demand and cached until the graph (or what they read of it) changes."""

    _cache: dict[type[Analysis], tuple[Stamp, Analysis]] = field(default_factory=dict)
    computed: int = 0
    reused: int = 0

    def get(self, analysis: type[A], graph: Graph, ctx: PassContext) -> A:
        hit = self._cache.get(analysis)
        stamp = _stamp(analysis, graph)
        if hit is not None and hit[0] == stamp and isinstance(hit[1], analysis):
            self.reused += 1
            return hit[1]
        result = analysis(graph, ctx)
        self._cache[analysis] = (stamp, result)
        self.computed += 1
        return result

    def cached(self, analysis: type[Analysis], graph: Graph) -> bool:
        hit = self._cache.get(analysis)
        return hit is not None and hit[0] == _stamp(analysis, graph)

    def preserve(self, analyses: tuple[type[Analysis], ...], graph: Graph) -> None:
        """Re-stamp the analyses a pass declared preserved, so they survive its edits."""
        for a in analyses:
            hit = self._cache.get(a)
            if hit is not None:
                self._cache[a] = (_stamp(a, graph), hit[1])


@dataclass
class PassContext:
    """Per-run state: run inputs, analyses, artifacts, statistics and the remarks of the passes run so far."""

    target: Any = None
    calibration_data: Any = None
    seed: int = 0
    # Real inputs numeric verification tries before random ones (quantize: a calibration sample, read when a
    # pass first needs it), so a pass is checked where the model runs as used (real shapes, valid token ids).
    verification_source: Callable[[], list[dict[str, Any]]] | None = None
    _verification_feeds: list[dict[str, Any]] | None = field(default=None, repr=False)
    analyses: AnalysisManager = field(default_factory=AnalysisManager)
    artifacts: Artifacts = field(default_factory=Artifacts)
    statistics: StatisticsStore = field(default_factory=StatisticsStore)
    remarks: list[Remark] = field(default_factory=list)

    def verification_feeds(self) -> list[dict[str, Any]]:
        """The real inputs for numeric verification (``verification_source``'s, read once)."""
        if self._verification_feeds is None:
            self._verification_feeds = self.verification_source() if self.verification_source is not None else []
        return self._verification_feeds

    def get(self, analysis: type[A], graph: Graph) -> A:
        """Cached analysis result, recomputed if the graph changed since it was stamped."""
        return self.analyses.get(analysis, graph, self)

    def log(self, message: str) -> None:
        log.info(message)
