"""Conformance: which ops a target cannot run as annotated, each with the reason.

Read from the precision annotation and the target descriptor alone, so ``qpasses check`` can
answer before any calibration, and ``quantize --target`` reports the same findings as remarks.
"""

from __future__ import annotations

from dataclasses import dataclass

from graph_ir import Graph, Op
from qpasses.quant.precision_type import Precision, tensor_precision
from qpasses.targets.descriptor import TargetDescriptor
from qpasses.targets.quantizable_ops import op_params, op_precision, quantizable

_IGNORED = ("Constant", "QuantizeLinear", "DequantizeLinear")


@dataclass(frozen=True)
class Finding:
    op: str
    op_type: str
    reason: str

    def __str__(self) -> str:
        return f"{self.op} ({self.op_type}): {self.reason}"


def _floats(t: TargetDescriptor) -> str:
    return "/".join(f"float{b}" for b in t.float_bitwidths) or "no float"


def _float_problem(t: TargetDescriptor, p: Precision) -> str | None:
    if t.supports_float(p.bitwidth):
        return None
    if not t.float_bitwidths:
        return f"{p} op on quantized-only backend {t.name}"
    return f"{p} is not supported: {t.name} runs float ops in {_floats(t)} only"


def _op_finding(graph: Graph, op: Op, t: TargetDescriptor) -> str | None:
    if not t.supports_op(op.op_type):
        return f"unsupported op: {t.name} does not run {op.op_type}"
    p = op_precision(graph, op)
    if p is None:
        return None
    if p.is_float:
        problem = _float_problem(t, p)
        if problem is None:
            return None
        out = next(o for o in op.outputs if o and tensor_precision(graph.tensors[o]) is not None)
        source = graph.tensors[out].meta.get("precision_source")
        if source == "fallback":
            return (
                f"missing encoding: {out} has no override and no calibration data, so it falls back to {p}; {problem}"
            )
        if not quantizable(op) and t.runs_integer:
            return f"no integer kernel for {op.op_type}: it runs in float, and {problem}"
        return problem
    if p.is_int32:
        if not t.supports_int32(op.op_type):
            shown = ", ".join(t.int32_ops) or "none"
            return f"INT32 {op.op_type} is not supported by {t.name} (INT32 ops: {shown})"
        return None
    if t.float_only:
        return f"quantized op ({p}) on float-only backend {t.name}: quantized models are incompatible"
    weight, bias = op_params(graph, op)
    wp = tensor_precision(graph.tensors[weight]) if weight else None
    bp = tensor_precision(graph.tensors[bias]) if bias else None
    if t.supports_kernel(op.op_type, p, wp, bp):
        return None
    kernels = t.supported_kernels(op.op_type)
    have = "/".join(str(x) for x in (p, wp, bp) if x is not None)
    if not kernels:
        return f"unsupported op: {t.name} has no integer kernel for {op.op_type} (wanted {have})"
    shown = ", ".join(sorted({str(k) for k in kernels})[:8]) + (", ..." if len(kernels) > 8 else "")
    return f"unsupported bitwidth combination {have} (activation/weight/bias) on {t.name}; it supports {shown}"


def check_conformance(graph: Graph, target: TargetDescriptor) -> list[Finding]:
    """One finding per op the target cannot run, in topological order."""
    findings: list[Finding] = []
    for op in graph.ops:
        if op.op_type in _IGNORED:
            continue
        annotated = any(n and tensor_precision(graph.tensors[n]) is not None for n in (*op.inputs, *op.outputs))
        if not annotated:
            continue  # shape arithmetic and other non-float ops run anywhere
        reason = _op_finding(graph, op, target)
        if reason is not None:
            findings.append(Finding(op.name, op.op_type, reason))
    return findings
