"""What AdaRound and AdaScale share around their learning: torch, the plan, the per-channel choice, and
the calibration batches, the quantized-so-far weights and the seeded generator they learn on.

The batches are a ``CaptureRequest`` of the graph inputs the passes declare, so the pass manager takes
them in the read it makes for the passes before (same values); the layers' inputs and outputs are then
captured per layer or block with the same collector (``qpasses.data.statistics.capture``) on the model
as it was (FP32) and as it is being quantized: one layer's values at a time, to bound the memory."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np

from graph_ir import Graph
from qpasses.core.context import PassContext
from qpasses.core.pass_base import Pass
from qpasses.data.statistics import CaptureRequest, measure
from qpasses.data.weight_swap import SwappedWeights
from qpasses.learned import require_torch
from qpasses.learned.layers import per_channel_weights, quantized_so_far
from qpasses.quant.plan import QuantPlan, QuantPlanData


@dataclass
class LearningSetup:
    torch: Any
    training: ModuleType
    plan: QuantPlanData
    per_channel: bool


@dataclass
class LearningData:
    feeds: list[dict[str, np.ndarray]]
    quantized: SwappedWeights | None  # the model with upstream weights frozen ("quantized" layer inputs)
    generator: Any  # torch.Generator seeded from the context


class LearnedWeightsPass(Pass):
    """Base of the passes that learn weight encodings with torch (options: per_channel, batch_size,
    num_batches, input_from)."""

    modifies_values = True  # learned weights are stored

    def _feeds(self, graph: Graph) -> CaptureRequest:
        """The first ``num_batches`` batches of the graph inputs: the feeds the layers learn on."""
        inputs = [n for n in graph.inputs if not graph.tensors[n].is_constant]
        return CaptureRequest(tuple(inputs), batches=self.options.num_batches, batch_size=self.options.batch_size)

    def statistics(self, graph: Graph, ctx: PassContext) -> Sequence[CaptureRequest]:
        return () if ctx.calibration_data is None else (self._feeds(graph),)

    def setup(self, graph: Graph, ctx: PassContext) -> LearningSetup:
        torch = require_torch(self.name)
        from qpasses.learned import training  # imports torch

        plan = ctx.get(QuantPlan, graph).plan
        return LearningSetup(
            torch, training, plan, per_channel_weights(self.options.per_channel, ctx.target, self.remarks)
        )

    def learning_data(self, graph: Graph, ctx: PassContext, setup: LearningSetup) -> LearningData:
        o = self.options
        request = self._feeds(graph)
        captured = measure(graph, ctx, [request]).take(request)
        inputs = [n for n in request.tensors if n in captured]
        feeds = [{n: captured[n][b] for n in inputs} for b in range(len(captured[inputs[0]]) if inputs else 0)]
        quantized = quantized_so_far(graph, setup.plan.weights) if o.input_from == "quantized" else None
        return LearningData(feeds, quantized, setup.torch.Generator().manual_seed(ctx.seed))
