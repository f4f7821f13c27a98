"""Check that onnxruntime, as users run it, computes what the lowered QDQ model says.

Runs last in ``quantize``: the first calibration samples (at most ``batches`` x ``batch_size``, 64,
and at most a quarter of them, whatever the batching) through the model with exact QDQ semantics and
in the default session (see ``qpasses.runtime.parity``). A divergence beyond the tolerance is a
``missed`` remark and a warning naming the first divergent ops, the likely cause and the fix; the
report itself is left as a ``ParityReport`` artifact.
"""

from __future__ import annotations

import warnings
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any

import onnx

from graph_ir import Graph
from qpasses.core.context import PassContext
from qpasses.core.errors import CalibrationDataError, PassError
from qpasses.core.pass_base import Pass, PassResult
from qpasses.passes.quantize.calibrate import calibration_feeds
from qpasses.quant.int_storage import uint8_storage
from qpasses.runtime.parity import CHECK_SHARE, DEFAULT_TOLERANCE_DB, check_feeds, check_parity

_PROTO_LIMIT = 1_800_000_000


class RuntimeParityWarning(UserWarning):
    """onnxruntime's default session diverges from the model's exact QDQ semantics."""


@dataclass
class Fp32Reference:
    """Artifact: the FP32 model before any pass (outputs are compared with it; default: the QDQ model
    without its activation Q/DQ pairs). ``measured``: the statistics store's results for that state
    (carried by content across ``quantize_model``'s runs): the check leaves the FP32 outputs on its
    batches there, and the fallback's second run reads them instead of running the FP32 model again."""

    model: onnx.ModelProto
    measured: dict[Hashable, Any] = field(default_factory=dict)


_CHECKED_OUTPUTS = ("runtime-parity", "fp32-outputs")  # key in Fp32Reference.measured: (batches, outputs)


class RuntimeParityCheck(Pass):
    name = "runtime-parity"
    description = "compare onnxruntime's default session with exact QDQ semantics on calibration batches"
    preserves_semantics = True

    @dataclass
    class Options:
        batches: int = 4
        share: float = CHECK_SHARE  # at most this share of the calibration samples (at least one)
        batch_size: int = 16
        tolerance_db: float = DEFAULT_TOLERANCE_DB

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        o = self.options
        if o.batches < 1 or o.batch_size < 1 or not o.tolerance_db >= 0 or not 0 < o.share <= 1:
            raise PassError(
                "pass 'runtime-parity': batches and batch_size must be >= 1, tolerance_db >= 0, share in (0, 1]"
            )
        if not any(op.op_type == "QuantizeLinear" for op in graph.ops):
            self.remarks.missed("runtime parity not checked", reason="the model has no QuantizeLinear")
            return self.result(False)
        model = graph.to_onnx()
        if model.ByteSize() > _PROTO_LIMIT:
            self.remarks.missed("runtime parity not checked", reason="model over 1.8 GB")
            return self.result(False)
        try:
            data = calibration_feeds(ctx.calibration_data, graph, o.batch_size)
            feeds = check_feeds(model, data, o.batches * o.batch_size, o.share)
        except CalibrationDataError as exc:
            self.remarks.missed("runtime parity not checked", reason=str(exc))
            return self.result(False)
        # Replaying x86 without VNNI checks the portable promise; a target with int8 storage
        # (ort-vnni, QNN backends) was chosen for CPUs where that kernel does not run.
        emulate = None if uint8_storage(ctx.target) else False
        ref = ctx.artifacts.get(Fp32Reference)
        report = check_parity(
            model,
            feeds,
            reference=None if ref is None else ref.model,
            tolerance_db=o.tolerance_db,
            emulate=emulate,
            known=None if ref is None else ref.measured.get(_CHECKED_OUTPUTS),
        )
        if ref is not None:
            ref.measured[_CHECKED_OUTPUTS] = (report.batches, report.reference_outputs)
        ctx.artifacts.put(report)
        self.remarks.analysis(report.figures() + f" (CPU {report.cpu})")
        for problem in report.problems():
            self.remarks.missed(
                "runtime diverges from exact QDQ semantics",
                [d.producer for d in report.divergences[:5]],
                reason=problem,
            )
            warnings.warn(problem, RuntimeParityWarning, stacklevel=2)
        if report.ok:
            self.remarks.applied(
                "runtime parity ok"
                + (
                    f"; {len(report.emulated)} integer ops replayed for x86 without VNNI: no saturation"
                    if report.emulated
                    else ""
                )
            )
        return self.result(False)
