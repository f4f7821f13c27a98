"""What AMP learns from the calibration data once, for every candidate.

``quantize_model`` calibrates and bias-corrects on the *FP32* graph, so neither depends on the
precision of any other group:

- activation statistics: every quantizable activation observed on the FP32 model; the encoding at
  each candidate bitwidth is another grid over the same observer (exactly what the ``calibrate``
  pass computes for that bitwidth);
- bias correction (when on): the corrected bias of a Conv/Gemm depends only on its own weight
  grid and the FP32 input means, so the tail of the real pipeline (annotate, encode-weights,
  calibrate, ``bias-correction``) runs once per candidate weight bitwidth and its biases are kept.

Both read the data once: the statistics the tail's passes declare (``Pass.statistics``) are measured
with the activations' in one collection on the FP32 graph, and every tail run (on a copy of that
graph, same values) finds them in its context.

Nothing else is cached across assignments; grids derived from these (converts, int32 bias
scales) are recomputed per assignment by ``SimulationModel.feeds`` (and memoized there).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from graph_ir import Graph
from qpasses.core.analyses import Shapes
from qpasses.core.context import PassContext
from qpasses.core.pass_base import Pass
from qpasses.core.pass_manager import PassManager
from qpasses.core.statistics import StatisticsStore
from qpasses.data.statistics import (
    HistogramRequest,
    RangeRequest,
    TensorStatistic,
    measure,
    minmax_observer,
    reject_nonfinite,
)
from qpasses.passes import default_registry
from qpasses.quant.config import QuantConfig
from qpasses.quant.encodings import Encoding
from qpasses.quant.plan import build_plan
from qpasses.quant.range_search import compute


@dataclass(frozen=True)
class CalibrationTables:
    """Activation encodings by (tensor, bitwidth) and corrected biases by (bias, weight bitwidth).

    Plain data (picklable): process and Ray workers get it instead of the calibration data.
    """

    activations: Mapping[tuple[str, int], Encoding]
    biases: Mapping[tuple[str, int], np.ndarray] = field(default_factory=dict)

    def activation(self, name: str, bitwidth: int) -> Encoding | None:
        return self.activations.get((name, bitwidth))

    def bias(self, name: str, weight_bw: int) -> np.ndarray | None:
        return self.biases.get((name, weight_bw))


def activation_encodings(
    observers: Mapping[str, Any], bitwidths: Sequence[int], config: QuantConfig
) -> dict[tuple[str, int], Encoding]:
    """The ``calibrate`` pass's encoding of every observed tensor at every bitwidth."""
    return {
        (name, bw): compute(obs, bw, config.act_mode, percentile=config.percentile)
        for name, obs in observers.items()
        for bw in sorted(set(bitwidths))
    }


def _tail(config: QuantConfig, weight_bw: int, batch_size: int) -> list[Pass]:
    """The tail of quantize_model's pipeline up to the correction, so it sees what it sees there."""
    registry = default_registry()
    return [
        registry.create_pass("annotate-precision", weight_bw=weight_bw, bias_bw=config.bias_bw, calibrated=True),
        registry.create_pass(
            "encode-weights", weight_bw=weight_bw, per_channel=config.per_channel, mode=config.weight_mode
        ),
        registry.create_pass(
            "calibrate", mode=config.act_mode, percentile=config.percentile, batch_size=batch_size, progress=False
        ),
        registry.create_pass("bias-correction", batch_size=batch_size),
    ]


def corrected_biases(
    graph: Graph,
    feeds: Sequence[Mapping[str, np.ndarray]],
    config: QuantConfig,
    weight_bitwidths: Sequence[int],
    *,
    batch_size: int,
    statistics: StatisticsStore | None = None,
) -> dict[tuple[str, int], np.ndarray]:
    """Biases after the real ``bias-correction`` pass, for each weight bitwidth (one short pass each).

    ``statistics``: measured on ``graph`` as it is (the tail's declared requests among them); each run
    on a copy reads them instead of the data."""
    out: dict[tuple[str, int], np.ndarray] = {}
    for bw in sorted(set(weight_bitwidths)):
        g = graph.copy()
        ctx = PassContext(calibration_data=list(feeds))
        if statistics is not None:
            ctx.statistics = statistics.carried_to(g)
        PassManager(_tail(config, bw, batch_size), verify="none").run(g, ctx)
        plan = build_plan(g, PassContext().get(Shapes, g))
        for name in plan.biases:
            out[(name, bw)] = np.array(g.tensors[name].data)
    return out


def calibrate_once(
    graph: Graph,
    feeds: Sequence[Mapping[str, np.ndarray]],
    config: QuantConfig,
    *,
    act_bitwidths: Sequence[int],
    weight_bitwidths: Sequence[int],
    bias_correction: bool,
    batch_size: int,
    progress: bool = False,
) -> CalibrationTables:
    """One FP32 statistics read for the activations and, when on, every bias-correction run's statistics."""
    plan = build_plan(graph, PassContext().get(Shapes, graph))
    ctx = PassContext(calibration_data=list(feeds))
    common: dict[str, Any] = {"batch_size": batch_size, "progress": progress}
    ranges = RangeRequest(tuple(plan.activations), **common)
    requests: list[TensorStatistic[Any]] = [ranges]
    hist = None
    if config.act_mode in ("enhanced", "percentile"):
        hist = HistogramRequest(tuple(plan.activations), **common)
        requests.append(hist)
    if bias_correction and weight_bitwidths:  # what the tail's passes will ask for, on these same values
        tail = _tail(config, min(weight_bitwidths), batch_size)
        requests += [r for p in tail for r in p.statistics_ahead(graph, ctx) if isinstance(r, TensorStatistic)]
    stats = measure(graph, ctx, requests)
    found = reject_nonfinite(stats[ranges])
    observers: dict[str, Any] = (
        {n: stats[hist][n] for n in found} if hist is not None else {n: minmax_observer(r) for n, r in found.items()}
    )
    biases = (
        corrected_biases(graph, feeds, config, weight_bitwidths, batch_size=batch_size, statistics=ctx.statistics)
        if bias_correction
        else {}
    )
    return CalibrationTables(activation_encodings(observers, act_bitwidths, config), biases)
