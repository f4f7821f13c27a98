"""Precision annotation: which float tensor becomes int8/int16/int32 or stays float16/float32.

Decided once, before calibration, in the spec's order: per-tensor overrides (the mixed-precision
JSON, ``"dtype": "int"|"float"``), then defaults (act/weight/bias/float bitwidths), then the
target's constraints. The spec's rules hold throughout:

- an op is all-float or all-integer: if any of a Conv/ConvTranspose/Gemm/MatMul's output, weight
  or bias is overridden to float, all three become float (the bias at ``float_bias_bw`` when it
  has no override), and the same for any quantizable op and its constant inputs;
- data-invariant ops (Reshape, MaxPool...) keep their input's precision unless overridden;
- without calibration data, activations without an encoding fall back to float, after encodings
  were propagated across data-invariant ops (``apply-overrides`` moves an override given for a
  data-movement output to the tensor it shares with; outputs follow their input here).

Where an op's precision differs from that of a tensor it reads, ``insert-converts`` adds the
conversion later. Results live on the tensors: ``precision``, ``meta["precision_source"]`` and
``meta["encoding_bw"]`` (the bitwidth calibration must give the tensor's encoding). What one op
is (quantizable, its weight and bias, the precision it runs in) is ``quantizable_ops``'.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from onnx import TensorProto

from graph_ir import Graph, Op
from qpasses.core.analyses import Shapes
from qpasses.core.remarks import RemarkCollector
from qpasses.quant.encodings import Encoding
from qpasses.quant.plan import COMPUTE, DATA_MOVEMENT, WEIGHTED, fused_intermediates
from qpasses.quant.precision_type import Precision
from qpasses.targets.descriptor import TargetDescriptor
from qpasses.targets.quantizable_ops import op_params, quantizable

Role = Literal["activation", "weight", "bias", "param", "aux"]
Source = Literal["override", "rule", "default", "propagated", "fallback", "float-op", "target"]
_ROLE_RANK = {"weight": 0, "bias": 1, "param": 2, "aux": 3}
_OVERRIDDEN = ("override", "rule")


@dataclass(frozen=True)
class PrecisionOptions:
    """Defaults (None: the target's default, else 8/8/32, params 8, float 32)."""

    act_bw: int | None = None
    weight_bw: int | None = None
    bias_bw: int | None = None
    param_bw: int | None = None
    float_bw: int | None = None
    float_bias_bw: int | None = None
    calibrated: bool = True


class _Annotator:
    """One annotation run: the working maps (precision, source, role per tensor) and the steps."""

    def __init__(
        self,
        graph: Graph,
        shapes: Shapes,
        opts: PrecisionOptions,
        target: TargetDescriptor | None,
        remarks: RemarkCollector,
    ) -> None:
        self.graph, self.shapes, self.target, self.remarks = graph, shapes, target, remarks
        self.opts = opts
        t = target
        self.act_bw = opts.act_bw or (t.default_act_bw if t else 8)
        self.weight_bw = opts.weight_bw or (t.default_weight_bw if t else 8)
        self.bias_bw = opts.bias_bw or (t.default_bias_bw if t else 32)
        self.param_bw = opts.param_bw or 8
        self.float_only = t is not None and t.float_only
        wanted_float = opts.float_bw
        if t is not None and t.float_bitwidths:
            wanted_float = t.float_bitwidth(opts.float_bw)
        self.float_bw = wanted_float or 32
        # Non-quantized mode: no calibration and --float-bw given, or a float-only backend.
        self.float_mode = (not opts.calibrated and opts.float_bw is not None) or self.float_only
        self.prec: dict[str, Precision] = {}
        self.source: dict[str, Source] = {}
        self.role: dict[str, Role] = {}
        self.fused = fused_intermediates(graph)
        self.fused_by = {y: x for x, y in self.fused.items()}

    # --- helpers ---------------------------------------------------------------------------------
    def is_float_tensor(self, name: str) -> bool:
        t = self.graph.tensors.get(name)
        return t is not None and (t.dtype or self.shapes.dtype(name)) == TensorProto.FLOAT

    def set(self, name: str, p: Precision, source: Source) -> None:
        self.prec[name], self.source[name] = p, source

    def group_output(self, op: Op) -> str | None:
        """The tensor carrying an op's precision: its float output, or the fused Relu/Clip's."""
        for out in op.outputs:
            if out and self.role.get(out) == "activation":
                return self.fused.get(out, out)
        return None

    def constant_inputs(self, op: Op) -> list[str]:
        return [
            n
            for s, n in enumerate(op.inputs)
            if n and s in COMPUTE.get(op.op_type, ()) and self.role.get(n) in ("weight", "bias", "param")
        ]

    def float_of(self, bitwidth: int | None) -> Precision:
        return Precision("float", bitwidth or self.float_bw)

    # --- steps -------------------------------------------------------------------------------------
    def collect_roles(self) -> None:
        g = self.graph
        for name in g.inputs:
            if self.is_float_tensor(name) and not g.tensors[name].is_constant:
                self.role[name] = "activation"
        for op in g.ops:
            for out in op.outputs:
                if out and self.is_float_tensor(out) and not g.tensors[out].is_constant:
                    self.role[out] = "activation"
        for op in g.ops:
            weight, bias = op_params(g, op)
            slots = COMPUTE.get(op.op_type, ()) if op.is_standard else ()
            for slot, name in enumerate(op.inputs):
                if not name or not g.tensors[name].is_constant or not self.is_float_tensor(name):
                    continue
                shape = g.tensors[name].shape or ()
                role: Role = "aux"
                if slot in slots:
                    if name == weight and slot == WEIGHTED[op.op_type][0] and len(shape) >= 2:
                        role = "weight"
                    elif name == bias and len(shape) == 1 and weight is not None:
                        role = "bias"
                    else:
                        role = "param"
                old = self.role.get(name)
                if old is None or _ROLE_RANK[role] < _ROLE_RANK[old]:
                    self.role[name] = role

    def collect_overrides(self) -> None:
        for name in self.role:
            t = self.graph.tensors[name]
            if t.meta.get("precision_source") == "override" and t.precision is not None:
                p = Precision.of(t.precision)
                assert p is not None
                if (
                    not self.opts.calibrated
                    and self.role[name] == "activation"
                    and not p.is_float
                    and not p.is_int32
                    and not isinstance(t.encoding, Encoding)
                ):
                    self.set(name, self.float_of(None), "fallback")
                    self.remarks.missed(
                        f"{p} override left float",
                        [name],
                        reason="no encoding and no calibration data (float fallback)",
                    )
                else:
                    self.set(name, p, "override")
            elif t.meta.get("encoding_source") == "override" and isinstance(t.encoding, Encoding):
                self.set(name, Precision("int", t.encoding.bitwidth), "override")
        for x, y in self.fused.items():
            if x in self.prec and y not in self.prec and not self.prec[x].is_int32:
                self.set(y, self.prec[x], "rule")

    def float_rule(self) -> None:
        """The spec: an op with any float output/weight/bias is float throughout."""
        for op in self.graph.ops:
            if not quantizable(op) or op.op_type in DATA_MOVEMENT:
                continue
            out = self.group_output(op)
            members = [m for m in ([out] if out else []) + self.constant_inputs(op)]
            floats = [m for m in members if self.source.get(m) == "override" and self.prec[m].is_float]
            if not floats:
                continue
            bitwidth = self.prec[floats[0]].bitwidth
            _, bias = op_params(self.graph, op)
            for m in members:
                if m in floats:
                    continue
                bw = (self.opts.float_bias_bw or bitwidth) if m == bias else bitwidth
                if self.source.get(m) == "override":
                    self.remarks.missed(
                        "int override replaced by float",
                        [m],
                        reason=f"{op.name} has float {', '.join(floats)}: an op is all-float or all-int",
                    )
                self.set(m, Precision("float", bw), "rule")
            if out and out in self.fused_by:
                self.set(self.fused_by[out], self.prec[out], "rule")

    def default_activation(self) -> tuple[Precision, Source]:
        if self.float_mode:
            return self.float_of(None), "target" if self.float_only else "default"
        if not self.opts.calibrated:
            return self.float_of(None), "fallback"
        return Precision("int", self.act_bw), "default"

    def activations(self) -> None:
        g = self.graph
        for name in g.inputs:
            if self.role.get(name) == "activation" and name not in self.prec:
                self.set(name, *self.default_activation())
        for op in g.ops:
            outs = [o for o in op.outputs if o and self.role.get(o) == "activation"]
            for out in outs:
                if out in self.prec or out in self.fused:
                    continue
                src = op.inputs[0] if op.inputs else ""
                if op.op_type in DATA_MOVEMENT and op.is_standard and src in self.prec and not self.prec[src].is_int32:
                    self.set(out, self.prec[src], "propagated")
                elif not quantizable(op):
                    self.set(out, self.float_of(None), "float-op")
                else:
                    self.set(out, *self.default_activation())
            for out in outs:
                if out in self.fused and not (out in self.prec and self.prec[out].is_int32):
                    y = self.fused[out]
                    if y not in self.prec:
                        self.set(y, *self.default_activation())
                    self.set(out, self.prec[y], self.source[y])

    def constants(self) -> None:
        g = self.graph
        for op in g.ops:
            out = self.group_output(op)
            op_p = self.prec.get(out) if out else None
            op_src = self.source.get(out) if out else None
            weight, bias = op_params(g, op)
            for name in op.inputs:
                role = self.role.get(name) if name else None
                if role is None or role == "activation" or name in self.prec:
                    continue
                if role == "aux":
                    # Scalars like Clip bounds follow a float op's type, else stay float32.
                    self.set(name, op_p if op_p is not None and op_p.is_float else self.float_of(32), "default")
                elif (op_p is not None and op_p.is_float and op_src != "fallback") or (
                    op_p is None and self.float_mode
                ):
                    bw = op_p.bitwidth if op_p is not None else self.float_bw
                    if name == bias:
                        bw = self.opts.float_bias_bw or bw
                    self.set(name, Precision("float", bw), "rule" if op_src in _OVERRIDDEN else "default")
                elif role == "bias" and op_src == "fallback":
                    self.set(name, Precision("float", self.opts.float_bias_bw or self.float_bw), "fallback")
                else:
                    bw = {"weight": self.weight_bw, "bias": self.bias_bw}.get(role, self.param_bw)
                    self.set(name, Precision("int", bw), "default")

    def fit_target(self) -> None:
        """Defaults the target cannot run move to its nearest kernel or float precision."""
        t = self.target
        if t is None or self.float_only:
            return
        g = self.graph
        runnable = {k.activation for ks in t.kernels.values() for k in ks}
        for name in g.inputs:
            p = self.prec.get(name)
            if p is not None and self.source[name] == "default" and not p.is_float and p not in runnable:
                self.set(name, Precision("int", t.default_act_bw), "target")
        for op in g.ops:
            out = self.group_output(op)
            if out is None or not quantizable(op):
                continue
            p = self.prec[out]
            if p.is_float:
                if self.source[out] not in _OVERRIDDEN and t.float_bitwidths and not t.supports_float(p.bitwidth):
                    self._retype_float(op, out, t.float_bitwidth(p.bitwidth) or p.bitwidth)
                continue
            if p.is_int32 or op.op_type in DATA_MOVEMENT:
                continue
            weight, bias = op_params(g, op)
            members = [m for m in (out, weight, bias) if m]
            if any(self.source[m] in _OVERRIDDEN for m in members):
                continue
            wp = self.prec.get(weight) if weight else None
            bp = self.prec.get(bias) if bias else None
            kernels = t.supported_kernels(op.op_type)
            if not kernels or t.supports_kernel(op.op_type, p, wp, bp):
                continue

            def score(k, p=p, wp=wp, bp=bp):  # noqa: ANN001, ANN202 - local ranking
                return (
                    4 * (k.activation == p)
                    + 2 * (wp is None or k.weight in (None, wp))
                    + (bp is None or k.bias in (None, bp))
                )

            best = max(kernels, key=score)
            self.set(out, best.activation, "target")
            if out in self.fused_by:
                self.set(self.fused_by[out], best.activation, "target")
            if weight and best.weight is not None:
                self.set(weight, best.weight, "target")
            if bias and best.bias is not None:
                self.set(bias, best.bias, "target")
            self.remarks.applied(
                f"target {t.name} has no {p}/{wp}/{bp} kernel for {op.op_type}: using {best}", [op.name]
            )

    def repropagate(self) -> None:
        """Data-invariant ops follow their input again after the target moved it."""
        for op in self.graph.ops:
            src = op.inputs[0] if op.inputs else ""
            if op.op_type not in DATA_MOVEMENT or not op.is_standard or src not in self.prec:
                continue
            for out in op.outputs:
                if out and self.source.get(out) == "propagated":
                    self.prec[out] = self.prec[src]

    def _retype_float(self, op: Op, out: str, bitwidth: int) -> None:
        for name in [out, self.fused_by.get(out), *self.constant_inputs(op)]:
            if name and self.prec[name].is_float:
                self.set(name, Precision("float", bitwidth), "target")

    def encoding_bitwidths(self) -> dict[str, int]:
        """Activations needing an encoding -> its bitwidth (float ones only when an int op reads them)."""
        g = self.graph
        out: dict[str, int] = {}
        for name, role in self.role.items():
            if role != "activation":
                continue
            p = self.prec[name]
            if not p.is_float:
                out[name] = self.act_bw if p.is_int32 else p.bitwidth
                continue
            readers = []
            for op in g.consumers(name):
                rp = self.prec.get(self.group_output(op) or "") if quantizable(op) else None
                if rp is not None and not rp.is_float and not rp.is_int32:
                    readers.append(rp.bitwidth)
            if readers:
                out[name] = max(readers)
        return out

    def write(self) -> dict[Source, int]:
        counts: dict[Source, int] = {}
        bitwidths = self.encoding_bitwidths()
        for name, p in self.prec.items():
            t = self.graph.tensors[name]
            t.precision = p
            t.meta["precision_source"] = self.source[name]
            if name in bitwidths:
                t.meta["encoding_bw"] = bitwidths[name]
            else:
                t.meta.pop("encoding_bw", None)
            counts[self.source[name]] = counts.get(self.source[name], 0) + 1
        return counts


def annotate(
    graph: Graph, shapes: Shapes, opts: PrecisionOptions, target: TargetDescriptor | None, remarks: RemarkCollector
) -> dict[Source, int]:
    """Give every float tensor a precision; returns how many came from each source."""
    a = _Annotator(graph, shapes, opts, target, remarks)
    a.collect_roles()
    a.collect_overrides()
    a.float_rule()
    a.activations()
    a.constants()
    a.fit_target()
    a.repropagate()
    counts = a.write()
    fallback = [n for n, s in a.source.items() if s == "fallback" and a.role[n] == "activation"]
    if fallback:
        remarks.missed(
            f"{len(fallback)} activations have no encoding and stay float",
            fallback[:10],
            reason="not calibrated and not overridden (float fallback)",
        )
    return dict(counts)
