"""Runs passes in order with timing, verification, instrumentation and fixed-point repetition."""

from __future__ import annotations

import gc
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import onnx

from graph_ir import Graph, save
from qpasses.core import verification
from qpasses.core.context import PassContext
from qpasses.core.errors import InternalError, NumericCheckUnavailable, QPassesError, VerificationError
from qpasses.core.pass_base import Pass, PassResult
from qpasses.core.remarks import Remark, RemarkKind
from qpasses.core.statistics import StatisticRequest

Verify = Literal["none", "checker", "numeric"]


@dataclass
class PassRecord:
    name: str
    modified: bool
    seconds: float
    remarks: list[Remark]
    iteration: int = 0
    analysis_seconds: float = 0.0  # computing the analyses the pass declared in ``uses`` (not cached)
    # Measuring the statistics it declared (with those of the passes ahead that share the read), when not stored.
    statistics_seconds: float = 0.0


@dataclass
class PipelineReport:
    records: list[PassRecord] = field(default_factory=list)

    @property
    def remarks(self) -> list[Remark]:
        return [r for rec in self.records for r in rec.remarks]

    @property
    def modified(self) -> bool:
        return any(r.modified for r in self.records)

    def add_remark(
        self, kind: RemarkKind, step: str, message: str, nodes: Sequence[str] = (), reason: str = ""
    ) -> None:
        """A remark from a step outside the pass list (e.g. quantize's automatic fallback)."""
        self.records.append(PassRecord(step, False, 0.0, [Remark(kind, step, message, tuple(nodes), reason)]))

    def format(self) -> str:
        lines = []
        for rec in self.records:
            it = f" (iteration {rec.iteration + 1})" if rec.iteration else ""
            state = "modified" if rec.modified else "unchanged"
            analyses = f" (+ analyses {rec.analysis_seconds * 1e3:.1f} ms)" if rec.analysis_seconds >= 5e-4 else ""
            if rec.statistics_seconds >= 5e-4:
                analyses += f" (+ statistics {rec.statistics_seconds * 1e3:.1f} ms)"
            lines.append(f"pass {rec.name}{it}: {state} in {rec.seconds * 1e3:.1f} ms{analyses}")
            lines.extend(f"  {r}" for r in rec.remarks)
        return "\n".join(lines)


class Instrumentation:
    """Hooks around each pass (print-before/after, dumps, profiling)."""

    def before_pass(self, p: Pass, graph: Graph, ctx: PassContext) -> None:
        pass

    def after_pass(self, p: Pass, graph: Graph, ctx: PassContext, result: PassResult) -> None:
        pass


@dataclass
class DumpAfter(Instrumentation):
    """Save the model after the named passes (all passes when ``names`` is empty)."""

    directory: Path
    names: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        self._count = 0

    def after_pass(self, p: Pass, graph: Graph, ctx: PassContext, result: PassResult) -> None:
        self._count += 1
        if not self.names or p.name in self.names:
            save(graph, Path(self.directory) / f"{self._count:02d}-{p.name}.onnx")


class PassManager:
    """``PassManager([FoldBatchNorm(), CLE()], verify="checker").run(graph)``.

    ``verify="numeric"`` (the default) runs onnx.checker after every pass that modified the
    graph and compares onnxruntime outputs before/after every pass that declares
    ``preserves_semantics`` (tolerance scaled to the model's float type); ``"checker"`` is the
    fast opt-out. A pass that crashes or leaves an invalid model is an ``InternalError`` (a bug in
    qpasses), never reported as the user's mistake; a ``QPassesError`` it raises is the user's.
    ``fixed_point=True`` repeats the whole pipeline until no pass modifies the graph (at most
    ``max_iterations`` times).

    Statistics: before a pass whose declared statistics (``Pass.statistics``) are not in
    ``ctx.statistics`` for the graph's current values, the requests of the passes ahead are added
    up to the first that ``modifies_values`` (it included) and all are measured in one read of the
    calibration data. A failed read is left to the passes, which measure on demand and report it.
    """

    def __init__(
        self,
        passes: Sequence[Pass],
        *,
        verify: Verify = "numeric",
        fixed_point: bool = False,
        max_iterations: int = 10,
        instrumentations: Sequence[Instrumentation] = (),
        rtol: float = 1e-4,
    ) -> None:
        self.passes = list(passes)
        self.verify = verify
        self.fixed_point = fixed_point
        self.max_iterations = max_iterations
        self.instrumentations = list(instrumentations)
        self.rtol = rtol

    def run(self, graph: Graph, ctx: PassContext | None = None) -> PipelineReport:
        # Passes allocate many long-lived objects (ops, tensors, protos) and make little cyclic
        # garbage: with the cyclic GC paused, rewriting a 40k-node graph runs ~1.5x faster.
        enabled = gc.isenabled()
        gc.disable()
        try:
            return self._run(graph, ctx or PassContext())
        finally:
            if enabled:
                gc.enable()

    def _run(self, graph: Graph, ctx: PassContext) -> PipelineReport:
        report = PipelineReport()
        done: list[str] = []
        self._input_invalid: str | None = None
        # The outputs of the last numerically verified model, by graph version: the next pass compares with
        # them instead of running the same model again (a chain of rewrites runs each model once).
        self._last_run: tuple[int, verification.ReferenceRun] | None = None
        if self.verify != "none" and self.passes:
            # Judge a pass only by what it changed: a model that already fails onnx.checker (yet
            # runs in onnxruntime, e.g. opset-7 models listing initializers as inputs) is not its fault.
            try:
                verification.check_model(graph.to_onnx(), "(input)")
            except VerificationError as exc:
                self._input_invalid = str(exc).split(": ", 1)[-1]
                report.add_remark(
                    "analysis",
                    "verify",
                    "onnx.checker verification off for this model",
                    reason=f"the input model already fails it: {self._input_invalid}",
                )
        for iteration in range(self.max_iterations if self.fixed_point else 1):
            changed = False
            for index, p in enumerate(self.passes):
                record = self._run_one(index, graph, ctx, done, iteration)
                report.records.append(record)
                ctx.remarks.extend(record.remarks)
                done.append(p.name)
                changed |= record.modified
            if not changed:
                break
        return report

    def _run_one(self, index: int, graph: Graph, ctx: PassContext, done: list[str], iteration: int) -> PassRecord:
        p = self.passes[index]
        for inst in self.instrumentations:
            inst.before_pass(p, graph, ctx)
        before: onnx.ModelProto | verification.ReferenceRun | None = None
        if self.verify == "numeric" and p.preserves_semantics:
            last = self._last_run
            before = last[1] if last is not None and last[0] == graph.version else graph.to_onnx()
        version = graph.version
        start = time.perf_counter()
        try:
            for analysis in p.uses:  # computed (or found cached) up front, timed apart from the pass
                ctx.get(analysis, graph)
            analysis_seconds = time.perf_counter() - start
            start = time.perf_counter()
            self._collect_statistics(index, graph, ctx)
            statistics_seconds = time.perf_counter() - start
            start = time.perf_counter()
            result = p.run(graph, ctx)
        except QPassesError as exc:
            raise type(exc)(f"pass '{p.name}' failed{_after(done)}: {exc}") from exc
        except (KeyboardInterrupt, MemoryError):
            raise
        except Exception as exc:
            raise InternalError(
                f"internal error in pass '{p.name}'{_after(done)}: {type(exc).__name__}: {exc}", p.name
            ) from exc
        seconds = time.perf_counter() - start
        modified = result.modified or graph.version != version
        if modified:  # a modified graph preserves nothing unless the pass says what it kept
            ctx.analyses.preserve(p.preserves if result.preserves is None else result.preserves, graph)
        ctx.statistics.sync(graph)  # values changed: what was measured on the old ones goes now
        if self.verify != "none" and modified:
            self._last_run = self._verify(p, graph, ctx, before, result)
        for inst in self.instrumentations:
            inst.after_pass(p, graph, ctx, result)
        return PassRecord(p.name, modified, seconds, result.remarks, iteration, analysis_seconds, statistics_seconds)

    def _collect_statistics(self, index: int, graph: Graph, ctx: PassContext) -> None:
        """Measure what pass ``index`` declared, with what the passes ahead on the same values declared, in one read."""
        p = self.passes[index]
        own = list(p.statistics(graph, ctx))
        if not any(r.missing(graph, ctx) for r in own):
            return
        requests = own
        ahead = self.passes[index:] if not p.modifies_values else [p]
        for q in ahead[1:]:
            try:
                requests += q.statistics_ahead(graph, ctx)
            except Exception:  # noqa: BLE001 - it declares again (and fails, if it must) at its own turn
                pass
            if q.modifies_values:
                break
        families: dict[Any, list[StatisticRequest]] = {}
        for r in requests:
            families.setdefault(getattr(type(r).collect, "__func__", type(r).collect), []).append(r)
        for family in families.values():
            try:
                type(family[0]).collect(graph, ctx, family)
            except QPassesError:  # bad data: each pass measures on demand and reports it as before
                pass

    def _verify(
        self,
        p: Pass,
        graph: Graph,
        ctx: PassContext,
        before: onnx.ModelProto | verification.ReferenceRun | None,
        result: PassResult,
    ) -> tuple[int, verification.ReferenceRun] | None:
        """onnx.checker, and for an exact rewrite the outputs vs ``before``'s; the verified run, by graph version."""
        after = graph.to_onnx()
        try:
            if self._input_invalid is None:
                verification.check_model(after, p.name)
            if before is not None and result.exact:
                if isinstance(before, onnx.ModelProto):
                    rtol = verification.model_rtol(before, self.rtol)
                    before = verification.reference_run(before, seed=ctx.seed, feeds=ctx.verification_feeds())
                else:
                    rtol = self.rtol
                _, run = verification.compare_with(before, after, p.name, rtol=rtol)
                return graph.version, run
            elif before is not None:
                result.remarks.append(
                    Remark(
                        "analysis",
                        p.name,
                        "numeric verification skipped",
                        reason="the pass reported an approximate rewrite",
                    )
                )
        except NumericCheckUnavailable as exc:
            result.remarks.append(Remark("analysis", p.name, "numeric verification skipped", reason=str(exc)))
        except VerificationError as exc:
            raise InternalError(f"internal error in pass '{p.name}': {exc}", p.name) from exc
        return None


def _after(done: list[str]) -> str:
    return f" (after {', '.join(done)})" if done else ""
