"""One onnxruntime session for every AMP candidate: a fake-quant model whose quantizers are inputs.

Every quantizer of the lowered QDQ model becomes ``Clip(DequantizeLinear(QuantizeLinear(x)))`` on a
16-bit grid, with scale, zero point and the clamp bounds as graph inputs: an 8-bit quantizer is
the same ops with a narrower clamp. Weights and biases are inputs too, fed already fake-quantized
by the same numpy code the lowering uses. A bitwidth change is then just other input values: one
session serves every assignment. (The price: onnxruntime runs fed Conv weights with its plain
kernel, as the lowered model with exact QDQ semantics does, not in the blocked layout it gives
constant FP32 weights.) ``simulation_graph`` builds that model; this module feeds it, prunes it per
layout and opens its sessions.

Most of those quantizers are the identity for a given assignment: a convert between two groups
of the same bitwidth requantizes onto the grid the values are already on, and a data-movement
output (MaxPool, Reshape, Split...) re-quantized on its input's grid is its input; a 16-bit
quantizer's clamp is the 16-bit saturation. ``pruned(layout)`` writes the model of one assignment's
*layout* (which quantizers run, at which bitwidth) without them: identities removed, each
remaining quantizer as the real model's own ``Q -> DQ`` on an 8- or 16-bit integer type (no
clamp). The values are the same bit for bit; the work is what the lowered model does. A pruned
model costs one session build (about a third of the full model's), so the scorer uses one only
where an evaluation costs much more than that (``qpasses.amp.evaluators``); every assignment
with the same layout (every weight-only change, every uniform assignment) shares it.

The feeds reproduce what ``quantize_model`` + ``insert-converts`` build for the assignment:

- each group's activations (and data-movement outputs sharing them) on their calibrated grid at
  the group's activation bitwidth;
- one edge quantizer per (tensor, reading group): the convert ``requantized(source, b_reader)``
  (idempotent when the bitwidths agree, so it costs no accuracy where the real model has none);
- float-op outputs read by int ops: calibrated at the widest reader's bitwidth, re-gridded;
- weights at the group's parameter bitwidth; int32 biases at ``s_in x s_w`` (weight scale raised
  where the bias would overflow, as ``bias_encoding`` does); other constants as encode-weights.

Float candidates (fp16 ops) are not simulated; ``unsupported_reason`` says so and the caller
falls back to building real QDQ models. With graph optimizations off the outputs equal the real
model's bit for bit; with them on, onnxruntime runs the real int8 Conv/Gemm as integer kernels, so
a few outputs can differ in the last bit (the tests bound the score difference).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from graph_ir import Graph
from qpasses.amp.candidates import Assignment
from qpasses.amp.fake_quant import (
    LAYOUT_GENERIC,
    LAYOUT_IDENTITY,
    QUANTIZER_INPUT_SUFFIXES,
    Layout,
    SimulatedSession,
    dequantized,
    quantizer_inputs,
    weight_encoding,
)
from qpasses.amp.groups import GroupPartition
from qpasses.amp.simulation_graph import SimulationGraphBuilder
from qpasses.amp.statistics import CalibrationTables
from qpasses.core.analyses import Shapes
from qpasses.core.context import PassContext
from qpasses.core.verification import session_options
from qpasses.passes.cleanup.opset_upgrade import upgrade_opset
from qpasses.quant.config import QuantConfig
from qpasses.quant.encodings import Encoding
from qpasses.quant.plan import QuantPlanData, build_plan
from qpasses.quant.precision_type import requantized
from qpasses.quant.range_search import bias_encoding, compute


class SimulationModel:
    """The fake-quant model of a prepared FP32 graph, and the feeds of any assignment."""

    def __init__(
        self,
        graph: Graph,
        partition: GroupPartition,
        tables: CalibrationTables,
        config: QuantConfig,
        *,
        per_channel_weights: bool = True,
    ) -> None:
        self.partition = partition
        self.tables = tables
        self.config = config
        self.per_channel = config.per_channel and per_channel_weights
        # Activation grids are signed only in symmetric mode: one zero-point type serves every bitwidth.
        self.zp_type = TensorProto.INT16 if config.act_mode == "symmetric" else TensorProto.UINT16
        self.source = graph
        self.plan: QuantPlanData = build_plan(graph, PassContext().get(Shapes, graph))
        self.group_of = {op: g.name for g in partition for op in g.ops}
        self.input_names = tuple(graph.inputs)
        self.output_names = tuple(graph.outputs)
        self._data = {name: graph.tensors[name].constant_data() for name in (*self.plan.weights, *self.plan.biases)}
        self._cache: dict[Any, Any] = {}
        self.roots = sorted({self.plan.root(t) for t in partition.owner})
        self.readers = {t: [g.name for g in partition if t in g.reads] for t in partition.float_sources}
        work = graph.copy()
        if work.opset() < 21:
            upgrade_opset(work, 21)  # 16-bit QuantizeLinear, as the lowering does for int16
        builder = SimulationGraphBuilder(self.plan, partition, config, self.zp_type)
        self.model = builder.build(work)
        self.edges = builder.edges  # (source tensor, reading group)
        self.quantizers = builder.quantizers

    # --- feeds ---------------------------------------------------------------------------------
    def _act(self, root: str, bitwidth: int) -> Encoding:
        enc = self.tables.activation(root, bitwidth)
        if enc is None:
            raise KeyError(f"no calibrated encoding for activation {root!r} at {bitwidth} bits")
        return enc

    def _weight_enc(self, name: str, bitwidth: int) -> Encoding:
        key = ("we", name, bitwidth)
        if key not in self._cache:
            spec = self.plan.weights[name]
            self._cache[key] = weight_encoding(
                self._data[name], bitwidth, spec.axis, per_channel=self.per_channel, mode=self.config.weight_mode
            )
        return self._cache[key]

    def _source(self, tensor: str, assignment: Assignment) -> tuple[str, int]:
        """(root, bitwidth) of the grid a quantized activation is on under ``assignment``."""
        root = self.plan.root(tensor)
        owner = self.partition.owner.get(root)
        if owner is not None:
            return root, assignment[owner].act.bitwidth
        return root, max(assignment[g].act.bitwidth for g in self.readers[root])

    def source_encoding(self, tensor: str, assignment: Assignment) -> Encoding:
        """The encoding a quantized activation carries under ``assignment`` (float sources: widest reader)."""
        return self._act(*self._source(tensor, assignment))

    def _grid(self, root: str, bitwidth: int, target: int | None = None) -> tuple[Encoding, tuple[np.ndarray, ...]]:
        """The encoding of ``root`` at ``bitwidth`` (requantized to ``target`` bits) and its quantizer inputs."""
        key = ("g", root, bitwidth, target)
        if key not in self._cache:
            enc = self._act(root, bitwidth)
            if target is not None:
                enc = requantized(enc, target)
            self._cache[key] = (enc, quantizer_inputs(enc))
        return self._cache[key]

    def _bias(self, key: tuple[Any, ...]) -> tuple[np.ndarray, Encoding]:
        """The fake-quantized bias of ``key`` = (bias, input (root, bitwidth), op bitwidth, weight bitwidth,
        key of the previous bias of the same weight or None), and the weight encoding it leaves (an int32
        bias may raise the weight's scale; the next bias of a shared weight starts from that)."""
        if key not in self._cache:
            name, (root, bw), op_bw, param_bw, previous = key
            spec = self.plan.biases[name]
            in_enc = self._grid(root, bw, op_bw)[0]
            w_enc = self._weight_enc(spec.weight, param_bw) if previous is None else self._bias(previous)[1]
            corrected = self.tables.bias(name, param_bw)
            data = self._data[name] if corrected is None else corrected
            if self.config.bias_bw < 32:
                b_enc, after = compute(data.astype(np.float64), self.config.bias_bw, "symmetric", role="bias"), w_enc
            else:
                b_enc, after = bias_encoding(data.astype(np.float64), in_enc.scale[0], w_enc, self.config.bias_bw)
            self._cache[key] = (dequantized(data, b_enc), after)
        return self._cache[key]

    def feeds(self, assignment: Assignment) -> dict[str, np.ndarray]:
        """Every quantizer input of the simulation model for one assignment."""
        return self.plan_feeds(assignment)[0]

    def plan_feeds(self, assignment: Assignment) -> tuple[dict[str, np.ndarray], Layout]:
        """The feeds of one assignment and its layout (what each quantizer does; see ``pruned``).

        Memoized per quantizer, bias and weight (keyed by root and bitwidths), so an assignment costs
        dictionary lookups, not encodings: phase 1 and the proxy score hundreds of them.
        """
        out: dict[str, np.ndarray] = {}
        bits: dict[str, int] = {}  # quantizer prefix -> bitwidth, or 0 for a convert onto the same grid

        def put(prefix: str, params: tuple[np.ndarray, ...]) -> None:
            for suffix, value in zip(QUANTIZER_INPUT_SUFFIXES, params, strict=True):
                out[f"{prefix}.{suffix}"] = value

        sources: dict[str, tuple[str, int]] = {}
        for root in self.roots:
            sources[root] = source = self._source(root, assignment)
            enc, params = self._grid(*source)
            put(f"amp.a.{root}", params)
            bits[f"amp.a.{root}"] = enc.bitwidth
        for edge_source, reader_group in self.edges:
            root, bw = sources.get(edge_source) or self._source(edge_source, assignment)
            reader = assignment[reader_group].act.bitwidth
            enc, params = self._grid(root, bw, reader)
            prefix = f"amp.e.{edge_source}.{reader_group}"
            put(prefix, params)
            bits[prefix] = LAYOUT_IDENTITY if reader == bw else enc.bitwidth  # requantized() keeps a same-width grid
        weight_bw: dict[str, int] = {}
        last_bias: dict[str, tuple[Any, ...] | None] = {}  # weight -> key of its last bias (its grid after it)
        for group in self.partition:
            for name in group.weights:
                weight_bw[name] = assignment[group.name].param.bitwidth
                last_bias[name] = None
        for name, spec in self.plan.biases.items():
            group = assignment[self.group_of[spec.op]]
            key = (
                name,
                self._source(spec.input, assignment),
                group.act.bitwidth,
                group.param.bitwidth,
                last_bias[spec.weight],
            )
            out[f"amp.p.{name}"] = self._bias(key)[0]
            last_bias[spec.weight] = key
        for name, bw in weight_bw.items():
            previous = last_bias[name]
            cache_key = ("w", name, bw, previous)
            if cache_key not in self._cache:
                enc = self._weight_enc(name, bw) if previous is None else self._bias(previous)[1]
                self._cache[cache_key] = dequantized(self._data[name], enc)
            out[f"amp.p.{name}"] = self._cache[cache_key]
        layout = tuple(
            LAYOUT_IDENTITY
            if q.follows or (q.edge is not None and bits[q.prefix] == LAYOUT_IDENTITY)
            else bits[q.prefix]
            if bits[q.prefix] in (8, 16)
            else LAYOUT_GENERIC
            for q in self.quantizers
        )
        return out, layout

    def pruned(self, layout: Layout) -> onnx.ModelProto:
        """The simulation model of one layout: identity quantizers gone, the rest native ``Q -> DQ``.

        An 8-bit quantizer becomes Q/DQ on (u)int8, whose saturation is the clamp; a 16-bit one keeps
        the 16-bit type and drops the Clip (the same saturation). Values equal the full model's bit for
        bit. Inputs no op reads any more are removed; ``pruned_feeds`` adapts the feeds.
        """
        model = onnx.ModelProto()
        model.CopyFrom(self.model)
        graph = model.graph
        nodes = {n.name: n for n in graph.node}
        outputs = set(self.output_names)
        drop: set[str] = set()
        rename: dict[str, str] = {}
        passthrough: list[onnx.NodeProto] = []
        narrow: set[str] = set()  # zero-point inputs of 8-bit quantizers
        for q, kind in zip(self.quantizers, layout, strict=True):
            if kind == LAYOUT_GENERIC:
                continue
            q_op, dq_op, clip_op = q.ops
            drop.add(clip_op)
            if kind == LAYOUT_IDENTITY:
                drop.update((q_op, dq_op))
                if q.y in outputs:
                    passthrough.append(helper.make_node("Identity", [q.x], [q.y], name=f"{clip_op}_pass"))
                else:
                    rename[q.y] = q.x
                continue
            nodes[dq_op].output[0] = q.y
            if kind == 8:
                narrow.add(f"{q.prefix}.zp")

        def resolve(name: str) -> str:
            while name in rename:
                name = rename[name]
            return name

        kept = [n for n in graph.node if n.name not in drop]
        for n in kept:
            for i, name in enumerate(n.input):
                if name in rename:
                    n.input[i] = resolve(name)
        for n in passthrough:
            n.input[0] = resolve(n.input[0])
        del graph.node[:]
        graph.node.extend([*kept, *passthrough])
        used = {name for n in graph.node for name in n.input} | outputs
        inputs = [i for i in graph.input if i.name in used]
        narrow_type = TensorProto.INT8 if self.zp_type == TensorProto.INT16 else TensorProto.UINT8
        for i in inputs:
            if i.name in narrow:
                i.type.tensor_type.elem_type = narrow_type
        del graph.input[:]
        graph.input.extend(inputs)
        return model

    def session(self, *, intra_op_threads: int = 0, layout: Layout | None = None) -> SimulatedSession:
        """A fresh onnxruntime session of the simulation model (build once, reuse for every assignment),
        or of the pruned model of one ``layout`` (graph optimizations off: onnxruntime would otherwise
        fuse its native Q/DQ pairs into integer kernels, which round differently)."""
        if layout is None:
            model, opts = self.model, session_options(intra_op_threads=intra_op_threads)
        else:
            model, opts = self.pruned(layout), session_options(intra_op_threads=intra_op_threads, optimize=False)
            # No arena: several pruned sessions are kept, and each arena would hold its own high-water mark
            # for good (dnsmos_p808: 8 x ~0.3 GB); through malloc they reuse the same memory.
            opts.enable_cpu_mem_arena = False
        sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        if layout is None:
            return SimulatedSession(sess, self.input_names, self.output_names)
        narrow = {
            i.name: np.int8 if i.type.tensor_type.elem_type == TensorProto.INT8 else np.uint8
            for i in model.graph.input
            if i.type.tensor_type.elem_type in (TensorProto.INT8, TensorProto.UINT8)
        }
        return SimulatedSession(
            sess,
            self.input_names,
            self.output_names,
            accepts=frozenset(i.name for i in sess.get_inputs()),
            narrow=narrow,
        )


def unsupported_reason(partition: GroupPartition, plan: QuantPlanData, has_float_candidates: bool) -> str | None:
    """Why the simulation cannot stand in for the real QDQ model here (None: it can)."""
    if has_float_candidates:
        return "float candidates run float16 ops, which the fake-quant simulation does not model"
    shared_of_float = {s for s, r in plan.shared.items() if r in partition.float_sources}
    for g in partition:
        hit = shared_of_float.intersection(g.reads)
        if hit:
            return f"group {g.name} reads float-op output {sorted(hit)[0]} through data-movement ops"
    return None
