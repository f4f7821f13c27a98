"""The tensor tap: feed the data through the model (whole, or in segments under the byte cap) and hand
out the requested tensors run by run (the collector, ``qpasses.data.collector``, reads the data through
it); ``iterate_tensors`` / ``iterate_chunks`` stream an iterable of feeds through one tap. Sizing the
runs: ``tap_sizes``; cutting the model: ``run_segments``."""

from __future__ import annotations

import tempfile
from collections.abc import Generator, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnxruntime as ort
from numpy.typing import ArrayLike
from onnx import helper

from qpasses.core.errors import CalibrationDataError
from qpasses.data.input_specs import InputSpec, input_specs, validate_feed
from qpasses.data.run_segments import (
    GraphStructure,
    Segment,
    SegmentPlan,
    infer_value_infos,
    node_reads,
    shape_only_model,
    value_elem_type,
)
from qpasses.data.sessions import tap_session, unavailable_tensors, with_outputs
from qpasses.data.tap_sizes import ShapeProbes, estimate_sizes, feed_rows, run_error

Feed = Mapping[str, ArrayLike]
DEFAULT_MAX_BYTES_PER_RUN = 64 << 20
"""Default cap on the bytes of the tensors one onnxruntime run returns during calibration (64 MiB)."""

# --- the tap ------------------------------------------------------------------------------------------------


@dataclass(eq=False)
class TensorTap:
    """onnxruntime sessions that return ``tensors`` for each feed dict.

    Intermediate tensors are added as graph outputs; requested graph inputs are read from the feed
    (no session output needed). Names the model cannot expose are in ``missing`` with the reason
    and are never returned. ``run`` validates the feed first, so a mismatch names the input and
    the batch instead of surfacing as an onnxruntime error.

    ``run`` returns every tensor for the whole feed from one run. ``chunks`` returns them in pieces
    (some tensors, some rows) so that no run returns more than ``max_bytes_per_run`` bytes (None:
    no cap, one run per feed); see the module docstring.
    """

    model: onnx.ModelProto
    requested: Sequence[str]
    intra_op_threads: int = 0
    max_bytes_per_run: int | None = None
    tensors: tuple[str, ...] = field(init=False)
    missing: dict[str, str] = field(init=False)
    inputs: list[InputSpec] = field(init=False)

    def __post_init__(self) -> None:
        if self.max_bytes_per_run is not None and self.max_bytes_per_run < 1:
            raise CalibrationDataError(f"max_bytes_per_run must be >= 1 (or None), got {self.max_bytes_per_run}")
        names = list(dict.fromkeys(self.requested))
        self.missing = unavailable_tensors(self.model, names)
        self.inputs = input_specs(self.model)
        self.tensors = tuple(n for n in names if n not in self.missing)
        graph_inputs = {vi.name for vi in self.model.graph.input}
        self._fetch = [n for n in self.tensors if n not in graph_inputs]
        self._session: ort.InferenceSession | None = None
        self._tmps: list[tempfile.TemporaryDirectory[str]] = []
        self._structure: GraphStructure | None = None
        self._sizes: dict[tuple, dict[str, int]] = {}
        self._plans: dict[tuple, SegmentPlan] = {}
        self._segment_sessions: dict[tuple[int, int], ort.InferenceSession] = {}
        self._symbolic: dict[str, onnx.ValueInfoProto] | None = None
        self._probes = ShapeProbes()
        self.runs = 0  # onnxruntime runs so far (for tests and benchmarks)
        if self._fetch and self.max_bytes_per_run is None:
            self._whole()

    def close(self) -> None:
        """Drop the sessions (and the temporary copies of a >2 GiB model)."""
        self._session = None
        self._segment_sessions.clear()
        self._probes.close()
        for tmp in self._tmps:
            tmp.cleanup()
        self._tmps.clear()

    # -- one run per feed

    def run(self, feed: Feed, batch: int = 0) -> dict[str, np.ndarray]:
        """The requested tensors for one feed dict; ``batch`` only labels error messages."""
        inputs = validate_feed(feed, self.inputs, f"batch {batch}")
        values = self._run(self._whole(), self._fetch, inputs, batch) if self._fetch else []
        out = dict(zip(self._fetch, values, strict=True))
        return {n: out[n] if n in out else inputs[n] for n in self.tensors if n in out or n in inputs}

    def _whole(self) -> ort.InferenceSession:
        if self._session is None:
            self._session, tmp = tap_session(with_outputs(self.model, self._fetch), self.intra_op_threads)
            if tmp is not None:
                self._tmps.append(tmp)
        return self._session

    def _run(
        self,
        session: ort.InferenceSession,
        names: Sequence[str],
        inputs: Mapping[str, np.ndarray],
        batch: int,
        where: Mapping[str, np.ndarray] | None = None,
        rows: tuple[int, int] | None = None,
    ) -> list[np.ndarray]:
        try:
            self.runs += 1
            return session.run(list(names), dict(inputs))
        except Exception as exc:  # onnxruntime's exception types share no useful base class
            raise run_error(batch, inputs if where is None else where, exc, rows) from None

    # -- capped runs

    def chunks(self, feed: Feed, batch: int = 0) -> Iterator[dict[str, np.ndarray]]:
        """The requested tensors for one feed dict in pieces: each dict holds some tensors for some rows.

        Every (tensor, row) value arrives exactly once. The requested graph inputs come first, whole.
        """
        inputs = validate_feed(feed, self.inputs, f"batch {batch}")
        own = {n: inputs[n] for n in self.tensors if n in inputs}
        if own:
            yield own
            del own
        if not self._fetch:
            return
        plan = SegmentPlan(None, None) if self.max_bytes_per_run is None else self._plan(inputs, batch)
        total = feed_rows(inputs, self.inputs) if plan.rows is not None else None
        step = plan.rows
        starts: Iterable[int | None] = [None] if total is None or step is None else range(0, total, step)
        for start in starts:
            part = inputs if start is None or step is None else {k: v[start : start + step] for k, v in inputs.items()}
            rows = None if start is None else (start, start + len(next(iter(part.values()))))
            if plan.segments is None:
                values = self._run(self._whole(), self._fetch, part, batch, inputs, rows)
                chunk = dict(zip(self._fetch, values, strict=True))
                del values
                yield chunk
                del chunk
                continue
            live: dict[str, np.ndarray] = dict(part)
            for segment in plan.segments:
                if not segment.outputs:  # nothing requested, nothing read later: no need to run it
                    continue
                session = self._segment_session(segment, live)
                values = self._run(session, segment.outputs, {n: live[n] for n in segment.inputs}, batch, inputs, rows)
                produced = dict(zip(segment.outputs, values, strict=True))
                del values
                for name in segment.done:
                    live.pop(name, None)
                live.update((k, produced[k]) for k in segment.keep)
                chunk = {k: produced[k] for k in segment.requested}
                del produced
                yield chunk
                del chunk
            live.clear()

    def _plan(self, inputs: Mapping[str, np.ndarray], batch: int = 0) -> SegmentPlan:
        """Rows per run and segments for a feed of these shapes (cached by shape)."""
        assert self.max_bytes_per_run is not None
        budget = self.max_bytes_per_run
        rows = feed_rows(inputs, self.inputs)
        # A feed that cannot be split is sized whole; otherwise per row, and every row count shares it.
        key = tuple((k, v.shape if rows is None else v.shape[1:], v.dtype.str) for k, v in inputs.items())
        plan_key = (key, rows is None)
        cached = self._plans.get(plan_key)
        if cached is not None:
            return cached
        unit = inputs if rows is None else {k: v[:1] for k, v in inputs.items()}
        sizes = self._sizes.get(key)
        if sizes is None:
            sizes = self._sizes[key] = estimate_sizes(
                self.model, self._structure_of(), unit, inputs, batch, self.intra_op_threads, self._probes
            )
        # One row per run, whatever the batch size or the cap: onnxruntime picks some kernels by
        # batch size (MLAS convolutions with small outputs), with another rounding.
        per_unit = sum(sizes.get(n, 0) for n in self._fetch)
        rows_per_run = None if rows is None else 1
        plan = SegmentPlan(rows_per_run, None if per_unit <= budget else self._segments(sizes, budget))
        self._plans[plan_key] = plan
        return plan

    def _structure_of(self) -> GraphStructure:
        if self._structure is None:
            self._structure = GraphStructure(self.model, self._fetch)
        return self._structure

    def _segments(self, sizes: Mapping[str, int], budget: int) -> tuple[Segment, ...]:
        structure = self._structure_of()
        requested = set(self._fetch)
        infos = self._symbolic_infos()
        non_tensors = {n for n, vi in infos.items() if value_elem_type(vi) is None}
        ranges = structure.cut(sizes, requested, budget, non_tensors)
        last_segment: dict[str, int] = {}
        for k, (start, stop) in enumerate(ranges):
            for i in range(start, stop):
                for r in structure.reads[i]:
                    last_segment[r] = k
        segments = []
        for k, (start, stop) in enumerate(ranges):
            produced = [o for i in range(start, stop) for o in structure.nodes[i].output if o]
            inside = set(produced)
            reads = [r for i in range(start, stop) for r in structure.reads[i]]
            reads += [r for node in structure.static_closure(reads) for r in node_reads(node)]
            inputs = [
                r
                for r in dict.fromkeys(reads)
                if r not in inside and r not in structure.initializers and r not in structure.static
            ]
            later = [o for o in produced if last_segment.get(o, -1) > k]
            mine = [o for o in produced if o in requested]
            done = [r for r in inputs if last_segment.get(r, -1) <= k]
            segments.append(
                Segment(
                    start,
                    stop,
                    tuple(inputs),
                    tuple(dict.fromkeys(mine + later)),
                    tuple(mine),
                    tuple(later),
                    tuple(done),
                )
            )
        return tuple(segments)

    def _symbolic_infos(self) -> dict[str, onnx.ValueInfoProto]:
        """Types and (symbolic) shapes of the model's values, as onnxruntime sees them in the whole model."""
        if self._symbolic is None:
            self._symbolic = infer_value_infos(shape_only_model(self.model))
        return self._symbolic

    def _segment_session(self, segment: Segment, live: Mapping[str, np.ndarray]) -> ort.InferenceSession:
        key = (segment.start, segment.stop)
        session = self._segment_sessions.get(key)
        if session is None:
            model = self._segment_model(segment, live)
            session, tmp = tap_session(model, self.intra_op_threads)
            del model
            if tmp is not None:
                self._tmps.append(tmp)
            self._segment_sessions[key] = session
        return session

    def _segment_model(self, segment: Segment, live: Mapping[str, np.ndarray]) -> onnx.ModelProto:
        structure = self._structure_of()
        src = self.model.graph
        infos = self._symbolic_infos()
        nodes = structure.nodes[segment.start : segment.stop]
        reads = [r for i in range(segment.start, segment.stop) for r in structure.reads[i]]
        static = structure.static_closure(reads)
        used = set(reads) | {r for node in static for r in node_reads(node)}
        model = onnx.ModelProto()
        model.ir_version = self.model.ir_version
        model.opset_import.extend(self.model.opset_import)
        model.functions.extend(self.model.functions)
        g = model.graph
        g.name = f"{src.name}_segment_{segment.start}_{segment.stop}"
        g.node.extend(static)
        g.node.extend(nodes)
        g.initializer.extend(t for t in src.initializer if t.name in used)
        g.sparse_initializer.extend(t for t in src.sparse_initializer if t.values.name in used)
        for name in segment.inputs:
            vi = infos.get(name)
            value = live[name]
            if vi is not None and value_elem_type(vi):
                g.input.append(vi)
            else:
                g.input.append(
                    helper.make_tensor_value_info(
                        name, helper.np_dtype_to_tensor_dtype(value.dtype), [None] * value.ndim
                    )
                )
        for name in segment.outputs:
            vi = infos.get(name)
            g.output.append(vi if vi is not None and value_elem_type(vi) else onnx.ValueInfoProto(name=name))
        return model


def iterate_tensors(
    model: onnx.ModelProto, tensors: Sequence[str], feeds: Iterable[Feed]
) -> Iterator[dict[str, np.ndarray]]:
    """Yield ``{tensor: batch value}`` per feed dict, one batch alive at a time.

    Tensors the model cannot expose are left out (see ``unavailable_tensors``). Raises
    CalibrationDataError for a feed that does not match the model, or when ``feeds`` is empty.
    """
    tap = TensorTap(model, tensors)
    try:
        count = 0
        for count, feed in enumerate(feeds, 1):
            yield tap.run(feed, count - 1)
        if not count:
            raise CalibrationDataError("no calibration data: the data source yielded no batches")
    finally:
        tap.close()


def iterate_chunks(
    model: onnx.ModelProto,
    tensors: Sequence[str],
    feeds: Iterable[Feed],
    max_bytes_per_run: int | None = DEFAULT_MAX_BYTES_PER_RUN,
) -> Generator[tuple[int, dict[str, np.ndarray]], None, None]:
    """Yield ``(batch, {tensor: value for some rows})`` pieces, no run returning more than ``max_bytes_per_run``.

    Every (tensor, row) value of every batch arrives exactly once (see ``TensorTap.chunks``); one
    piece is alive at a time. Errors as ``iterate_tensors``.
    """
    tap = TensorTap(model, tensors, max_bytes_per_run=max_bytes_per_run)
    try:
        source, count = iter(feeds), 0
        while (feed := next(source, None)) is not None:  # no enumerate: it would hold the last feed meanwhile
            for piece in tap.chunks(feed, count):
                yield count, piece
                del piece
            del feed  # before the source makes the next one
            count += 1
        if not count:
            raise CalibrationDataError("no calibration data: the data source yielded no batches")
    finally:
        tap.close()
