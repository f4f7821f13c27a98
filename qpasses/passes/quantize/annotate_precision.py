"""Pass ``annotate-precision``: give every float tensor its int/float precision (see ``qpasses.targets.precision``)."""

from __future__ import annotations

from dataclasses import dataclass

from graph_ir import Graph
from qpasses.core.analyses import Shapes
from qpasses.core.context import PassContext
from qpasses.core.errors import PassError
from qpasses.core.pass_base import Pass, PassResult
from qpasses.quant.encodings import Role, validate_bitwidth
from qpasses.quant.precision_type import FLOAT_BITWIDTHS, Precision
from qpasses.targets.precision import PrecisionOptions, annotate


class AnnotatePrecision(Pass):
    name = "annotate-precision"
    description = "choose int8/int16/int32/float16/float32 per tensor: overrides, then defaults, then the target"

    @dataclass(frozen=True)
    class Options(PrecisionOptions):
        """The pass options are the annotation's options."""

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        o = self.options
        roles: tuple[tuple[int | None, Role], ...] = (
            (o.act_bw, "activation"),
            (o.weight_bw, "weight"),
            (o.bias_bw, "bias"),
            (o.param_bw, "weight"),
        )
        for value, role in roles:
            if value is not None:
                validate_bitwidth(value, role)
        for key in ("float_bw", "float_bias_bw"):
            value = getattr(o, key)
            if value is not None and value not in FLOAT_BITWIDTHS:
                raise PassError(f"pass '{self.name}': {key} must be 16 or 32, got {value}")
        before = _snapshot(graph)
        counts = annotate(graph, ctx.get(Shapes, graph), o, ctx.target, self.remarks)
        changed = _snapshot(graph) != before
        if counts:
            shown = ", ".join(f"{n} {source}" for source, n in sorted(counts.items()))
            self.remarks.applied(f"annotated {sum(counts.values())} tensors ({shown})")
        self._report_unavailable(graph, ctx)
        return self.result(changed)

    def _report_unavailable(self, graph: Graph, ctx: PassContext) -> None:
        """One remark per reason for the tensors an analysis would keep above 8 bits on a target with
        nothing higher (``qpasses.quant.keep_float``): they stay on the target's grids."""
        wanted: dict[str, list[str]] = {}
        for name, t in graph.tensors.items():
            reason = t.meta.get("higher_unavailable")
            if reason is not None and not t.is_constant:
                wanted.setdefault(str(reason), []).append(name)
        target = getattr(ctx.target, "name", "this target")
        bws = "/".join(f"int{b}" for b in getattr(ctx.target, "activation_bitwidths", ()))
        for reason, names in wanted.items():
            self.remarks.missed(
                f"{len(names)} tensors left at the target's precision, not kept higher ({reason})",
                names[:10],
                reason=f"target {target} runs only integer kernels with {bws or 'its'} activations: nothing "
                "higher to keep them in; expect a larger error there",
            )


def _snapshot(graph: Graph) -> dict[str, tuple[object, ...]]:
    return {
        n: (Precision.of(t.precision), t.meta.get("precision_source"), t.meta.get("encoding_bw"))
        for n, t in graph.tensors.items()
        if t.precision is not None
    }
