"""Raise the default-domain opset (per-channel Q/DQ needs 13, int4/int16 Q/DQ needs 21).

onnxruntime's quantizer writes per-channel Q/DQ into opset 11/12 models anyway and the
result does not load; converting first keeps the model valid.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx
from onnx import version_converter

import graph_ir
from graph_ir import Graph
from qpasses.core.context import PassContext
from qpasses.core.errors import PassError
from qpasses.core.pass_base import Pass, PassResult

# Lowest IR version that can carry each opset's types (opset 21 brings INT4/UINT4: IR 10).
_IR_FOR_OPSET = ((21, 10), (19, 9), (15, 8), (13, 7))


def upgrade_opset(graph: Graph, opset: int) -> bool:
    """Convert in place to at least ``opset``; tensor annotations (encodings, meta) survive by name."""
    current = graph.opset()
    if current >= opset:
        return False
    try:
        converted = version_converter.convert_version(graph.to_onnx(), opset)
    except Exception as exc:  # the converter raises bare RuntimeErrors/ValueErrors per adapter
        raise PassError(f"cannot convert the model from opset {current} to {opset}: {exc}") from None
    need_ir = next((ir for op, ir in _IR_FOR_OPSET if opset >= op), converted.ir_version)
    converted.ir_version = max(converted.ir_version, need_ir)
    replace_keeping_annotations(graph, converted)
    return True


def replace_keeping_annotations(graph: Graph, model: onnx.ModelProto) -> None:
    """Swap in a rebuilt model (converter, inliner); encodings/precision/meta survive by tensor name."""
    annotations = {
        n: (t.encoding, t.precision, t.meta)
        for n, t in graph.tensors.items()
        if t.encoding is not None or t.precision is not None or t.meta
    }
    graph.adopt(graph_ir.from_onnx(model))
    for name, (enc, prec, meta) in annotations.items():
        t = graph.tensors.get(name)
        if t is not None:
            t.encoding, t.precision, t.meta = enc, prec, meta


class UpgradeOpset(Pass):
    name = "upgrade-opset"
    modifies_values = True  # graph edits: statistics measured before do not hold after
    description = "convert the model to at least the given default-domain opset"
    preserves_semantics = True

    @dataclass
    class Options:
        opset: int = 13

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        before = graph.opset()
        changed = upgrade_opset(graph, self.options.opset)
        if changed:
            self.remarks.applied(f"converted opset {before} -> {graph.opset()}")
        return self.result(changed)
