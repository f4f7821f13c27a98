"""Weight encodings: per-channel or per-tensor, computed straight from the weight data."""

from __future__ import annotations

from dataclasses import dataclass

from graph_ir import Graph, Tensor
from qpasses.core.context import PassContext
from qpasses.core.errors import EncodingError
from qpasses.core.pass_base import Pass, PassResult
from qpasses.quant.encodings import Mode, validate_bitwidth
from qpasses.quant.plan import QuantPlan
from qpasses.quant.precision_type import tensor_precision
from qpasses.quant.range_search import compute

# Encodings decided before this pass that it must keep: a user's overrides, SeqMSE's search,
# AdaRound's / AdaScale's learned grids (whose weights already lie on them).
_KEPT_SOURCES = frozenset({"override", "seq-mse", "adaround", "adascale"})


class EncodeWeights(Pass):
    name = "encode-weights"
    description = "compute weight/parameter encodings (per-channel along output channels, or per-tensor)"

    @dataclass
    class Options:
        weight_bw: int = 8
        per_channel: bool = False
        mode: str = "symmetric"
        param_bw: int = 8

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        o = self.options
        validate_bitwidth(o.weight_bw, "weight")
        plan = ctx.get(QuantPlan, graph).plan
        target = ctx.target
        per_channel = o.per_channel and (target is None or getattr(target, "per_channel_weights", True))
        if o.per_channel and not per_channel:
            self.remarks.missed("per-channel weights disabled", reason=f"target {target.name} is per-tensor only")
        done = kept = 0
        mixed_axes = [name for name, spec in plan.weights.items() if spec.axis is None]
        if per_channel and mixed_axes:
            self.remarks.missed(
                "per-tensor weights", mixed_axes, reason="read by layers whose output channels lie on different axes"
            )
        for name, spec in plan.weights.items():
            t = graph.tensors[name]
            if t.meta.get("encoding_source") in _KEPT_SOURCES:
                kept += 1
                continue
            data = t.constant_data()
            bw = _annotated_bitwidth(t, o.weight_bw)
            try:
                if per_channel and spec.axis is not None:
                    mode: Mode = "tf" if o.mode in ("symmetric", "adjusted") else o.mode
                    t.encoding = compute(data, bw, mode, axis=spec.axis, role="weight")
                else:
                    mode = o.mode if o.mode != "adjusted" or bw == 8 else "symmetric"  # adjusted: 8-bit only
                    t.encoding = compute(data, bw, mode, role="weight")
            except EncodingError as exc:
                raise EncodingError(f"weight {name} of {spec.op}: {exc}") from None
            t.meta["encoding_source"] = "weights"
            done += 1
        for name in plan.params:
            t = graph.tensors[name]
            if t.meta.get("encoding_source") == "override":
                kept += 1
                continue
            try:
                t.encoding = compute(
                    t.constant_data(),
                    _annotated_bitwidth(t, o.param_bw),
                    "tf" if o.mode == "adjusted" else o.mode,
                    role="weight",
                )
            except EncodingError as exc:
                readers = ", ".join(f"{op.op_type} '{op.name}'" for op in graph.consumers(name)) or "no op"
                raise EncodingError(f"parameter {name} read by {readers}: {exc}") from None
            t.meta["encoding_source"] = "weights"
            done += 1
        layout = "per-channel" if per_channel else "per-tensor"
        self.remarks.applied(
            f"encoded {done} weights/params ({layout}, {o.weight_bw}-bit, {o.mode})"
            + (f"; kept {kept} overridden or searched" if kept else "")
        )
        return self.result(done > 0)


def _annotated_bitwidth(tensor: Tensor, default: int) -> int:
    """The bitwidth ``annotate-precision`` chose for this weight, else the pass option."""
    p = tensor_precision(tensor)
    return p.bitwidth if p is not None and not p.is_float else default
