"""Keep named tensors out of 8-bit quantization (what the automatic fallback of ``quantize`` uses)."""

from __future__ import annotations

from dataclasses import dataclass

from graph_ir import Graph
from qpasses.core.context import PassContext
from qpasses.core.pass_base import Pass, PassResult
from qpasses.quant.keep_float import keep_float, with_readers


class KeepFloat(Pass):
    name = "keep-float"
    description = "keep the named tensors float (int16 on quantized-only targets); names separated by '|'"
    preserves_semantics = True

    @dataclass
    class Options:
        tensors: str = ""
        reason: str = "requested"
        with_readers: bool = True  # the ops reading them run float too (else they re-quantize them)

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        names = [n for n in self.options.tensors.split("|") if n]
        unknown = [n for n in names if n not in graph.tensors]
        if unknown:
            self.remarks.missed("not kept float", unknown[:10], reason="no such tensor at this point of the pipeline")
        names = [n for n in names if n in graph.tensors]
        if self.options.with_readers:
            names = with_readers(graph, names)
        marked = keep_float(graph, names, self.options.reason, ctx.target)
        if marked:
            self.remarks.applied(f"kept {len(marked)} tensors in higher precision", marked, reason=self.options.reason)
        return self.result(False)
