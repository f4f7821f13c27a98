"""What AMP learns from the calibration data once, for every candidate.

``quantize_model`` calibrates and bias-corrects on the *FP32* graph, so neither depends on the
precision of any other group:

- activation statistics: one streaming pass over the FP32 model observes every quantizable
  activation; the encoding at each candidate bitwidth is another grid over the same observer
  (exactly what the ``calibrate`` pass computes for that bitwidth);
- bias correction (when on): the corrected bias of a Conv/Gemm depends only on its own weight
  grid and the FP32 input means, so the tail of the real pipeline (annotate, encode-weights,
  calibrate, ``bias-correction``) runs once per candidate weight bitwidth and its biases are kept.

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
from qpasses.core.pass_manager import PassManager
from qpasses.data.calibration import collect_statistics
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


def corrected_biases(
    graph: Graph,
    feeds: Sequence[Mapping[str, np.ndarray]],
    config: QuantConfig,
    weight_bitwidths: Sequence[int],
    *,
    batch_size: int,
) -> dict[tuple[str, int], np.ndarray]:
    """Biases after the real ``bias-correction`` pass, for each weight bitwidth (one short pass each)."""
    registry = default_registry()
    out: dict[tuple[str, int], np.ndarray] = {}
    for bw in sorted(set(weight_bitwidths)):
        g = graph.copy()
        # The tail of quantize_model's pipeline up to the correction, so it sees what it sees there.
        passes = [
            registry.create_pass("annotate-precision", weight_bw=bw, bias_bw=config.bias_bw, calibrated=True),
            registry.create_pass(
                "encode-weights", weight_bw=bw, per_channel=config.per_channel, mode=config.weight_mode
            ),
            registry.create_pass(
                "calibrate", mode=config.act_mode, percentile=config.percentile, batch_size=batch_size, progress=False
            ),
            registry.create_pass("bias-correction", batch_size=batch_size),
        ]
        PassManager(passes, verify="none").run(g, PassContext(calibration_data=list(feeds)))
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
    """One FP32 statistics pass (plus one bias-correction pass per weight bitwidth when on)."""
    plan = build_plan(graph, PassContext().get(Shapes, graph))
    observers = collect_statistics(
        graph.to_onnx(),
        plan.activations,
        feeds,
        histogram=config.act_mode in ("enhanced", "percentile"),
        progress=progress,
    )
    biases = corrected_biases(graph, feeds, config, weight_bitwidths, batch_size=batch_size) if bias_correction else {}
    return CalibrationTables(activation_encodings(observers, act_bitwidths, config), biases)
