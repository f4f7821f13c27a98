"""How much of a quantized model's compute onnxruntime really runs in integer kernels.

A QDQ model says which tensors are quantized; which Conv/Gemm/MatMul onnxruntime then runs as an
integer kernel (QLinearConv, QGemm, MatMulInteger...) depends on its QDQ fusions: a DequantizeLinear
-> Conv whose output is not quantized right after (e.g. a float Conv output ahead of a fused
activation) stays a float Conv on dequantized weights. The metric alone does not show that, so
``integer_mac_share`` lets onnxruntime optimize the model, then weighs every compute node of the
optimized graph by its multiply-accumulates.

Level: ``ORT_ENABLE_EXTENDED``. Every QDQ -> integer-kernel fusion (QDQSelectorActionTransformer)
and float fusion (FusedConv, FusedMatMul...) is made at that level; what the default session
(``ORT_ENABLE_ALL``) adds is layout work only (NCHWc float Convs, NHWC QLinearConv with Transposes),
which does not change which compute runs in integers, but whose blocked shapes would make MACs
hard to read off. The saved EXTENDED model is plain ONNX + com.microsoft ops in the original layout.

MACs come from real shapes: the optimized model is run once on the given feeds with every compute
node's operands exposed as outputs. Compute inside control-flow bodies (Loop/If/Scan) runs a
data-dependent number of times: those nodes are counted by kind in ``subgraph_ops``, not in MACs.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from qpasses.core.verification import exact_session, random_feeds, session_options

# Compute ops onnxruntime runs in integer arithmetic (any domain), and those it runs in float.
INTEGER_OPS = frozenset(
    {
        "QLinearConv",
        "ConvInteger",
        "QGemm",
        "QLinearMatMul",
        "MatMulInteger",
        "MatMulIntegerToFloat",
        "DynamicQuantizeMatMul",
        "QLinearConvTranspose",
        "QAttention",
        "MatMulInteger16",
    }
)
FLOAT_OPS = frozenset(
    {
        "Conv",
        "ConvTranspose",
        "Gemm",
        "MatMul",
        "FusedConv",
        "FusedGemm",
        "FusedMatMul",
        "TransposeMatMul",
        "NchwcConv",
        "MatMulNBits",
        "Attention",
    }
)
# Input index of the activation (A) and of the weight (B) of each compute op.
_OPERANDS = {"QLinearConv": (0, 3), "QLinearConvTranspose": (0, 3), "QGemm": (0, 3), "QLinearMatMul": (0, 3)}
_CONVS = ("Conv", "FusedConv", "NchwcConv", "ConvInteger", "QLinearConv")
_CONV_TRANSPOSES = ("ConvTranspose", "QLinearConvTranspose")
_GEMMS = ("Gemm", "FusedGemm", "QGemm")
_ATTENTIONS = ("Attention", "QAttention")

ModelSource = onnx.ModelProto | str | os.PathLike[str] | bytes


@dataclass(frozen=True)
class ComputeNode:
    """One compute node of the optimized graph: its MACs on the given feeds, integer or float."""

    name: str
    op_type: str
    integer: bool
    macs: int


@dataclass
class IntegerCompute:
    """MACs of the Conv/ConvTranspose/Gemm/MatMul work after onnxruntime's optimization."""

    total_macs: int
    integer_macs: int
    by_op_type: dict[str, int]  # op type of the optimized graph -> MACs
    nodes: list[ComputeNode]
    subgraph_ops: dict[str, int] = field(default_factory=dict)  # compute op types inside Loop/If/Scan bodies

    @property
    def share(self) -> float:
        """Integer MACs / all compute MACs (1.0 for a model without compute)."""
        return self.integer_macs / self.total_macs if self.total_macs else 1.0

    @property
    def float_ops(self) -> list[ComputeNode]:
        """The compute nodes left in float, largest first."""
        return sorted((n for n in self.nodes if not n.integer), key=lambda n: -n.macs)

    def format(self, top: int = 5) -> str:
        kinds = ", ".join(f"{k} {v / 1e6:.1f}M" for k, v in sorted(self.by_op_type.items(), key=lambda kv: -kv[1]))
        lines = [f"integer-kernel MAC share {self.share:.1%} of {self.total_macs / 1e6:.1f}M MACs ({kinds})"]
        left = self.float_ops
        if left:
            lines.append(
                f"  float compute left: {len(left)} nodes, largest "
                + ", ".join(f"{n.name or '?'} ({n.op_type}, {n.macs / 1e6:.1f}M)" for n in left[:top])
            )
        if self.subgraph_ops:
            lines.append(
                "  in control-flow bodies (not counted): "
                + ", ".join(f"{k} x{v}" for k, v in sorted(self.subgraph_ops.items()))
            )
        return "\n".join(lines)


EXTENDED = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED


def optimized_model(model: ModelSource, level: ort.GraphOptimizationLevel = EXTENDED) -> onnx.ModelProto:
    """The graph onnxruntime's CPU provider runs after optimizing at ``level`` (initializers included)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "optimized.onnx"
        opts = session_options()
        opts.graph_optimization_level = level
        opts.optimized_model_filepath = str(out)
        # Initializers loaded from external data would be saved as references onnx cannot resolve: keep
        # them in a data file beside the optimized model instead.
        opts.add_session_config_entry("session.optimized_model_external_initializers_file_name", "optimized.data")
        opts.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
        source: str | bytes
        if isinstance(model, (onnx.ModelProto, bytes)):
            source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else model
            if len(source) > 1_900_000_000:  # protobuf limit: go through a file
                src = Path(tmp) / "source.onnx"
                onnx.save(model, src, save_as_external_data=True)
                source = str(src)
        else:
            source = os.fspath(model)
        ort.InferenceSession(source, opts, providers=["CPUExecutionProvider"])
        return onnx.load(str(out))


def _macs(node: onnx.NodeProto, shape: dict[str, tuple[int, ...]]) -> int:
    """MACs of one compute node from its operands' and output's shapes."""
    op = node.op_type
    a_idx, b_idx = _OPERANDS.get(op, (0, 1))
    a, b, y = shape[node.input[a_idx]], shape[node.input[b_idx]], shape[node.output[0]]
    attrs = {at.name: onnx.helper.get_attribute_value(at) for at in node.attribute}
    if op in _CONVS:  # each output element: C_in/group * kernel MACs = prod(W[1:])
        return int(np.prod(y)) * int(np.prod(b[1:]))
    if op in _CONV_TRANSPOSES:  # each input element feeds M/group * kernel outputs = prod(W[1:])
        return int(np.prod(a)) * int(np.prod(b[1:]))
    if op in _GEMMS:
        k = a[0] if attrs.get("transA", 0) else a[-1]
        return int(np.prod(y)) * int(k)
    if op in _ATTENTIONS:  # projection to Q, K, V, then Q.K^T and P.V (hidden size = W[1] / 3)
        batch, seq = a[0], a[1]
        hidden = b[1] // 3
        return int(np.prod(a)) * int(b[1]) + 2 * int(batch) * int(seq) * int(seq) * int(hidden)
    if op == "MatMulNBits":
        return int(np.prod(y)) * int(attrs["K"])
    # MatMul family: [..., M, K] x [..., K, N]; FusedMatMul may transpose A.
    k = (a[-2] if len(a) > 1 else a[0]) if attrs.get("transA", 0) else a[-1]
    return int(np.prod(y)) * int(k)


def _subgraph_ops(graph: onnx.GraphProto, counts: dict[str, int]) -> None:
    for node in graph.node:
        for at in node.attribute:
            for body in [at.g] if at.type == onnx.AttributeProto.GRAPH else list(at.graphs):
                for inner in body.node:
                    if inner.op_type in INTEGER_OPS or inner.op_type in FLOAT_OPS:
                        counts[inner.op_type] = counts.get(inner.op_type, 0) + 1
                _subgraph_ops(body, counts)


def integer_mac_share(
    model: ModelSource,
    feeds: Mapping[str, np.ndarray] | None = None,
    *,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
) -> IntegerCompute:
    """The share of MACs onnxruntime runs in integer kernels, on ``feeds`` (or inputs of
    ``input_shapes``, random, for models whose shapes do not depend on the data)."""
    opt = optimized_model(model)
    compute = [n for n in opt.graph.node if n.op_type in INTEGER_OPS or n.op_type in FLOAT_OPS]
    shape: dict[str, tuple[int, ...]] = {i.name: tuple(i.dims) for i in opt.graph.initializer}
    wanted = [t for n in compute for t in (*n.input, n.output[0]) if t and t not in shape]
    wanted = list(dict.fromkeys(wanted))
    if wanted:
        probe = onnx.ModelProto()
        probe.CopyFrom(opt)
        have = {o.name for o in probe.graph.output}
        probe.graph.output.extend(onnx.ValueInfoProto(name=t) for t in wanted if t not in have)
        sess = exact_session(probe)
        names = [o.name for o in sess.get_outputs()]
        values = sess.run(None, dict(feeds) if feeds is not None else random_feeds(opt, batch=1, shapes=input_shapes))
        shape.update({name: tuple(np.shape(v)) for name, v in zip(names, values, strict=True)})
    nodes = [ComputeNode(n.name, n.op_type, n.op_type in INTEGER_OPS, _macs(n, shape)) for n in compute]
    by_op: dict[str, int] = {}
    for n in nodes:
        by_op[n.op_type] = by_op.get(n.op_type, 0) + n.macs
    sub: dict[str, int] = {}
    _subgraph_ops(opt.graph, sub)
    return IntegerCompute(
        total_macs=sum(n.macs for n in nodes),
        integer_macs=sum(n.macs for n in nodes if n.integer),
        by_op_type=by_op,
        nodes=nodes,
        subgraph_ops=sub,
    )
