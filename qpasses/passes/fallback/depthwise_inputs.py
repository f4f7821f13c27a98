"""A depthwise Conv whose input's 8-bit grid would drown its own output runs in float.

Each output channel of a depthwise Conv reads one input channel. After batch-norm folding its
weights can be large exactly where that input channel is small, so the rounding noise of an input
grid sized for the widest channel comes out amplified: on PP-LCNet's first depthwise layer
(slanet_plus), quantizing its input alone leaves the layer's output at 8 dB SQNR, and the model's
encoder features at 4 dB. Cross-layer equalization would rescale the channels, but not across the
HardSwish between the layers (it is not scale-equivariant).

The prediction needs no extra run: the input's grid step ``d`` (its calibrated range over 255
levels, as ``calibrate`` will set it), the folded weights, and each output channel's mean power on
the calibration data (``ChannelPowerRequest``, measured in the read the pass manager makes for
calibrate). Uniform rounding noise of power ``d^2/12`` reaches output channel ``c`` as
``d^2/12 * sum(w_c^2)``; when the output's pooled SQNR over that falls below ``min_sqnr_db``, the
input and the Conv's output stay float (int16 on quantized-only targets) and the Conv runs in float
(1.5% of slanet_plus's MACs for the four it keeps; 4.2% of ppocr_rec's for its one). Measured on
slanet_plus with ``calibrate``'s HardSwish-aware ranges (``qpasses.quant.live_range``):
structure-token agreement 0.899 / 0.888 -> 0.927 / 0.919 (exact / default session); a floor of 17 or
15 dB (three, one Conv kept) gave 0.908 / 0.925 and 0.903 / 0.892.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from graph_ir import Graph, Op
from qpasses.core.context import PassContext
from qpasses.core.errors import CalibrationDataError
from qpasses.core.pass_base import Pass, PassResult
from qpasses.data.statistics import ChannelPowerRequest, RangeRequest, TensorStatistic, measure
from qpasses.quant.keep_float import keep_float, kept_precision, user_override
from qpasses.quant.precision_type import is_float

SHOWN = 5


def depthwise_convs(graph: Graph) -> list[Op]:
    """Conv ops with one input channel per group (group > 1) and a constant weight, reading a float
    activation that nothing has kept float and the user gave no encoding or precision."""
    found = []
    for op in graph.ops:
        if op.op_type != "Conv" or not op.is_standard or len(op.inputs) < 2 or not op.inputs[0]:
            continue
        w, x = graph.tensors.get(op.inputs[1]), graph.tensors[op.inputs[0]]
        groups = int(op.attr("group", 1))
        if w is None or not w.is_constant or w.shape is None or len(w.shape) < 3 or groups <= 1:
            continue
        if w.shape[1] != 1 or x.is_constant or x.dtype not in (0, 1):
            continue
        if is_float(x) or user_override(graph, x.name):  # kept float already, or the user's grid
            continue
        found.append(op)
    return found


def predicted_sqnr_db(weight: np.ndarray, power: np.ndarray, step: float) -> float:
    """Pooled SQNR of a depthwise Conv's output when only its input is rounded to a grid of ``step``:
    output channel power over ``step^2/12 * sum(w_c^2)`` (uniform rounding noise, independent taps)."""
    gain = np.square(weight.astype(np.float64)).reshape(weight.shape[0], -1).sum(axis=1)
    noise = step * step / 12.0 * float(gain.sum())
    signal = float(np.sum(power))
    if noise <= 0.0:
        return math.inf
    return 10.0 * math.log10(signal / noise) if signal > 0.0 else -math.inf


class KeepDepthwiseInputsFloat(Pass):
    name = "keep-depthwise-inputs-float"
    description = (
        "run a depthwise Conv in float when its input's 8-bit rounding, amplified per channel by its "
        "weights, would leave its output below min_sqnr_db (int16 on quantized-only targets)"
    )
    preserves_semantics = True

    @dataclass
    class Options:
        act_bw: int = 8
        min_sqnr_db: float = 20.0
        batch_size: int = 16

    def _requests(self, convs: Sequence[Op]) -> tuple[RangeRequest, ChannelPowerRequest]:
        # The same range request as calibrate's (all batches), so both read one measurement.
        size = self.options.batch_size
        inputs = tuple(dict.fromkeys(op.inputs[0] for op in convs))
        return RangeRequest(inputs, batch_size=size), ChannelPowerRequest(
            tuple(op.outputs[0] for op in convs), batch_size=size
        )

    def statistics(self, graph: Graph, ctx: PassContext) -> Sequence[TensorStatistic]:
        convs = depthwise_convs(graph)
        return self._requests(convs) if convs and ctx.calibration_data is not None else ()

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        o = self.options
        convs = depthwise_convs(graph)
        if not convs or ctx.calibration_data is None:
            return self.result(False)
        ranges, powers = self._requests(convs)
        try:
            stats = measure(graph, ctx, [ranges, powers])
        except CalibrationDataError as exc:
            self.remarks.missed("depthwise inputs not checked", reason=str(exc))
            return self.result(False)
        levels = 2**o.act_bw - 1
        kept: list[tuple[str, float]] = []
        for op in convs:
            x, y = op.inputs[0], op.outputs[0]
            r, p = stats[ranges].get(x), stats[powers].get(y)
            if r is None or p is None or p.mean is None or not r.floating:
                continue
            step = r.width / levels
            weight = np.asarray(graph.tensors[op.inputs[1]].data)
            sqnr = predicted_sqnr_db(weight, p.mean, step)
            if sqnr < o.min_sqnr_db and keep_float(graph, [x, y], "depthwise input amplified", ctx.target):
                kept.append((op.name, sqnr))
        if kept:
            shown = ", ".join(f"{name} {db:.1f} dB" for name, db in kept[:SHOWN])
            self.remarks.applied(
                f"kept {len(kept)} depthwise Conv{'s' if len(kept) > 1 else ''} in {kept_precision(ctx.target)}",
                [name for name, _ in kept],
                reason=f"their weights amplify the input's {o.act_bw}-bit rounding per channel: predicted output "
                f"SQNR {shown} < {o.min_sqnr_db:g} dB",
            )
        return self.result(False)
