"""Tensors joined from parts with very different ranges are not put on one 8-bit grid.

Detector heads concatenate box coordinates (0-320 px) with class scores (0-1): one 8-bit scale for
the joined tensor leaves the scores a level or two, and the detector collapses (a YOLOv8 face
detector: ROC-AUC 0.998 -> 0.63). Each part keeps its own encoding (the inputs of the Concat are
quantized separately) and the joined tensor stays float (int16 on quantized-only targets). The
same for the input of a Split/Slice head whose outputs have very different ranges. Ranges come
from the first ``batches`` calibration batches (a ``RangeRequest`` the pass declares, so the pass
manager measures them in the read it makes for calibrate, which sees the same values).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from graph_ir import Graph
from qpasses.core.context import PassContext
from qpasses.core.errors import CalibrationDataError
from qpasses.core.pass_base import Pass, PassResult
from qpasses.data.statistics import RangeRequest, measure
from qpasses.quant.keep_float import keep_float, with_readers

JOINS = ("Concat",)
SPLITS = ("Split", "Slice")


def levels_of_smallest(ranges: list[float], bitwidth: int) -> float:
    """Grid levels the part with the smallest range gets on a grid spanning all parts."""
    total = max(ranges)
    return (2**bitwidth - 1) * min(ranges) / total if total > 0 else float(2**bitwidth - 1)


@dataclass(frozen=True)
class MixedRange:
    tensor: str  # the joined tensor that stays float
    op: str
    parts: tuple[tuple[str, float], ...]  # (part, range)
    levels: float


class KeepMixedRangesFloat(Pass):
    name = "keep-mixed-ranges-float"
    description = "keep tensors joined from parts with very different ranges float; the parts stay quantized"
    preserves_semantics = True

    @dataclass
    class Options:
        act_bw: int = 8
        min_levels: float = 16.0  # a part with fewer levels than this on the joined grid is lost
        batches: int = 2
        batch_size: int = 16

    def _request(self, candidates: list[tuple[str, list[str], str]]) -> RangeRequest:
        names = sorted({n for joined, parts, _ in candidates for n in (joined, *parts)})
        return RangeRequest(tuple(names), batches=self.options.batches, batch_size=self.options.batch_size)

    def statistics(self, graph: Graph, ctx: PassContext) -> Sequence[RangeRequest]:
        candidates = self._candidates(graph)
        return (self._request(candidates),) if candidates and ctx.calibration_data is not None else ()

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        o = self.options
        candidates = self._candidates(graph)
        if not candidates or ctx.calibration_data is None:
            return self.result(False)
        request = self._request(candidates)
        try:
            ranges = {n: r.width for n, r in measure(graph, ctx, [request])[request].items() if r.floating}
        except CalibrationDataError as exc:
            self.remarks.missed("mixed ranges not checked", reason=str(exc))
            return self.result(False)
        found: list[MixedRange] = []
        for joined, parts, op in candidates:
            if any(p not in ranges for p in parts) or len(parts) < 2:
                continue
            part_ranges = [ranges[p] for p in parts]
            levels = levels_of_smallest(part_ranges, o.act_bw)
            if levels < o.min_levels:
                found.append(MixedRange(joined, op, tuple(zip(parts, part_ranges, strict=True)), levels))
        for m in found:
            if keep_float(graph, with_readers(graph, [m.tensor]), "joins parts with very different ranges", ctx.target):
                detail = ", ".join(f"{p} {r:.3g}" for p, r in m.parts)
                self.remarks.applied(
                    "kept float",
                    [m.tensor],
                    reason=f"{m.op} joins parts of range {detail}: on one "
                    f"{o.act_bw}-bit grid the smallest gets {m.levels:.1f} levels; parts "
                    "quantized separately",
                )
        return self.result(False)

    @staticmethod
    def _candidates(graph: Graph) -> list[tuple[str, list[str], str]]:
        """(joined tensor, parts, op name) for Concat joins and Split/Slice heads."""
        out: list[tuple[str, list[str], str]] = []
        for op in graph.ops:
            if not op.is_standard:
                continue
            if op.op_type in JOINS and len([i for i in op.inputs if i]) >= 2 and op.outputs[0]:
                parts = [i for i in op.inputs if i and not graph.tensors[i].is_constant]
                if len(parts) >= 2:
                    out.append((op.outputs[0], parts, op.name))
        heads: dict[str, list[str]] = {}
        for op in graph.ops:
            if (
                op.is_standard
                and op.op_type in SPLITS
                and op.inputs
                and op.inputs[0]
                and not graph.tensors[op.inputs[0]].is_constant
            ):
                heads.setdefault(op.inputs[0], []).extend(o for o in op.outputs if o)
        for src, parts in heads.items():
            if len(parts) >= 2:
                producer = graph.producer(src)
                out.append((src, parts, producer.name if producer is not None else src))
        return out
