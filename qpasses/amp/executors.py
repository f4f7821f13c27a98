"""Where phase-1 evaluations run: in this process, a local process pool, or a Ray cluster.

Phase-1 evaluations are independent (one group at one candidate, the rest at the baseline), so
they fan out. Workers build their own scorer from the picklable ``ScorerSpec`` once (one
simulation session per worker) and then only receive assignments. Results come back in task
order, so every executor yields the same phase-1 list. Ray is optional (``qpasses[ray]``).
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from typing import Any, Protocol

from tqdm import tqdm

from qpasses.amp.candidates import Candidate
from qpasses.amp.errors import AmpError
from qpasses.amp.evaluators import Phase, Scorer, ScorerSpec, ScorerStats

Task = tuple[dict[str, Candidate], Phase]
Result = tuple[float, ScorerStats]
EXECUTORS = ("local", "process", "ray")


class Executor(Protocol):
    """Runs tasks: ``spec`` builds the workers' recipe (remote executors only), ``local`` this process's scorer."""

    name: str

    def map(
        self,
        spec: Callable[[], ScorerSpec],
        local: Callable[[], Scorer],
        tasks: Sequence[Task],
        *,
        progress: bool,
        desc: str,
    ) -> list[Result]: ...


def _shippable(spec: ScorerSpec, executor: str) -> ScorerSpec:
    try:
        pickle.dumps(spec.callbacks)
    except Exception as exc:
        raise AmpError(
            f"executor {executor!r} needs picklable eval callbacks (module-level functions, or the "
            f"callbacks of qpasses.amp.evaluation): {type(exc).__name__}: {exc}"
        ) from None
    return spec


def progress_bar(total: int | None, progress: bool, desc: str, *, unit: str = "eval") -> tqdm:
    """AMP's progress bars: on stderr, gone when done, off when ``progress`` is false."""
    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, disable=not progress, leave=False)


def _delta(before: ScorerStats, after: ScorerStats) -> ScorerStats:
    return after.since(before)


@dataclass
class LocalExecutor:
    """In this process, with the caller's scorer (the default)."""

    name: str = "local"

    def map(
        self,
        spec: Callable[[], ScorerSpec],
        local: Callable[[], Scorer],
        tasks: Sequence[Task],
        *,
        progress: bool,
        desc: str,
    ) -> list[Result]:
        scorer = local()
        out: list[Result] = []
        with progress_bar(len(tasks), progress, desc) as bar:
            for assignment, phase in tasks:
                before = scorer.stats.snapshot()
                value = scorer.score(assignment, phase)
                out.append((value, _delta(before, scorer.stats)))
                bar.update()
        return out


class _WorkerSlot:
    """The scorer of one pool worker process, built by the pool's initializer."""

    scorer: Any = None
    fresh: ScorerStats | None = None


def _init_worker(spec: ScorerSpec) -> None:
    _WorkerSlot.scorer = spec.build()
    _WorkerSlot.fresh = _WorkerSlot.scorer.stats.snapshot()  # the session build, reported once


def _run_task(task: Task) -> Result:
    scorer = _WorkerSlot.scorer
    before = scorer.stats.snapshot()
    value = scorer.score(*task)
    stats = _delta(before, scorer.stats)
    if _WorkerSlot.fresh is not None:
        stats.add(_WorkerSlot.fresh)
        _WorkerSlot.fresh = None
    return value, stats


@dataclass
class ProcessExecutor:
    """A local pool of ``workers`` processes (spawned: onnxruntime does not survive fork)."""

    workers: int | None = None
    name: str = "process"

    def map(
        self,
        spec: Callable[[], ScorerSpec],
        local: Callable[[], Scorer],
        tasks: Sequence[Task],
        *,
        progress: bool,
        desc: str,
    ) -> list[Result]:
        if not tasks:
            return []
        recipe = _shippable(spec(), self.name)
        workers = max(1, min(self.workers or os.cpu_count() or 1, len(tasks)))
        recipe.intra_op_threads = max(1, (os.cpu_count() or 1) // workers)
        ctx = multiprocessing.get_context("spawn")
        out: list[Result | None] = [None] * len(tasks)
        with (
            ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker, initargs=(recipe,)) as pool,
            progress_bar(len(tasks), progress, desc) as bar,
        ):
            futures = {pool.submit(_run_task, task): i for i, task in enumerate(tasks)}
            for future in as_completed(futures):
                out[futures[future]] = future.result()
                bar.update()
        return [r for r in out if r is not None]


@dataclass
class RayExecutor:
    """Ray actors, one scorer each: on the cluster at ``address``, or a local one started here."""

    address: str | None = None
    workers: int | None = None
    name: str = "ray"

    def map(
        self,
        spec: Callable[[], ScorerSpec],
        local: Callable[[], Scorer],
        tasks: Sequence[Task],
        *,
        progress: bool,
        desc: str,
    ) -> list[Result]:
        try:
            import ray
            from ray.util import ActorPool
        except ImportError:
            raise AmpError("executor 'ray' needs Ray: pip install 'qpasses[ray]' (or use executor 'process')") from None
        if not tasks:
            return []
        recipe = _shippable(spec(), self.name)
        started = not ray.is_initialized()  # a Ray we start here is stopped here; a caller's keeps running
        if started:
            ray.init(
                address=self.address,
                ignore_reinit_error=True,
                log_to_driver=False,
                **({} if self.address else {"include_dashboard": False}),
            )
        try:
            available = int(ray.available_resources().get("CPU", 1)) or 1
            count = max(1, min(self.workers or available, len(tasks)))
            recipe.intra_op_threads = 1
            actor = ray.remote(num_cpus=1)(_RayScorer)
            pool = ActorPool([actor.remote(recipe) for _ in range(count)])
            out: list[Result] = []
            with progress_bar(len(tasks), progress, desc) as bar:
                for result in pool.map(lambda a, task: a.run.remote(task), list(tasks)):
                    out.append(result)
                    bar.update()
            return out
        finally:
            if started:
                ray.shutdown()


class _RayScorer:
    """A Ray actor holding one scorer."""

    def __init__(self, spec: ScorerSpec) -> None:
        self.scorer = spec.build()
        self.fresh: ScorerStats | None = self.scorer.stats.snapshot()

    def run(self, task: Task) -> Result:
        before = self.scorer.stats.snapshot()
        value = self.scorer.score(*task)
        stats = _delta(before, self.scorer.stats)
        if self.fresh is not None:
            stats.add(self.fresh)
            self.fresh = None
        return value, stats


def make_executor(kind: str | Executor, *, workers: int | None = None, address: str | None = None) -> Executor:
    """``"local"``, ``"process"`` or ``"ray"`` (or an executor object)."""
    if not isinstance(kind, str):
        return kind
    if kind == "local":
        return LocalExecutor()
    if kind == "process":
        return ProcessExecutor(workers)
    if kind == "ray":
        return RayExecutor(address, workers)
    raise AmpError(f"unknown executor {kind!r} (expected one of {', '.join(EXECUTORS)})")
