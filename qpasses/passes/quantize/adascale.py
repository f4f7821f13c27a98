"""AdaScale: learn weight clipping and scaling per block, by block-wise knowledge distillation.

AIMET's AdaScale (FlexRound, Lee et al. 2023, with OmniQuant's learnable weight clipping, Shao et
al. 2023). A block is a single-input single-output region of the graph: found automatically
between the tensors that are, at some point of the topological order, the only live activation
(a residual block is one region, its skip path live beside the body), each block ending where the
next weighted layer's region begins; or named by the user as ``start->end`` tensor pairs. Tensors
that are not float activations (integer ids and masks, shapes) do not cut regions: a block reading
them gets them captured and fed beside its input. A weight read by several ops of one type (ALBERT's
shared layers, directly or through Identity) is learned once when one block holds every reader
(otherwise skipped with a remark). For every Conv/ConvTranspose/Gemm/MatMul weight in a block,
trainable parameters:

- ``gamma``/``beta`` per channel (per tensor for per-tensor grids): the grid's max/min scaled by
  ``sigmoid(.)``-shaped factors starting at the starting grid (what ``encode-weights`` would use, or
  SeqMSE's); the grid itself is ``range_search.from_min_max`` of the clipped range;
- ``s2`` per element and ``s3`` per output channel: the weight is divided by ``exp(s2) exp(s3)``
  before rounding (FlexRound), so weights can move to other integers while dequantization uses
  the grid's scale alone.

Adam (clipping lr 1e-3, scaling lr 5e-4, cosine-annealed, AIMET's values) minimises the squared
error between the block's output with fake-quantized weights on the quantized model's block input
(the blocks before it already learned; activations float, as AIMET leaves them uninitialized) and
the FP32 block's output on the FP32 input, for ``num_epochs`` passes over the captured batches.
Each weight then becomes the folded ``W / (exp(s2) exp(s3))`` rounded onto the learned grid, and
the grid is frozen (``meta["encoding_source"] = "adascale"``, kept by ``encode-weights``): the
lowered model and encodings.json carry what was learned. Activations are calibrated afterwards,
on the new weights. A block whose loss does not improve keeps the starting grid.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from graph_ir import Graph, Op
from qpasses.core.analyses import Shapes, TopologicalOrder
from qpasses.core.context import PassContext
from qpasses.core.errors import PassError
from qpasses.core.pass_base import PassResult
from qpasses.data.sessions import unavailable_tensors
from qpasses.data.statistics import capture
from qpasses.learned import check_common_options
from qpasses.learned.blocks import Block, find_blocks, named_block
from qpasses.learned.layers import (
    Layer,
    constant_aliases,
    count_samples,
    learnable_layers,
)
from qpasses.passes.quantize.learned_weights import LearnedWeightsPass
from qpasses.quant.encodings import Encoding, fake_quantize
from qpasses.quant.plan import QuantPlan


@dataclass(frozen=True)
class AdaScaleResult:
    """What AdaScale did to one block (the ``AdaScaleResults`` artifact, in block order)."""

    input: str
    output: str
    layers: tuple[str, ...]
    loss_start: float  # block reconstruction loss with the starting grids, rounding to nearest
    loss: float  # with the learned grids and weights (== loss_start when the start was kept)
    mse_start: float
    mse: float
    kept_start: bool
    encodings: dict[str, Encoding] = field(default_factory=dict)  # by weight name (empty when kept)


class AdaScaleResults(list[AdaScaleResult]):
    """Artifact: what AdaScale learned per block, in block order."""


class AdaScale(LearnedWeightsPass):
    name = "adascale"
    description = "AdaScale: learned weight clipping/scaling per block, block-wise distillation (needs torch)"
    uses = (QuantPlan,)
    preserves = (TopologicalOrder, Shapes, QuantPlan)

    @dataclass
    class Options:
        num_epochs: int = 60  # passes over the captured batches per block (steps = num_epochs x num_batches)
        num_batches: int = 16
        batch_size: int = 16  # samples per batch; one batch per step
        blocks: list[str] = field(default_factory=list)  # "start->end" tensor pairs; empty: found automatically
        layers_per_block: int = 1  # automatic blocks: at least this many weighted layers each
        clip_lr: float = 1e-3  # gamma/beta (AIMET's beta_gamma_lr)
        scale_lr: float = 5e-4  # s2/s3 (AIMET's scales_lr)
        input_from: str = "quantized"  # or fp32
        weight_bw: int = 8
        per_channel: bool = True
        mode: str = "symmetric"  # weight encoding mode, as encode-weights
        exclude: list[str] = field(default_factory=list)
        threads: int = 0  # torch intra-op threads; 0: 1 for small blocks, torch's default for large ones
        progress: bool = True

    def _check_options(self) -> None:
        o = self.options
        check_common_options(self.name, o, ("num_epochs", "num_batches", "batch_size", "layers_per_block"))
        if not (o.clip_lr >= 0 and o.scale_lr >= 0 and o.clip_lr + o.scale_lr > 0):
            raise PassError(
                f"pass 'adascale': clip_lr and scale_lr must be >= 0 and not both 0 (got {o.clip_lr}, {o.scale_lr})"
            )

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        self._check_options()
        o = self.options
        setup = self.setup(graph, ctx)
        training, plan = setup.training, setup.plan
        order = ctx.get(TopologicalOrder, graph).order
        layers = learnable_layers(
            graph,
            order,
            plan.weights,
            self.remarks,
            weight_bw=o.weight_bw,
            per_channel=setup.per_channel,
            mode=o.mode,
            exclude=o.exclude,
            shared=True,
        )
        blocks = self._blocks(graph, order, layers, ctx.get(Shapes, graph)) if layers else []
        model = graph.to_onnx()
        tasks = self._programs(model, graph, blocks)
        if not tasks:
            self.remarks.analysis("no blocks with supported layers to learn")
            return self.result(False)

        learning = self.learning_data(graph, ctx, setup)
        feeds, quantized, generator = learning.feeds, learning.quantized, learning.generator
        results: list[AdaScaleResult] = []
        bar = training.progress_bar(len(tasks), "adascale", o.progress, "block")
        try:
            for block, program in tasks:
                bar.set_postfix_str(block.output[-40:])
                names = program.inputs  # the block input, then its side inputs (integer ids, masks...)
                fp = capture(model, feeds, [*names, block.output])
                captured = fp if quantized is None else capture(quantized.model, feeds, names)
                columns = {name: training.as_tensors(captured[name]) for name in names}
                inputs = [{name: columns[name][i] for name in names} for i in range(len(feeds))]
                res, weights = self._learn(
                    block, program, inputs, training.as_tensors(fp[block.output]), generator, training
                )
                self._freeze(graph, block, res, weights, training)
                if quantized is not None:
                    for name, array in weights.items():
                        quantized.set(name, array)
                results.append(res)
                bar.update()
        finally:
            bar.close()
        ctx.artifacts.put(AdaScaleResults(results))
        learned = [r for r in results if not r.kept_start]
        self.remarks.applied(
            f"learned {sum(len(r.layers) for r in learned)} weight grids in {len(learned)} of "
            f"{len(results)} blocks ({o.num_epochs} epochs of {len(feeds)} batches, "
            f"{count_samples(feeds)} samples, inputs {o.input_from})"
        )
        return self.result(bool(learned))

    def _blocks(self, graph: Graph, order: list[Op], layers: list[Layer], shapes: Shapes) -> list[Block]:
        o = self.options
        if o.blocks:
            blocks = [named_block(graph, order, spec, layers) for spec in o.blocks]
            seen: dict[int, str] = {}
            for block in blocks:
                for op in block.ops:
                    if op.id in seen:
                        raise PassError(
                            f"pass 'adascale': blocks {seen[op.id]!r} and {block.label!r} overlap "
                            f"(both hold {op.op_type} '{op.name}')"
                        )
                    seen[op.id] = block.label
            placed = {layer.op.id for block in blocks for layer in block.layers}
            rest = [layer.name for layer in layers if layer.op.id not in placed]
            if rest:
                self.remarks.analysis("not in a named block", rest, reason="left to encode-weights")
        else:
            dtypes = {name: dtype for name, (dtype, _) in shapes.types.items()}
            blocks, outside = find_blocks(graph, order, layers, dtypes, o.layers_per_block)
            if outside:
                self.remarks.missed(
                    "not learned",
                    [la.name for la in outside],
                    reason="not inside a single-input single-output region (name blocks with the blocks option)",
                )
        for block in blocks:
            outside = [la for la in block.layers if block.outside_users(la)]
            if outside:
                self.remarks.missed(
                    "not learned",
                    [la.name for la in outside],
                    reason=f"block {block.label}: the shared weight is also read outside the block "
                    "(name a block holding every reader with the blocks option)",
                )
                block.layers = [la for la in block.layers if la not in outside]
        empty = [block.label for block in blocks if not block.layers]
        if empty:
            self.remarks.missed("blocks without learnable weights", empty)
        return [block for block in blocks if block.layers]

    def _programs(self, model: Any, graph: Graph, blocks: list[Block]) -> list[tuple[Block, Any]]:
        """Torch programs per block; blocks the mapping or onnxruntime cannot serve get a 'missed' remark."""
        from qpasses.learned.torch_ops import TorchProgram, Unsupported

        tasks = []
        for block in blocks:
            try:
                ops = [*constant_aliases(graph, block.ops), *block.ops]
                inputs = [block.input, *Block(block.input, block.output, ops).side_inputs(graph)]
                tasks.append((block, TorchProgram(graph, ops, inputs, [block.output])))
            except Unsupported as exc:
                self.remarks.missed(
                    "block not learned", [la.name for la in block.layers], reason=f"block {block.label}: {exc}"
                )
        missing = unavailable_tensors(model, [n for b, p in tasks for n in (*p.inputs, b.output)])
        kept = []
        for block, program in tasks:
            name = next((n for n in (*program.inputs, block.output) if n in missing), None)
            if name is None:
                kept.append((block, program))
            else:
                self.remarks.missed(
                    "block not learned",
                    [la.name for la in block.layers],
                    reason=f"block {block.label}: '{name}' is {missing[name]}",
                )
        return kept

    def _learn(
        self, block: Block, program: Any, inputs: list, targets: list, generator: Any, training: Any
    ) -> tuple[AdaScaleResult, dict[str, np.ndarray]]:
        import torch

        o = self.options
        quantizers = {la.weight: training.AdaScaleWeight(la.data, la.encoding, la.channel_axis) for la in block.layers}
        start = {
            la.weight: torch.from_numpy(fake_quantize(la.data, la.encoding).astype(np.float32)) for la in block.layers
        }
        clip = [p for q in quantizers.values() for p in q.clip_parameters()]
        scale = [p for q in quantizers.values() for p in q.scale_parameters()]

        def run(i: int, weights: dict[str, torch.Tensor]) -> torch.Tensor:
            return program(inputs[i], weights)[0]

        def learned() -> dict[str, torch.Tensor]:
            return {name: q() for name, q in quantizers.items()}

        threads = training.pick_threads(o.threads, program.macs(inputs[0], start))
        with training.torch_threads(threads):
            before = training.evaluate(lambda i: run(i, start), targets)
            optimizer = torch.optim.Adam(
                [g for g in ({"params": clip, "lr": o.clip_lr}, {"params": scale, "lr": o.scale_lr}) if g["lr"] > 0]
            )
            steps = o.num_epochs * len(inputs)
            scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps, eta_min=0.0)
            order = training.batch_order(steps, len(inputs), generator)
            # The rounding moves in jumps the straight-through gradients cannot see, so the loss can rise
            # again: the state of the best epoch (measured on every batch) is the one kept.
            best, best_state = before.loss, None
            bar = training.progress_bar(steps, f"  {block.output[-30:]}", o.progress, "it")
            try:
                for epoch in range(o.num_epochs):
                    for b in order[epoch * len(inputs) : (epoch + 1) * len(inputs)]:
                        loss = training.reconstruction_loss(run(b, learned()), targets[b])
                        optimizer.zero_grad(set_to_none=True)
                        loss.backward()
                        optimizer.step()
                        scheduler.step()
                        bar.update()
                    current = training.evaluate(lambda i: run(i, learned()), targets).loss
                    if current < best:
                        best = current
                        best_state = {
                            name: {k: v.detach().clone() for k, v in q.state_dict().items()}
                            for name, q in quantizers.items()
                        }
                    bar.set_postfix_str(f"loss {current:.4g} (start {before.loss:.4g})")
            finally:
                bar.close()
            if best_state is not None:
                for name, q in quantizers.items():
                    q.load_state_dict(best_state[name])
            finals = {name: q.result() for name, q in quantizers.items()}
            weights = {name: f[1] for name, f in finals.items()}
            after = training.evaluate(lambda i: run(i, {n: torch.from_numpy(w) for n, w in weights.items()}), targets)
        kept = after.loss >= before.loss
        res = AdaScaleResult(
            block.input,
            block.output,
            tuple(la.name for la in block.layers),
            before.loss,
            before.loss if kept else after.loss,
            before.mse,
            before.mse if kept else after.mse,
            kept,
            {} if kept else {name: f[0] for name, f in finals.items()},
        )
        return res, ({} if kept else weights)

    def _freeze(
        self, graph: Graph, block: Block, res: AdaScaleResult, weights: dict[str, np.ndarray], training: Any
    ) -> None:
        names = [la.name for la in block.layers]
        if res.kept_start:
            self.remarks.missed(
                f"block {block.label} kept its starting grids",
                names,
                reason=f"learning did not lower the block's output loss ({res.loss_start:.4g})",
            )
            return
        for layer in block.layers:
            t = graph.tensors[layer.weight]
            t.set_data(weights[layer.weight].astype(t.constant_data().dtype))
            t.encoding = res.encodings[layer.weight]
            t.meta["encoding_source"] = "adascale"
        bits = "/".join(str(b) for b in sorted({la.bitwidth for la in block.layers}))
        sources = "/".join(sorted({la.source for la in block.layers}))
        self.remarks.applied(
            f"block {block.label} ({len(block.ops)} ops, {len(names)} {bits}-bit weights from {sources} grids): "
            f"output loss {res.loss_start:.4g} -> {res.loss:.4g} "
            f"({training.gain_db(res.mse_start, res.mse):+.2f} dB MSE vs the starting grids)",
            names,
        )
