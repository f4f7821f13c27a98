"""Scorers: the score of one assignment under one phase's callback.

Two ways to get a session for an assignment:

- ``SimulationScorer``: one fake-quant session built once; an assignment is new input values
  (``qpasses.amp.simulation``). No model is lowered. Where an evaluation costs more than
  ``PRUNE_FACTOR`` session builds (a real metric on a real model), the assignment's layout gets its
  own pruned session (identity quantizers removed: the same values, about half the work), kept
  for every later assignment of that layout; cheap evaluations (small test metrics, the phase-1
  proxy) stay on the one session.
- ``RebuildScorer``: the real thing each time, ``quantize_model`` (calibration included) and a
  new session with exact QDQ semantics (like the simulation: the search never depends on which
  fused integer kernels this CPU's onnxruntime picks). Used where the simulation cannot stand in
  (float candidates) and as the benchmark's reference point.

``ModelScorer`` scores a fixed model: the FP32 reference, and the final check of the chosen
model, once in the session users get by default and once with exact QDQ semantics.

A ``ScorerSpec`` is the picklable recipe of either, so process and Ray workers build their own.
Phase ``"proxy"`` is not a user callback: the output SQNR against the proxy baseline on a few
samples (``qpasses.amp.proxy``); it counts as ``proxy_runs``, not ``evaluations``.
"""

from __future__ import annotations

import math
import time
from collections import Counter, OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import numpy as np
import onnx
import onnxruntime as ort

import graph_ir
from qpasses.amp.candidates import Assignment, Candidate
from qpasses.amp.errors import AmpError
from qpasses.amp.evaluation import EvalFn, Sqnr, TopOneAccuracy, callback_name
from qpasses.amp.fake_quant import Layout, SimulatedSession
from qpasses.amp.groups import GroupPartition
from qpasses.amp.overrides import quantize_assignment
from qpasses.amp.proxy import OutputSqnr
from qpasses.amp.simulation import SimulationModel
from qpasses.amp.statistics import CalibrationTables
from qpasses.core.errors import QPassesError
from qpasses.core.verification import exact_session, runtime_session
from qpasses.quant.config import QuantConfig
from qpasses.targets.descriptor import from_dict

Phase = Literal["phase1", "phase2", "proxy"]


@dataclass
class ScorerStats:
    """Work done: evaluations (user callback calls), proxy runs, sessions built, and seconds spent in each."""

    evaluations: int = 0
    session_builds: int = 0
    eval_seconds: float = 0.0
    build_seconds: float = 0.0
    proxy_runs: int = 0
    proxy_seconds: float = 0.0

    def add(self, other: ScorerStats) -> None:
        for name, value in vars(other).items():
            setattr(self, name, getattr(self, name) + value)

    def since(self, before: ScorerStats) -> ScorerStats:
        """The work done since the snapshot ``before``."""
        return ScorerStats(**{name: value - getattr(before, name) for name, value in vars(self).items()})

    def snapshot(self) -> ScorerStats:
        return ScorerStats(**vars(self))


class Scorer(Protocol):
    spec: ScorerSpec
    stats: ScorerStats

    def score(self, assignment: Assignment, phase: Phase) -> float: ...


def describe(assignment: Assignment) -> str:
    """An assignment in a few words: ``every group at 8/8``, ``conv2 at 8/8 (the other 2 groups at 16/16)``."""
    counts = Counter(str(c) for c in assignment.values())
    if not counts:
        return "no group"
    common, count = counts.most_common(1)[0]
    if count == len(assignment):
        return f"every group at {common}"
    others = [f"{g} at {c}" for g, c in assignment.items() if str(c) != common]
    head = ", ".join(others[:4]) + (f" and {len(others) - 4} more" if len(others) > 4 else "")
    return f"{head} (the other {count} group{'s' if count > 1 else ''} at {common})"


def _short(value: Any, limit: int = 60) -> str:
    text = " ".join(repr(value).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_score(value: Any, where: str, *, callback: Any = None, finite: bool = True) -> float:
    """A score is a real number (float, int, numpy scalar, 0-d array) and, unless ``finite`` is off, finite.

    NaN compares false with every target (the search and the verdict become noise) and an infinite
    score meets any target, so both are the callback's mistake, named with ``where``. ``finite=False``
    (the FP32 reference, where SQNR against itself is inf, and the internal proxy) still refuses NaN.
    Strings, None, bools and lists are refused even where ``float()`` would take them.
    """
    who = f"the eval callback {callback_name(callback)}" if callback is not None else "the eval callback"
    if isinstance(value, (bool, np.bool_)) or not hasattr(value, "__float__"):
        raise AmpError(
            f"{where}: {who} must return a number (higher is better), got {type(value).__name__} {_short(value)}"
        )
    try:
        score = float(value)
    except (TypeError, ValueError):
        raise AmpError(
            f"{where}: {who} must return a number (higher is better), got {type(value).__name__} {_short(value)}"
        ) from None
    if math.isnan(score) or (finite and math.isinf(score)):
        raise AmpError(
            f"{where}: {who} returned {_short(value)}: a score must be a finite number (NaN fails every "
            "comparison with the target, inf meets any target)"
        )
    return score


def _builtin(fn: Any) -> bool:
    """qpasses' own metrics: an exception from them is a qpasses bug, not the user's."""
    return isinstance(fn, (TopOneAccuracy, Sqnr, OutputSqnr))


def evaluate(fn: Any, session: Any, where: str, *, finite: bool = True) -> float:
    """One callback call, checked: an exception in the user's callback is their error (``AmpError`` naming the
    callback, ``where`` and the exception), as is a score that is not a finite number (``check_score``)."""
    try:
        value = fn(session)
    except QPassesError:
        raise
    except Exception as exc:
        if _builtin(fn):
            raise
        text = " ".join(str(exc).split())
        text = text if len(text) <= 300 else text[:297] + "..."
        raise AmpError(
            f"{where}: the eval callback {callback_name(fn)} raised {type(exc).__name__}"
            + (f": {text}" if text else "")
        ) from exc
    return check_score(value, where, callback=fn, finite=finite)


@dataclass
class ScorerSpec:
    """Everything a worker needs to score assignments on its own (plain, picklable data)."""

    model: bytes
    partition: GroupPartition
    config: QuantConfig
    callbacks: Mapping[str, EvalFn]
    tables: CalibrationTables | None = None
    feeds: Sequence[Mapping[str, Any]] = ()
    target: Mapping[str, Any] | None = None
    bias_correction: bool = True
    batch_size: int = 16
    intra_op_threads: int = 0
    proxy_feeds: Sequence[Mapping[str, Any]] = ()
    """Samples the phase-1 proxy runs on."""
    proxy_baseline: Mapping[str, Candidate] | None = None
    """The assignment the proxy compares outputs with (phase 1's baseline)."""
    prune: bool | None = None
    """Pruned per-layout sessions: None decides by cost, True always, False never (simulation only)."""

    @property
    def simulated(self) -> bool:
        return self.tables is not None

    def target_descriptor(self) -> Any:
        return from_dict(dict(self.target)) if self.target is not None else None

    def build(self) -> SimulationScorer | RebuildScorer:
        return SimulationScorer(self) if self.simulated else RebuildScorer(self)


def _proxy_callback(spec: ScorerSpec, outputs: Any) -> OutputSqnr:
    """The proxy callback, its reference computed by ``outputs(baseline assignment, callback)``."""
    if spec.proxy_baseline is None or not spec.proxy_feeds:
        raise AmpError("the phase-1 proxy needs proxy_feeds and proxy_baseline in the scorer spec")
    proxy = OutputSqnr([dict(f) for f in spec.proxy_feeds])
    proxy.reference = outputs(spec.proxy_baseline, proxy)
    return proxy


class SimulationScorer:
    """One simulation session for every assignment (plus pruned sessions where evaluations are dear)."""

    PRUNE_FACTOR = 3.0
    """A new pruned session is built when the phase's last evaluation took this many session builds."""
    PRUNED_SESSIONS = 8
    """Pruned sessions kept (least recently used dropped)."""

    def __init__(self, spec: ScorerSpec) -> None:
        self.spec = spec
        self.stats = ScorerStats()
        start = time.perf_counter()
        graph = graph_ir.from_onnx(onnx.load_from_string(spec.model))
        target = spec.target_descriptor()
        assert spec.tables is not None
        self.model = SimulationModel(
            graph,
            spec.partition,
            spec.tables,
            spec.config,
            per_channel_weights=target is None or target.per_channel_weights,
        )
        built = time.perf_counter()
        self.session = self.model.session(intra_op_threads=spec.intra_op_threads)
        self.stats.session_builds += 1
        self.stats.build_seconds += time.perf_counter() - start
        self._full_build = time.perf_counter() - built  # onnxruntime's part: a pruned build costs less
        self._pruned: OrderedDict[Layout, SimulatedSession] = OrderedDict()
        self._build_estimate: float | None = None  # seconds of one pruned build (measured on the first)
        self._last_eval: dict[str, float] = {}  # phase -> seconds of its last evaluation
        self._proxy: OutputSqnr | None = None

    def _worth_pruning(self, phase: str) -> bool:
        if self.spec.prune is not None:
            return self.spec.prune
        last = self._last_eval.get(phase)
        if last is None:
            return False  # the first evaluation of a phase measures what one costs
        estimate = self._build_estimate if self._build_estimate is not None else self._full_build
        return last > self.PRUNE_FACTOR * estimate

    def session_for(self, layout: Layout, phase: str) -> SimulatedSession:
        """The pruned session of ``layout`` when there is one or it pays off, else the full session."""
        if self.spec.prune is False:
            return self.session
        cached = self._pruned.get(layout)
        if cached is not None:
            self._pruned.move_to_end(layout)
            return cached
        if not self._worth_pruning(phase):
            return self.session
        start = time.perf_counter()
        sess = self.model.session(intra_op_threads=self.spec.intra_op_threads, layout=layout)
        seconds = time.perf_counter() - start
        self._build_estimate = seconds
        self.stats.session_builds += 1
        self.stats.build_seconds += seconds
        self._pruned[layout] = sess
        while len(self._pruned) > self.PRUNED_SESSIONS:
            self._pruned.popitem(last=False)
        return sess

    def _prepared(self, assignment: Assignment, phase: str) -> SimulatedSession:
        feeds, layout = self.model.plan_feeds(assignment)
        sess = self.session_for(layout, phase)
        sess.set_feeds(feeds)
        return sess

    def _callback(self, phase: Phase) -> Any:
        if phase != "proxy":
            return self.spec.callbacks[phase]
        if self._proxy is None:
            self._proxy = _proxy_callback(self.spec, lambda a, p: p.outputs(self._prepared(a, "proxy")))
        return self._proxy

    def score(self, assignment: Assignment, phase: Phase) -> float:
        start = time.perf_counter()
        fn = self._callback(phase)
        sess = self._prepared(assignment, phase)
        began = time.perf_counter()
        value = evaluate(fn, sess, f"AMP {phase} score of {describe(assignment)}", finite=phase != "proxy")
        self._last_eval[phase] = time.perf_counter() - began
        seconds = time.perf_counter() - start
        if phase == "proxy":
            self.stats.proxy_runs += 1
            self.stats.proxy_seconds += seconds
        else:
            self.stats.evaluations += 1
            self.stats.eval_seconds += seconds
        return value


class RebuildScorer:
    """A real QDQ model and a new session per assignment."""

    def __init__(self, spec: ScorerSpec) -> None:
        self.spec = spec
        self.stats = ScorerStats()
        self._graph = graph_ir.from_onnx(onnx.load_from_string(spec.model))
        self._target = spec.target_descriptor()
        self._proxy: OutputSqnr | None = None

    def session(self, assignment: Assignment) -> ort.InferenceSession:
        start = time.perf_counter()
        result = quantize_assignment(
            self._graph,
            self.spec.partition,
            assignment,
            self.spec.feeds,
            self.spec.config,
            target=self._target,
            bias_correction=self.spec.bias_correction,
            batch_size=self.spec.batch_size,
        )
        sess = exact_session(result.model.SerializeToString(), intra_op_threads=self.spec.intra_op_threads)
        self.stats.session_builds += 1
        self.stats.build_seconds += time.perf_counter() - start
        return sess

    def score(self, assignment: Assignment, phase: Phase) -> float:
        if phase == "proxy":
            if self._proxy is None:
                self._proxy = _proxy_callback(self.spec, lambda a, p: p.outputs(self.session(a)))
            fn: Any = self._proxy
        else:
            fn = self.spec.callbacks[phase]
        sess = self.session(assignment)
        start = time.perf_counter()
        value = evaluate(fn, sess, f"AMP {phase} score of {describe(assignment)}", finite=phase != "proxy")
        if phase == "proxy":
            self.stats.proxy_runs += 1
            self.stats.proxy_seconds += time.perf_counter() - start
        else:
            self.stats.evaluations += 1
            self.stats.eval_seconds += time.perf_counter() - start
        return value


@dataclass
class ModelScorer:
    """Scores a fixed model (the FP32 reference, a saved QDQ model) with a callback.

    By default in the session a user gets (``runtime_session``: graph optimizations on, so
    onnxruntime fuses QDQ Conv/Gemm/MatMul into integer kernels whose results depend on the CPU);
    ``exact=True`` scores it with exact QDQ semantics (``exact_session``: Q/DQ run as written).
    """

    model: bytes
    intra_op_threads: int = 0
    stats: ScorerStats = field(default_factory=ScorerStats)
    exact: bool = False
    what: str = "the model"
    """The model in error messages (``the FP32 model``, ``the chosen point's QDQ model ...``)."""
    finite: bool = True
    """False: +-inf is a valid score (the FP32 reference: SQNR against itself); NaN never is."""

    def score_with(self, fn: EvalFn, where: str) -> float:
        """``fn``'s score of the model; errors name ``where`` (the phase) and ``what``."""
        start = time.perf_counter()
        factory = exact_session if self.exact else runtime_session
        sess = factory(self.model, intra_op_threads=self.intra_op_threads)
        self.stats.session_builds += 1
        mid = time.perf_counter()
        self.stats.build_seconds += mid - start
        value = evaluate(fn, sess, f"AMP {where} score of {self.what}", finite=self.finite)
        self.stats.evaluations += 1
        self.stats.eval_seconds += time.perf_counter() - mid
        return value
