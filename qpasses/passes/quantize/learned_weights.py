"""What AdaRound and AdaScale share around their learning: torch, the plan, the per-channel choice, and
the calibration batches, the quantized-so-far weights and the seeded generator they learn on."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np

from graph_ir import Graph
from qpasses.core.context import PassContext
from qpasses.core.pass_base import Pass
from qpasses.data.weight_swap import SwappedWeights
from qpasses.learned import require_torch
from qpasses.learned.layers import per_channel_weights, quantized_so_far
from qpasses.passes.quantize.calibrate import calibration_feeds
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

    def setup(self, graph: Graph, ctx: PassContext) -> LearningSetup:
        torch = require_torch(self.name)
        from qpasses.learned import training  # imports torch

        plan = ctx.get(QuantPlan, graph).plan
        return LearningSetup(
            torch, training, plan, per_channel_weights(self.options.per_channel, ctx.target, self.remarks)
        )

    def learning_data(self, graph: Graph, ctx: PassContext, setup: LearningSetup) -> LearningData:
        o = self.options
        feeds = [
            dict(f)
            for f in itertools.islice(calibration_feeds(ctx.calibration_data, graph, o.batch_size), o.num_batches)
        ]
        quantized = quantized_so_far(graph, setup.plan.weights) if o.input_from == "quantized" else None
        return LearningData(feeds, quantized, setup.torch.Generator().manual_seed(ctx.seed))
