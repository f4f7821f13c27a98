"""The AMP simulation's ONNX model, built once from the prepared FP32 graph.

Every quantizer the lowered QDQ model would have becomes ``Clip(DequantizeLinear(QuantizeLinear(x)))``
on a 16-bit grid whose scale, zero point and clamp bounds are graph inputs: activations where they
are produced, one edge quantizer per (tensor, reading group) for the converts, weights and biases
as inputs fed fake-quantized, other float constants fake-quantized in place. Apart from
``simulation`` (the feeds of an assignment, pruned layouts, sessions) because the graph rewrite runs
once and shares nothing with those but the quantizer list it records.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto

from graph_ir import Graph
from qpasses.amp.fake_quant import QUANTIZER_INPUT_SUFFIXES, FakeQuantizer, dequantized
from qpasses.amp.groups import GroupPartition
from qpasses.quant.config import QuantConfig
from qpasses.quant.plan import DATA_MOVEMENT, QuantPlanData
from qpasses.quant.range_search import compute
from qpasses.targets.quantizable_ops import activation_slots


class SimulationGraphBuilder:
    """Builds the fake-quant model; ``edges`` and ``quantizers`` record what it inserted, in order."""

    def __init__(self, plan: QuantPlanData, partition: GroupPartition, config: QuantConfig, zp_type: int) -> None:
        self.plan = plan
        self.partition = partition
        self.config = config
        self.zp_type = zp_type
        self.edges: list[tuple[str, str]] = []  # (source tensor, reading group)
        self.quantizers: list[FakeQuantizer] = []

    def _fake_quant(
        self,
        graph: Graph,
        x: str,
        prefix: str,
        out: str | None = None,
        *,
        edge: tuple[str, str] | None = None,
        follows: bool = False,
    ) -> str:
        """``Clip(DQ(Q(x)))`` on a 16-bit grid: every bitwidth up to 16 is the same ops, other inputs.

        Clamping the dequantized value to ``[(qmin - zp) s, (qmax - zp) s]`` equals clamping the
        integer (dequantization is monotone), so the result is the b-bit QDQ value bit for bit.
        """
        names = [f"{prefix}.{s}" for s in QUANTIZER_INPUT_SUFFIXES]
        types = (TensorProto.FLOAT, self.zp_type, TensorProto.FLOAT, TensorProto.FLOAT)
        for n, elem in zip(names, types, strict=True):
            if n not in graph.tensors:
                graph.add_tensor(n)
                graph.inputs.append(n)
                graph.tensors[n].set_type(elem, ())
        scale, zp, lo, hi = names
        base = graph.unique_name(f"{x}_amp")
        q = graph.add_op(
            "QuantizeLinear", [x, scale, zp], [graph.unique_name(f"{base}_q")], name=graph.unique_name(f"{base}_Q")
        )
        dq = graph.add_op(
            "DequantizeLinear",
            [q.outputs[0], scale, zp],
            [graph.unique_name(f"{base}_dq")],
            name=graph.unique_name(f"{base}_DQ"),
        )
        result = out if out is not None else graph.unique_name(f"{base}_fq")
        clip = graph.add_op("Clip", [dq.outputs[0], lo, hi], [result], name=graph.unique_name(f"{base}_Clip"))
        self.quantizers.append(FakeQuantizer(prefix, (q.name, dq.name, clip.name), x, result, edge, follows))
        return result

    def _quantize_tensor(self, graph: Graph, name: str, prefix: str) -> str:
        """Fake-quantize an activation where it is produced; every reader (and a graph output) sees it."""
        producer = graph.producer(name)
        # Data movement keeps values (Pad may add a constant): its output is on its input's grid already.
        follows = (
            self.plan.root(name) != name
            and producer is not None
            and producer.op_type in DATA_MOVEMENT
            and producer.op_type != "Pad"
        )
        if graph.is_graph_output(name):
            pre = graph.rename_tensor(name, graph.unique_name(f"{name}_fp")).name
            graph.outputs = [name if o == pre else o for o in graph.outputs]
            self._fake_quant(graph, pre, prefix, out=name, follows=follows)
            return name
        readers = graph.uses(name)
        fq = self._fake_quant(graph, name, prefix, follows=follows)
        for op, slot in readers:
            graph.replace_use(op, slot, fq)
        return fq

    def build(self, graph: Graph) -> onnx.ModelProto:
        """Rewrite ``graph`` (a copy of the FP32 graph, in place) into the simulation model."""
        plan, partition = self.plan, self.partition
        fq: dict[str, str] = {}
        # Activations at their producer, in topological order so shared outputs see quantized inputs.
        owned = set(partition.owner)
        for name in [*graph.inputs]:
            if name in owned:
                fq[name] = self._quantize_tensor(graph, name, f"amp.a.{plan.root(name)}")
        for op in graph.topological_order():
            for out in list(op.outputs):
                if out in owned and out not in fq:
                    fq[out] = self._quantize_tensor(graph, out, f"amp.a.{plan.root(out)}")
        # Converts: one edge quantizer per (source tensor, reading group).
        ops = {op.name: op for op in graph.ops}
        for group in partition:
            for source in group.reads:
                current = fq.get(source, source)
                edge = None
                for op_name in group.ops:
                    op = ops[op_name]
                    for slot in activation_slots(op):
                        if slot < len(op.inputs) and op.inputs[slot] == current:
                            if edge is None:
                                # A convert of a quantized tensor; a float source's only quantizer is this one.
                                key = (source, group.name) if source in fq else None
                                edge = self._fake_quant(graph, current, f"amp.e.{source}.{group.name}", edge=key)
                                self.edges.append((source, group.name))
                            graph.set_input(op, slot, edge)
        # Weights and biases become inputs fed fake-quantized; other constants are fake-quantized in place.
        for name in (*plan.weights, *plan.biases):
            t = graph.tensors[name]
            feed = f"amp.p.{name}"
            graph.add_tensor(feed)
            graph.inputs.append(feed)
            graph.tensors[feed].set_type(TensorProto.FLOAT, tuple(t.constant_data().shape))
            for op, slot in graph.uses(name):
                graph.replace_use(op, slot, feed)
        for name in plan.params:
            t = graph.tensors[name]
            if t.data is None or not np.issubdtype(t.data.dtype, np.floating):
                continue
            mode = "tf" if self.config.weight_mode == "adjusted" else self.config.weight_mode
            enc = compute(t.data, 8, mode, role="weight")
            t.set_data(dequantized(t.data, enc).astype(t.data.dtype))
        graph.remove_unused_initializers()
        model = graph.to_onnx()
        if model.ir_version < 4:
            model.ir_version = 4
        return model
