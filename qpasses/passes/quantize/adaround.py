"""AdaRound: learn whether each weight rounds up or down, layer by layer, on calibration data.

Nagel et al. 2020, "Up or Down? Adaptive Rounding for Post-Training Quantization", as AIMET runs it.
Rounding to nearest minimises each weight's own error, not the layer's output error. Per
Conv/ConvTranspose/Gemm/MatMul with a constant weight, in topological order, on a grid (below), each
weight gets a rounding variable V: ``q = clamp(floor(w / s) + h(V) - offset, 0, 2^b - 1)`` with the
rectified sigmoid ``h(V) = clip(sigmoid(V) (zeta - gamma) + gamma, 0, 1)`` (zeta 1.1, gamma -0.1).
Adam minimises the layer's output error (after a following Relu/Clip, or bias Add and Relu/Clip,
which the backend fuses) plus ``reg_param * sum(1 - |2h - 1|^beta)``, beta annealed from 20 to 2
after a 20% warm start, which drives every h(V) to 0 or 1. Then each weight rounds up where V >= 0
(never more than one grid step from its FP32 value clamped to the grid) and the weight data is
replaced by those grid values: the encoding is frozen (``meta["encoding_source"] = "adaround"``,
kept by ``encode-weights``) and the lowered model stores the learned integers.

The grid (``grid``): ``seq-mse`` (default; with ``mode`` symmetric) first searches each layer's
per-channel ranges as the ``seq-mse`` pass does (``k/N x`` min-max, scored on the layer output over
the learning batches), then keeps that grid or min-max's, whichever rounds to nearest with the lower
output loss on the held-out batches, and learns the rounding on it. The paper sets the grid by an
MSE search too: rounding can only move each weight by one step, so a grid spent on outliers (min-max
at 4 bits) caps what learning can recover. ``mode`` learns on the grid ``encode-weights`` would use.
A weight SeqMSE already encoded (``seq-mse`` ran first) keeps its grid.

Inputs (``input_from``): ``quantized`` (AIMET's way) feeds each layer what the model computes with
the layers before it already rounded (activations float; they are calibrated afterwards), and
compares with the FP32 model's output; ``fp32`` feeds both the FP32 inputs. onnxruntime captures
the data; torch (an optional extra) computes the gradients through qpasses' own IR -> torch op
mapping.

Held-out batches (``holdout``, default 0.2: a fifth of the calibration batches, at least one, spread
over the calibration order) take no part in the learning. On them each layer compares its learned
rounding with rounding to nearest on the same grid, with the same inputs, and keeps whichever
reconstructs the layer output better: learning on few samples can fit them and lose on new data,
which the learning batches themselves cannot show. ``holdout=0`` learns on every batch and compares
on them (then only a failed optimisation keeps nearest). A remark counts the layers kept at nearest.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Final

import numpy as np

from graph_ir import Graph
from qpasses.core.analyses import Shapes, TopologicalOrder
from qpasses.core.context import PassContext
from qpasses.core.errors import PassError
from qpasses.core.pass_base import PassResult
from qpasses.data.sessions import unavailable_tensors
from qpasses.data.statistics import capture
from qpasses.learned import check_common_options
from qpasses.learned.layers import (
    Layer,
    activation_after,
    count_samples,
    learnable_layers,
)
from qpasses.passes.quantize.layer_kernels import Unsupported as NoKernel
from qpasses.passes.quantize.layer_kernels import constant_bias, make_kernel
from qpasses.passes.quantize.learned_weights import LearnedWeightsPass
from qpasses.passes.quantize.seq_mse_search import Layer as SearchLayer
from qpasses.passes.quantize.seq_mse_search import search_layer
from qpasses.quant.encodings import Encoding, fake_quantize
from qpasses.quant.plan import QuantPlan

GRIDS: Final = ("seq-mse", "mode")


@dataclass(frozen=True)
class AdaRoundResult:
    """What AdaRound did to one layer (the ``AdaRoundResults`` artifact, by op name)."""

    weight: str
    encoding: Encoding
    loss_nearest: float  # reconstruction loss rounding to nearest on the same grid (on the held-out batches)
    loss: float  # with the learned rounding (== loss_nearest when nearest was kept)
    mse_nearest: float
    mse: float
    flipped: float  # fraction of weights not rounded to nearest
    kept_nearest: bool
    held_out: int = 0  # batches the losses were measured on, none of them learned on (0: the learning batches)
    grid: str = ""  # the grid learned on: "min-max" (the mode's), "seq-mse" (the pass's), "seq-mse search"


class AdaRoundResults(dict[str, AdaRoundResult]):
    """Artifact: per layer op name, what AdaRound learned."""


@dataclass
class _Task:
    """A layer with its torch program (the op, plus the activation the loss is taken after)."""

    layer: Layer
    program: Any
    output: str


class AdaRound(LearnedWeightsPass):
    name = "adaround"
    description = "AdaRound: learned up/down rounding of Conv/Gemm/MatMul weights on calibration data (needs torch)"
    uses = (QuantPlan,)
    preserves = (TopologicalOrder, Shapes, QuantPlan)

    @dataclass
    class Options:
        iterations: int = 1000  # Adam steps per layer (AIMET's default is 10000 at lr 1e-3)
        num_batches: int = 16  # calibration batches captured per layer
        batch_size: int = 16  # samples per batch; one batch per step
        lr: float = 1e-2
        reg_param: float = 0.01
        beta_start: float = 20.0
        beta_end: float = 2.0
        warm_start: float = 0.2  # fraction of the iterations without the regularizer
        input_from: str = "quantized"  # or fp32
        activation: bool = True  # loss after a Relu/Clip that alone reads the layer's output (or its bias Add)
        weight_bw: int = 8
        per_channel: bool = True
        mode: str = "symmetric"  # weight encoding mode, as encode-weights
        exclude: list[str] = field(default_factory=list)
        grid: str = "seq-mse"  # or "mode": encode-weights' grid (min-max for symmetric)
        num_candidates: int = 20  # grid search: candidates k/N x min-max
        holdout: float = 0.2  # fraction of the batches kept out of learning to choose learned vs nearest; 0: none
        threads: int = 0  # torch intra-op threads; 0: 1 for small layers, torch's default for large ones
        progress: bool = True

    def _check_options(self) -> None:
        o = self.options
        check_common_options(self.name, o, ("iterations", "num_batches", "batch_size"))
        if not (o.lr > 0 and o.reg_param >= 0 and 0 <= o.warm_start < 1 and o.beta_start > 0 and o.beta_end > 0):
            raise PassError(
                "pass 'adaround': lr, beta_start and beta_end must be > 0, reg_param >= 0 and "
                f"warm_start in [0, 1) (got lr={o.lr}, reg_param={o.reg_param}, "
                f"beta {o.beta_start}->{o.beta_end}, warm_start={o.warm_start})"
            )
        if o.grid not in GRIDS:
            raise PassError(f"pass 'adaround': unknown grid {o.grid!r} (expected one of {', '.join(GRIDS)})")
        if o.num_candidates < 1:
            raise PassError(f"pass 'adaround': num_candidates must be >= 1, got {o.num_candidates}")
        if not 0 <= o.holdout < 1:
            raise PassError(
                f"pass 'adaround': holdout must be in [0, 1) (the fraction of calibration batches kept out of "
                f"learning), got {o.holdout}"
            )

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        self._check_options()
        o = self.options
        setup = self.setup(graph, ctx)
        training, plan = setup.training, setup.plan
        layers = learnable_layers(
            graph,
            ctx.get(TopologicalOrder, graph).order,
            plan.weights,
            self.remarks,
            weight_bw=o.weight_bw,
            per_channel=setup.per_channel,
            mode=o.mode,
            exclude=o.exclude,
        )
        model = graph.to_onnx()
        tasks = self._tasks(graph, model, layers)
        if not tasks:
            self.remarks.analysis("no supported layers to learn")
            return self.result(False)

        learning = self.learning_data(graph, ctx, setup)
        feeds, quantized, generator = learning.feeds, learning.quantized, learning.generator
        held = training.held_out_batches(len(feeds), o.holdout)
        if o.holdout and not held:
            self.remarks.missed(
                "no batch held out",
                reason=f"holdout needs 2 or more calibration batches, got {len(feeds)}: learned and nearest "
                "rounding are compared on the learning batch",
            )
        search = o.grid == "seq-mse"
        if search and o.mode != "symmetric":
            search = False
            self.remarks.missed(
                "grids not searched", reason=f"the seq-mse grid search is symmetric; mode is {o.mode}: its grid is used"
            )
        results: dict[str, AdaRoundResult] = {}
        bar = training.progress_bar(len(tasks), "adaround", o.progress, "layer")
        try:
            for task in tasks:
                layer = task.layer
                bar.set_postfix_str(layer.name[-40:])
                searching = search and layer.source != "seq-mse"
                if quantized is None:
                    data = capture(model, feeds, [layer.input, task.output])
                    inputs = fp_inputs = data[layer.input]
                else:  # the FP32 model's output, the input the model computes with earlier layers learned
                    data = capture(model, feeds, [task.output, *([layer.input] if searching else [])])
                    inputs = capture(quantized.model, feeds, [layer.input])[layer.input]
                    fp_inputs = data.get(layer.input, inputs)
                x, y = training.as_tensors(inputs), training.as_tensors(data[task.output])
                if searching:
                    task = self._searched_grid(graph, task, (fp_inputs, inputs), (x, y), held, setup)
                    layer = task.layer
                res, weight = self._learn(task, x, y, held, generator, training)
                self._freeze(graph, layer, res, weight, training)
                if quantized is not None:
                    quantized.set(layer.weight, weight)
                results[layer.name] = res
                bar.update()
        finally:
            bar.close()
        ctx.artifacts.put(AdaRoundResults(results))
        learned = sum(not r.kept_nearest for r in results.values())
        chosen = f"{len(held)} of them held out to choose" if held else "compared on them"
        self.remarks.applied(
            f"learned the rounding of {learned} of {len(results)} weights ({o.iterations} "
            f"iterations, inputs {o.input_from}) on {count_samples(feeds)} samples in "
            f"{len(feeds)} batches ({chosen}: {len(results) - learned} of {len(results)} layers kept rounding "
            "to nearest)"
        )
        return self.result(bool(results))

    def _tasks(self, graph: Graph, model: Any, layers: list[Layer]) -> list[_Task]:
        """Torch programs per layer; layers the mapping or onnxruntime cannot serve get a 'missed' remark."""
        from qpasses.learned.torch_ops import TorchProgram, Unsupported

        tasks = []
        for layer in layers:
            ops = [layer.op, *(activation_after(graph, layer.op) if self.options.activation else [])]
            output = ops[-1].outputs[0]
            try:
                tasks.append(_Task(layer, TorchProgram(graph, ops, [layer.input], [output]), output))
            except Unsupported as exc:
                self.remarks.missed("not learned", [layer.name], reason=str(exc))
        missing = unavailable_tensors(model, [n for t in tasks for n in (t.layer.input, t.output)])
        kept = []
        for task in tasks:
            name = next((n for n in (task.layer.input, task.output) if n in missing), None)
            if name is None:
                kept.append(task)
            else:
                self.remarks.missed("not learned", [task.layer.name], reason=f"'{name}' is {missing[name]}")
        return kept

    def _learn(
        self, task: _Task, inputs: list, targets: list, held: list[int], generator: Any, training: Any
    ) -> tuple[AdaRoundResult, np.ndarray]:
        """Learn on the batches not in ``held``; keep the learned or the nearest rounding, whichever has the
        lower loss on ``held`` (on the learning batches when ``held`` is empty)."""
        import torch

        o = self.options
        layer, program = task.layer, task.program
        quantizer = training.AdaRoundWeight(layer.data, layer.encoding)
        nearest = fake_quantize(layer.data, layer.encoding).astype(np.float32)
        nearest_t = torch.from_numpy(nearest)

        learn = [i for i in range(len(inputs)) if i not in held]

        def forward(i: int, weight: torch.Tensor) -> torch.Tensor:
            return program({layer.input: inputs[i]}, {layer.weight: weight})[0]

        judge = self._judge(task, inputs, targets, held or learn, training)
        threads = training.pick_threads(o.threads, program.macs({layer.input: inputs[0]}, {layer.weight: nearest_t}))
        with training.torch_threads(threads):
            before = judge(nearest_t)
            optimizer = torch.optim.Adam([quantizer.v], lr=o.lr)
            steps = [learn[b] for b in training.batch_order(o.iterations, len(learn), generator)]
            bar = training.progress_bar(o.iterations, f"  {layer.name[-30:]}", o.progress, "it")
            try:
                for step, b in enumerate(steps):
                    loss = training.reconstruction_loss(forward(b, quantizer()), targets[b])
                    beta = training.beta_at(step, o.iterations, (o.beta_start, o.beta_end), o.warm_start)
                    if beta is not None and o.reg_param:
                        loss = loss + o.reg_param * quantizer.regularizer(beta)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    bar.update()
            finally:
                bar.close()
            encoding, weight, _ = quantizer.result()
            after = judge(torch.from_numpy(weight))
        kept = after.loss > before.loss
        if kept:
            weight, after = nearest, before
        flipped = float(np.mean(weight != nearest))
        losses = (before.loss, after.loss, before.mse, after.mse)
        return AdaRoundResult(layer.weight, encoding, *losses, flipped, kept, len(held), layer.source), weight

    @staticmethod
    def _judge(task: _Task, inputs: list, targets: list, judged: list[int], training: Any) -> Any:
        """weight -> the layer's output loss summary on the ``judged`` batches."""
        layer, program = task.layer, task.program
        return lambda weight: training.evaluate(
            lambda j: program({layer.input: inputs[judged[j]]}, {layer.weight: weight})[0],
            [targets[i] for i in judged],
        )

    def _searched_grid(
        self,
        graph: Graph,
        task: _Task,
        inputs: tuple[list[np.ndarray], list[np.ndarray]],
        tensors: tuple[list, list],
        held: list[int],
        setup: Any,
    ) -> _Task:
        """The task on SeqMSE's grid searched on the learning batches (FP32 output on FP32 inputs vs the
        quantized layer on its quantized inputs), or on min-max's when that rounds to nearest better on
        the held-out batches."""
        import torch

        o, layer = self.options, task.layer
        try:
            kernel = make_kernel(layer.op, layer.data.shape)
        except NoKernel as exc:
            self.remarks.missed("grid not searched", [layer.name], reason=f"unsupported {layer.op.op_type}: {exc}")
            return task
        learn = [i for i in range(len(inputs[0])) if i not in held]
        fp, q = inputs
        found = search_layer(
            SearchLayer(
                layer.name,
                layer.op.op_type,
                layer.input,
                layer.weight,
                layer.data,
                constant_bias(graph, layer.op, layer.data.shape, kernel),
                kernel,
                layer.channel_axis,
                layer.bitwidth,
            ),
            [fp[i] for i in learn],
            None if q is fp else [q[i] for i in learn],
            num_candidates=o.num_candidates,
            loss_fn="mse",
            per_channel=setup.per_channel,
        )
        searched = replace(task, layer=replace(layer, encoding=found.encoding, source="seq-mse search"))
        if not held:
            return searched
        x, y = tensors
        judge = self._judge(task, x, y, held, setup.training)
        losses = [
            judge(torch.from_numpy(fake_quantize(layer.data, t.layer.encoding).astype(np.float32))).loss
            for t in (task, searched)
        ]
        return searched if losses[1] <= losses[0] else task

    def _freeze(self, graph: Graph, layer: Layer, res: AdaRoundResult, weight: np.ndarray, training: Any) -> None:
        t = graph.tensors[layer.weight]
        t.set_data(weight.astype(t.constant_data().dtype))
        t.encoding = res.encoding
        t.meta["encoding_source"] = "adaround"
        what = f"{layer.bitwidth}-bit {layer.op.op_type} weight on the {layer.source} grid"
        if res.kept_nearest:
            self.remarks.missed(
                f"{what} kept rounding to nearest",
                [layer.name],
                reason="learned rounding did not lower the output loss on the "
                f"{f'{res.held_out} held-out' if res.held_out else 'learning'} batches ({res.loss_nearest:.4g})",
            )
            return
        self.remarks.applied(
            f"{what}: output loss {res.loss_nearest:.4g} -> {res.loss:.4g} "
            f"({training.gain_db(res.mse_nearest, res.mse):+.2f} dB MSE vs rounding to nearest); "
            f"{res.flipped:.1%} of weights rounded the other way",
            [layer.name],
        )
