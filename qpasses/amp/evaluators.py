"""Scorers: the score of one assignment under one phase's callback.

Two ways to get a session for an assignment:

- ``SimulationScorer``: one fake-quant session built once; an assignment is new input values
  (``qpasses.amp.simulation``). No model is lowered and no session is built per evaluation.
- ``RebuildScorer``: the real thing each time, ``quantize_model`` (calibration included) and a
  new session with exact QDQ semantics (like the simulation: the search never depends on which
  fused integer kernels this CPU's onnxruntime picks). Used where the simulation cannot stand in
  (float candidates) and as the benchmark's reference point.

``ModelScorer`` scores a fixed model: the FP32 reference, and the final check of the chosen
model, once in the session users get by default and once with exact QDQ semantics.

A ``ScorerSpec`` is the picklable recipe of either, so process and Ray workers build their own.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import onnx
import onnxruntime as ort

import graph_ir
from qpasses.amp.candidates import Assignment
from qpasses.amp.errors import AmpError
from qpasses.amp.evaluation import EvalFn
from qpasses.amp.groups import GroupPartition
from qpasses.amp.overrides import quantize_assignment
from qpasses.amp.simulation import SimulationModel
from qpasses.amp.statistics import CalibrationTables
from qpasses.quant_config import QuantConfig
from qpasses.verification import exact_session, runtime_session
from targets.descriptor import from_dict

Phase = Literal["phase1", "phase2"]


@dataclass
class ScorerStats:
    """Work done: evaluations run, sessions built, and seconds spent in each."""

    evaluations: int = 0
    session_builds: int = 0
    eval_seconds: float = 0.0
    build_seconds: float = 0.0

    def add(self, other: ScorerStats) -> None:
        self.evaluations += other.evaluations
        self.session_builds += other.session_builds
        self.eval_seconds += other.eval_seconds
        self.build_seconds += other.build_seconds


class Scorer(Protocol):
    stats: ScorerStats

    def score(self, assignment: Assignment, phase: Phase) -> float: ...


def check_score(value: Any, where: str) -> float:
    """AIMET's rule: the callback returns a float or something float() accepts."""
    try:
        return float(value)
    except (TypeError, ValueError):
        raise AmpError(f"{where}: the eval callback must return a float, got {type(value).__name__}") from None


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

    @property
    def simulated(self) -> bool:
        return self.tables is not None

    def target_descriptor(self) -> Any:
        return from_dict(dict(self.target)) if self.target is not None else None

    def build(self) -> SimulationScorer | RebuildScorer:
        return SimulationScorer(self) if self.simulated else RebuildScorer(self)


class SimulationScorer:
    """One simulation session for every assignment."""

    def __init__(self, spec: ScorerSpec) -> None:
        self.spec = spec
        self.stats = ScorerStats()
        start = time.perf_counter()
        graph = graph_ir.from_onnx(onnx.load_from_string(spec.model))
        target = spec.target_descriptor()
        assert spec.tables is not None
        self.model = SimulationModel(graph, spec.partition, spec.tables, spec.config,
                                     per_channel_weights=target is None or target.per_channel_weights)
        self.session = self.model.session(intra_op_threads=spec.intra_op_threads)
        self.stats.session_builds += 1
        self.stats.build_seconds += time.perf_counter() - start

    def score(self, assignment: Assignment, phase: Phase) -> float:
        start = time.perf_counter()
        self.session.extra = self.model.feeds(assignment)
        value = check_score(self.spec.callbacks[phase](self.session), phase)
        self.stats.evaluations += 1
        self.stats.eval_seconds += time.perf_counter() - start
        return value


class RebuildScorer:
    """A real QDQ model and a new session per assignment."""

    def __init__(self, spec: ScorerSpec) -> None:
        self.spec = spec
        self.stats = ScorerStats()
        self._graph = graph_ir.from_onnx(onnx.load_from_string(spec.model))
        self._target = spec.target_descriptor()

    def session(self, assignment: Assignment) -> ort.InferenceSession:
        start = time.perf_counter()
        result = quantize_assignment(self._graph, self.spec.partition, assignment, self.spec.feeds, self.spec.config,
                                     target=self._target, bias_correction=self.spec.bias_correction,
                                     batch_size=self.spec.batch_size)
        sess = exact_session(result.model.SerializeToString(), intra_op_threads=self.spec.intra_op_threads)
        self.stats.session_builds += 1
        self.stats.build_seconds += time.perf_counter() - start
        return sess

    def score(self, assignment: Assignment, phase: Phase) -> float:
        sess = self.session(assignment)
        start = time.perf_counter()
        value = check_score(self.spec.callbacks[phase](sess), phase)
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

    def score_with(self, fn: EvalFn, where: str) -> float:
        start = time.perf_counter()
        factory = exact_session if self.exact else runtime_session
        sess = factory(self.model, intra_op_threads=self.intra_op_threads)
        self.stats.session_builds += 1
        mid = time.perf_counter()
        self.stats.build_seconds += mid - start
        value = check_score(fn(sess), where)
        self.stats.evaluations += 1
        self.stats.eval_seconds += time.perf_counter() - mid
        return value
