"""Calibration: run the FP32 model over the data once and stream the tensors to observe into observers.

The tensors to observe become extra graph outputs; onnxruntime keeps requested outputs intact
through its graph optimizations, so the sessions run with all of them enabled (onnxruntime's own
calibrator switches them off and runs ~2x slower). Only the observers survive a run, so memory does
not grow with the number of samples. The statistics of one run are computed in a worker thread
while onnxruntime runs the next: both release the GIL, so the two overlap.

A run keeps every requested output alive until it ends, so its memory grows with rows x observed
tensors (a YOLOv8n at 640x640 exposes ~200 MB per sample). ``max_bytes_per_run`` caps the bytes
one run may return. When the batch axis is dynamic every run covers one row (one sample): the
values then do not depend on the batch size (onnxruntime picks some kernels by batch size, and
they round differently), and a run returns the least there is to return. Each tensor's bytes per
row are estimated by shape inference at the feed's shapes (onnxruntime measures, through ``Shape``
outputs, what inference cannot tell); when one row is over the budget, the model is cut into
consecutive segments, each its own session fed with the values the earlier ones produced, so
every node still runs once per row. Cuts fall only between requested tensors and the sessions
leave out the NCHWc layout, so a segment computes bit for bit what the whole model computes. The
statistics do not depend on how the values arrive (min/max trivially; histograms sit on a grid
of power-of-two bins that depends only on the overall range, see ``_GridHistogram``): the
encodings are the same for any cap and any calibration batch size.

``iterate_tensors`` / ``TensorTap`` are the reusable lower level: later features (SeqMSE, mixed
precision) capture layer inputs through them instead of building their own sessions.
"""

from __future__ import annotations

import itertools
import math
import operator
import os
import sys
import tempfile
import warnings
from collections.abc import Generator, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import closing
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnxruntime as ort
from numpy.typing import ArrayLike
from onnx import helper
from tqdm import tqdm

from qpasses.core.errors import CalibrationDataError, ModelLoadError
from qpasses.core.verification import session_options
from qpasses.data.sources import InputSpec, input_specs, validate_feed
from qpasses.quant.range_statistics import DEFAULT_BINS, ChannelMeans, HistogramObserver, MinMaxObserver

Feed = Mapping[str, ArrayLike]
Observer = MinMaxObserver | HistogramObserver

DEFAULT_MAX_BYTES_PER_RUN = 64 << 20
"""Default cap on the bytes of the tensors one onnxruntime run returns during calibration (64 MiB)."""

# Protobuf refuses to serialize 2 GiB; bigger models reach onnxruntime through a file with external data.
_PROTO_LIMIT = 2**31 - 2**20
# Elements per chunk of the histogram update: its float64/index scratch then stays in L2 cache.
_CHUNK = 1 << 16
# Initializers above this many bytes are left out of the copy that shape inference sees.
_SHAPE_ONLY_BYTES = 1024
# Graph transformers whose decisions span the whole graph (see ``_session``).
_DISABLED_OPTIMIZERS = ["NchwcTransformer"]
# Ops whose outputs are not a function of their inputs: never duplicated into several segments.
_NONDETERMINISTIC = frozenset({"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike",
                               "Multinomial", "Bernoulli"})


# --- the model's interface ---------------------------------------------------------------------------


def unavailable_tensors(model: onnx.ModelProto, tensors: Iterable[str]) -> dict[str, str]:
    """Requested tensors a session cannot expose, each with the reason (for 'missed' remarks)."""
    produced = {o for node in model.graph.node for o in node.output if o}
    inputs = {vi.name for vi in model.graph.input}
    constants = {t.name for t in model.graph.initializer}
    constants |= {node.output[0] for node in model.graph.node if node.op_type == "Constant" and node.output}
    missing: dict[str, str] = {}
    for name in tensors:
        if name in constants:
            missing[name] = "a constant, not an activation"
        elif name not in produced and name not in inputs:
            missing[name] = "not produced by any node of the main graph"
    return missing


# --- the session ---------------------------------------------------------------------------------------


def _with_outputs(model: onnx.ModelProto, names: Sequence[str]) -> onnx.ModelProto:
    """A copy of ``model`` whose graph outputs also include ``names``."""
    extended = onnx.ModelProto()
    extended.CopyFrom(model)
    present = {o.name for o in extended.graph.output}
    typed = {vi.name: vi for vi in extended.graph.value_info}
    for name in names:
        if name in present:
            continue
        vi = onnx.ValueInfoProto()
        if name in typed:
            vi.CopyFrom(typed[name])
        else:
            vi.name = name  # onnxruntime infers the type itself
        extended.graph.output.append(vi)
    return extended


def _session(
    model: onnx.ModelProto, intra_op_threads: int
) -> tuple[ort.InferenceSession, tempfile.TemporaryDirectory[str] | None]:
    """CPU session with every graph optimization on but the NCHWc layout; models over 2 GiB go through a file.

    The NCHWc layout is decided across the whole graph (an op after a cut would run on another
    layout, with another rounding), so without it a segment of the model computes exactly what the
    whole model does. With every activation a graph output it gains little (~10% on a YOLO).
    """
    options = session_options(intra_op_threads=intra_op_threads)  # all graph optimizations on
    # Idle pool threads must not spin between runs: the statistics need that CPU time.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    # No arena: each session's arena would keep its own high-water mark (outputs included) for good,
    # so the segments of a capped run would add up; through malloc they reuse the same memory.
    options.enable_cpu_mem_arena = False
    tmp: tempfile.TemporaryDirectory[str] | None = None
    try:
        if model.ByteSize() < _PROTO_LIMIT:
            source: bytes | str = model.SerializeToString()
        else:
            tmp = tempfile.TemporaryDirectory(prefix="qpasses-calib-")
            source = os.path.join(tmp.name, "model.onnx")
            onnx.save(model, source, save_as_external_data=True, location="model.onnx.data")
        session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"],
                                       disabled_optimizers=_DISABLED_OPTIMIZERS)
        return session, tmp
    except Exception as exc:
        if tmp is not None:
            tmp.cleanup()
        raise ModelLoadError(f"onnxruntime cannot load the model for calibration: {exc}") from None


def calibration_session(model: onnx.ModelProto, intra_op_threads: int = 0) -> ort.InferenceSession:
    """A session configured as calibration's own (for references that must match it bit for bit)."""
    session, tmp = _session(model, intra_op_threads)
    if tmp is not None:  # onnxruntime has read the file by now
        tmp.cleanup()
    return session


# --- splitting a run: the graph's structure ----------------------------------------------------------------


def _subgraphs(node: onnx.NodeProto) -> Iterator[onnx.GraphProto]:
    for attr in node.attribute:
        if attr.HasField("g"):
            yield attr.g
        yield from attr.graphs


def _outer_references(graph: onnx.GraphProto) -> set[str]:
    """Names a subgraph reads from enclosing scopes."""
    defined = {vi.name for vi in graph.input} | {t.name for t in graph.initializer}
    defined |= {t.values.name for t in graph.sparse_initializer}
    refs: set[str] = set()
    for node in graph.node:
        refs.update(n for n in node.input if n)
        for sub in _subgraphs(node):
            refs |= _outer_references(sub)
        defined.update(node.output)
    return refs - defined


def _reads(node: onnx.NodeProto) -> list[str]:
    """Every value a node reads: its inputs and what its subgraphs take from the enclosing graph."""
    names = [n for n in node.input if n]
    for sub in _subgraphs(node):
        names.extend(sorted(_outer_references(sub) - set(names)))
    return list(dict.fromkeys(names))


def _elem_type(vi: onnx.ValueInfoProto) -> int | None:
    """The element type of a tensor value, 0 if unknown, None for non-tensors (sequences, maps...)."""
    kind = vi.type.WhichOneof("value")
    if kind is None:
        return 0
    return vi.type.tensor_type.elem_type if kind == "tensor_type" else None


def _static_shape(vi: onnx.ValueInfoProto) -> tuple[int, ...] | None:
    if vi.type.WhichOneof("value") != "tensor_type" or not vi.type.tensor_type.HasField("shape"):
        return None
    dims = vi.type.tensor_type.shape.dim
    if not all(d.HasField("dim_value") and d.dim_value >= 0 for d in dims):
        return None
    return tuple(d.dim_value for d in dims)


def _itemsize(elem_type: int | None) -> int:
    try:
        return np.dtype(helper.tensor_dtype_to_np_dtype(elem_type)).itemsize if elem_type else 4
    except (KeyError, TypeError):
        return 4  # unknown or sub-byte types: an estimate


def _shape_only(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model without the data of big initializers (they become typed graph inputs), for shape inference."""
    out = onnx.ModelProto()
    out.ir_version, out.producer_name = model.ir_version, model.producer_name
    out.opset_import.extend(model.opset_import)
    out.functions.extend(model.functions)
    g, src = out.graph, model.graph
    g.name = src.name
    g.node.extend(src.node)
    g.input.extend(src.input)
    g.output.extend(src.output)
    g.value_info.extend(src.value_info)
    listed = {vi.name for vi in src.input}
    for t in src.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL or len(t.raw_data) > _SHAPE_ONLY_BYTES:
            if t.name not in listed:
                g.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
        else:
            g.initializer.append(t)
    g.sparse_initializer.extend(src.sparse_initializer)
    return out


def _infer(model: onnx.ModelProto) -> dict[str, onnx.ValueInfoProto]:
    """Value infos of every typed value onnx shape inference finds (empty when it fails)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model, check_type=False, strict_mode=False, data_prop=True)
    except Exception:  # shape inference is only an estimate here; onnxruntime is asked instead
        return {}
    g = inferred.graph
    return {vi.name: vi for vi in itertools.chain(g.input, g.value_info, g.output)}


@dataclass(frozen=True)
class _Segment:
    """Nodes ``[start, stop)`` of ``_Structure.nodes`` as one session: what it reads, returns and frees."""

    start: int
    stop: int
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]  # the requested tensors it produces, then values later segments read
    requested: tuple[str, ...]
    keep: tuple[str, ...]  # values it produces that later segments read
    done: tuple[str, ...]  # values it reads that nothing after it reads


@dataclass(frozen=True)
class _Plan:
    """How one feed is run: ``rows`` rows per run (None: the feed whole), ``segments`` in order (None: one run)."""

    rows: int | None
    segments: tuple[_Segment, ...] | None


class _Structure:
    """The main graph in execution order, prepared for cutting into consecutive segments.

    Constant-only subexpressions (Transpose of a weight, shape arithmetic on initializers) are not
    cut points: each segment that reads one gets its own copy, so onnxruntime folds them as it
    does in the whole model instead of receiving them as runtime inputs.
    """

    def __init__(self, model: onnx.ModelProto, requested: Sequence[str]) -> None:
        g = model.graph
        self.model = model
        self.initializers = {t.name for t in g.initializer} | {t.values.name for t in g.sparse_initializer}
        wanted = set(requested)
        ordered = _topological(list(g.node), {vi.name for vi in g.input} | self.initializers)
        constant = set(self.initializers)
        self.static: dict[str, tuple[onnx.NodeProto, list[str]]] = {}  # output -> (node, reads)
        self.nodes: list[onnx.NodeProto] = []
        self.reads: list[list[str]] = []
        for node in ordered:
            reads = _reads(node)
            outputs = [o for o in node.output if o]
            if (all(r in constant for r in reads) and node.op_type not in _NONDETERMINISTIC
                    and not any(True for _ in _subgraphs(node)) and not wanted.intersection(outputs)):
                constant.update(outputs)
                for o in outputs:
                    self.static[o] = (node, reads)
                continue
            self.nodes.append(node)
            self.reads.append(reads)
        self.producer: dict[str, int] = {}
        self.last_read: dict[str, int] = {}
        for i, (node, reads) in enumerate(zip(self.nodes, self.reads, strict=True)):
            for o in node.output:
                if o:
                    self.producer[o] = i
            for r in reads:
                self.last_read[r] = i

    def static_closure(self, reads: Iterable[str]) -> list[onnx.NodeProto]:
        """Constant-only nodes the given reads depend on, in execution order."""
        seen: set[int] = set()
        out: list[onnx.NodeProto] = []

        def visit(name: str) -> None:
            entry = self.static.get(name)
            if entry is None or id(entry[0]) in seen:
                return
            seen.add(id(entry[0]))
            for r in entry[1]:
                visit(r)
            out.append(entry[0])

        for name in reads:
            visit(name)
        return out

    def cut(self, sizes: Mapping[str, int], requested: set[str], limit: int,
            non_tensors: set[str]) -> tuple[tuple[int, int], ...]:
        """Consecutive node ranges whose returned values (requested + read later) stay within ``limit`` bytes.

        Greedy in execution order, cutting only where every value that crosses the cut is requested:
        those are graph outputs of the whole model too, so onnxruntime fuses nothing across them
        there either, and each segment computes exactly what the whole model computes. A range that
        cannot end at such a cut within the limit (or a single node over it) grows to the next one.
        """
        n = len(self.nodes)
        last = self.last_read
        ending: dict[int, list[str]] = {}  # node -> values it is the last to read
        for name, i in last.items():
            ending.setdefault(i, []).append(name)
        # clean[c]: no unrequested value (and no sequence or map) crosses a cut before node c.
        clean = [True] * (n + 1)
        crossing = 0
        for c in range(1, n):
            i = c - 1
            crossing += sum(1 for o in self.nodes[i].output
                            if o and last.get(o, -1) > i and (o not in requested or o in non_tensors))
            crossing -= sum(1 for o in ending.get(i, ())
                            if self.producer.get(o, i) < i and (o not in requested or o in non_tensors))
            clean[c] = crossing == 0

        def returned(i: int, stop: int) -> int:
            """Bytes node ``i`` adds to a range ending before ``stop``."""
            return sum(sizes.get(o, 0) for o in self.nodes[i].output
                       if o and (o in requested or last.get(o, -1) >= stop))

        ranges: list[tuple[int, int]] = []
        start = 0
        while start < n:
            stop, cost = start + 1, returned(start, start + 1)
            best = stop if clean[stop] else None
            while stop < n:
                # [start, stop + 1): node ``stop`` joins; the values it is the last to read stop crossing.
                grown = cost + returned(stop, stop + 1) - sum(
                    sizes.get(o, 0) for o in ending.get(stop, ())
                    if o not in requested and start <= self.producer.get(o, -1) < stop)
                if grown > limit and best is not None:
                    break
                stop, cost = stop + 1, grown
                if clean[stop]:
                    best = stop
            stop = n if best is None else best
            ranges.append((start, stop))
            start = stop
        return tuple(ranges)


def _topological(nodes: list[onnx.NodeProto], available: set[str]) -> list[onnx.NodeProto]:
    """``nodes`` in an order where each reads only what is available or produced before it (stable)."""
    ready = set(available)
    pending = list(nodes)
    out: list[onnx.NodeProto] = []
    while pending:
        left: list[onnx.NodeProto] = []
        for node in pending:
            if all(r in ready for r in _reads(node)):
                out.append(node)
                ready.update(o for o in node.output if o)
            else:
                left.append(node)
        if len(left) == len(pending):  # reads something nobody produces: keep the file's order
            return out + left
        pending = left
    return out


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
        self._structure: _Structure | None = None
        self._sizes: dict[tuple, dict[str, int]] = {}
        self._plans: dict[tuple, _Plan] = {}
        self._segment_sessions: dict[tuple[int, int], ort.InferenceSession] = {}
        self._symbolic: dict[str, onnx.ValueInfoProto] | None = None
        self.runs = 0  # onnxruntime runs so far (for tests and benchmarks)
        if self._fetch and self.max_bytes_per_run is None:
            self._whole()

    def close(self) -> None:
        """Drop the sessions (and the temporary copies of a >2 GiB model)."""
        self._session = None
        self._segment_sessions.clear()
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
            self._session, tmp = _session(_with_outputs(self.model, self._fetch), self.intra_op_threads)
            if tmp is not None:
                self._tmps.append(tmp)
        return self._session

    def _run(self, session: ort.InferenceSession, names: Sequence[str], inputs: Mapping[str, np.ndarray],
             batch: int, where: Mapping[str, np.ndarray] | None = None,
             rows: tuple[int, int] | None = None) -> list[np.ndarray]:
        try:
            self.runs += 1
            return session.run(list(names), dict(inputs))
        except Exception as exc:  # onnxruntime's exception types share no useful base class
            raise _run_error(batch, inputs if where is None else where, exc, rows) from None

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
        plan = _Plan(None, None) if self.max_bytes_per_run is None else self._plan(inputs, batch)
        total = _rows(inputs, self.inputs) if plan.rows is not None else None
        step = plan.rows
        starts: Iterable[int | None] = [None] if total is None or step is None else range(0, total, step)
        for start in starts:
            part = inputs if start is None or step is None else {k: v[start:start + step] for k, v in inputs.items()}
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
                values = self._run(session, segment.outputs, {n: live[n] for n in segment.inputs}, batch, inputs,
                                   rows)
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

    def _plan(self, inputs: Mapping[str, np.ndarray], batch: int = 0) -> _Plan:
        """Rows per run and segments for a feed of these shapes (cached by shape)."""
        assert self.max_bytes_per_run is not None
        budget = self.max_bytes_per_run
        rows = _rows(inputs, self.inputs)
        # A feed that cannot be split is sized whole; otherwise per row, and every row count shares it.
        key = tuple((k, v.shape if rows is None else v.shape[1:], v.dtype.str) for k, v in inputs.items())
        plan_key = (key, rows is None)
        cached = self._plans.get(plan_key)
        if cached is not None:
            return cached
        unit = inputs if rows is None else {k: v[:1] for k, v in inputs.items()}
        sizes = self._sizes.get(key)
        if sizes is None:
            sizes = self._sizes[key] = self._estimate(unit, inputs, batch)
        # One row per run, whatever the batch size or the cap: onnxruntime picks some kernels by
        # batch size (MLAS convolutions with small outputs), with another rounding.
        per_unit = sum(sizes.get(n, 0) for n in self._fetch)
        rows_per_run = None if rows is None else 1
        plan = _Plan(rows_per_run, None if per_unit <= budget else self._segments(sizes, budget))
        self._plans[plan_key] = plan
        return plan

    def _structure_of(self) -> _Structure:
        if self._structure is None:
            self._structure = _Structure(self.model, self._fetch)
        return self._structure

    def _estimate(self, unit: Mapping[str, np.ndarray], inputs: Mapping[str, np.ndarray], batch: int) -> dict[str, int]:
        """Bytes of every value the main graph's nodes produce, for ``unit`` (one row of ``inputs``, or all of it)."""
        structure = self._structure_of()
        shaped = _shape_only(self.model)
        for vi in shaped.graph.input:
            value = unit.get(vi.name)
            if value is not None:
                vi.CopyFrom(helper.make_tensor_value_info(vi.name, helper.np_dtype_to_tensor_dtype(value.dtype),
                                                          list(value.shape)))
        infos = _infer(shaped)
        sizes: dict[str, int] = {}
        unknown: list[str] = []
        for node in structure.nodes:
            for name in node.output:
                if not name:
                    continue
                vi = infos.get(name)
                elem = None if vi is None else _elem_type(vi)
                shape = None if vi is None else _static_shape(vi)
                if vi is not None and elem is None:
                    sizes[name] = 0  # sequences and maps are never requested and never cross a cut
                elif shape is None:
                    unknown.append(name)
                else:
                    sizes[name] = math.prod(shape) * _itemsize(elem)
        if unknown:
            sizes.update(self._measure(unknown, unit, infos, inputs, batch))
        return sizes

    def _measure(self, names: list[str], unit: Mapping[str, np.ndarray], infos: Mapping[str, onnx.ValueInfoProto],
                 inputs: Mapping[str, np.ndarray], batch: int) -> dict[str, int]:
        """Bytes of ``names`` from onnxruntime: one run on ``unit`` that returns only their shapes."""
        probe = onnx.ModelProto()
        probe.CopyFrom(self.model)
        del probe.graph.output[:]
        for i, name in enumerate(names):
            shape_of = f"__qpasses_shape_{i}"
            probe.graph.node.append(helper.make_node("Shape", [name], [shape_of], name=shape_of))
            probe.graph.output.append(helper.make_tensor_value_info(shape_of, onnx.TensorProto.INT64, None))
        try:
            session, tmp = _session(probe, self.intra_op_threads)
        except ModelLoadError as exc:  # e.g. a value that is not a tensor after all: then it is not capped
            warnings.warn(f"calibration: cannot measure the size of {len(names)} tensors ({exc}); "
                          "max_bytes_per_run does not count them", RuntimeWarning, stacklevel=2)
            return dict.fromkeys(names, 0)
        del probe
        try:
            shapes = session.run(None, dict(unit))
        except Exception as exc:  # the error a run would give: on the whole batch if that fails too
            if unit is not inputs:
                try:
                    session.run(None, dict(inputs))
                except Exception as whole:  # noqa: BLE001
                    raise _run_error(batch, inputs, whole, None) from None
            raise _run_error(batch, inputs, exc, None if unit is inputs else (0, 1)) from None
        finally:
            del session
            if tmp is not None:
                tmp.cleanup()
        out: dict[str, int] = {}
        for name, shape in zip(names, shapes, strict=True):
            vi = infos.get(name)
            out[name] = int(np.prod(shape)) * _itemsize(None if vi is None else _elem_type(vi))
        return out

    def _segments(self, sizes: Mapping[str, int], budget: int) -> tuple[_Segment, ...]:
        structure = self._structure_of()
        requested = set(self._fetch)
        infos = self._symbolic_infos()
        non_tensors = {n for n, vi in infos.items() if _elem_type(vi) is None}
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
            reads += [r for node in structure.static_closure(reads) for r in _reads(node)]
            inputs = [r for r in dict.fromkeys(reads)
                      if r not in inside and r not in structure.initializers and r not in structure.static]
            later = [o for o in produced if last_segment.get(o, -1) > k]
            mine = [o for o in produced if o in requested]
            done = [r for r in inputs if last_segment.get(r, -1) <= k]
            segments.append(_Segment(start, stop, tuple(inputs), tuple(dict.fromkeys(mine + later)),
                                     tuple(mine), tuple(later), tuple(done)))
        return tuple(segments)

    def _symbolic_infos(self) -> dict[str, onnx.ValueInfoProto]:
        """Types and (symbolic) shapes of the model's values, as onnxruntime sees them in the whole model."""
        if self._symbolic is None:
            self._symbolic = _infer(_shape_only(self.model))
        return self._symbolic

    def _segment_session(self, segment: _Segment, live: Mapping[str, np.ndarray]) -> ort.InferenceSession:
        key = (segment.start, segment.stop)
        session = self._segment_sessions.get(key)
        if session is None:
            model = self._segment_model(segment, live)
            session, tmp = _session(model, self.intra_op_threads)
            del model
            if tmp is not None:
                self._tmps.append(tmp)
            self._segment_sessions[key] = session
        return session

    def _segment_model(self, segment: _Segment, live: Mapping[str, np.ndarray]) -> onnx.ModelProto:
        structure = self._structure_of()
        src = self.model.graph
        infos = self._symbolic_infos()
        nodes = structure.nodes[segment.start:segment.stop]
        reads = [r for i in range(segment.start, segment.stop) for r in structure.reads[i]]
        static = structure.static_closure(reads)
        used = set(reads) | {r for node in static for r in _reads(node)}
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
            if vi is not None and _elem_type(vi):
                g.input.append(vi)
            else:
                g.input.append(helper.make_tensor_value_info(
                    name, helper.np_dtype_to_tensor_dtype(value.dtype), [None] * value.ndim))
        for name in segment.outputs:
            vi = infos.get(name)
            g.output.append(vi if vi is not None and _elem_type(vi) else onnx.ValueInfoProto(name=name))
        return model


def _run_error(batch: int, inputs: Mapping[str, np.ndarray], exc: Exception,
               rows: tuple[int, int] | None) -> CalibrationDataError:
    shapes = ", ".join(f"'{k}' {v.dtype} {list(v.shape)}" for k, v in inputs.items())
    where = "" if rows is None else (f" (run on rows {rows[0]}:{rows[1]} to stay within max_bytes_per_run; "
                                     "a model that needs whole batches calibrates with max_bytes_per_run=0)")
    return CalibrationDataError(f"batch {batch}: onnxruntime failed on inputs {shapes}{where}: {exc}")


def _rows(inputs: Mapping[str, np.ndarray], specs: Sequence[InputSpec]) -> int | None:
    """Rows of a feed that may be split along axis 0 (every input's batch dim is dynamic), else None."""
    counts = set()
    for spec in specs:
        value = inputs[spec.name]
        if not spec.shape or isinstance(spec.shape[0], int) or value.ndim == 0:
            return None
        counts.add(value.shape[0])
    return counts.pop() if len(counts) == 1 else None


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


def capture_tensors(model: onnx.ModelProto, names: Sequence[str], feeds: Iterable[Feed]) -> dict[str, list[np.ndarray]]:
    """Per-batch values of ``names`` (duplicates allowed) from one session over ``feeds``, kept in memory:
    for passes that revisit a layer's captured inputs (SeqMSE, AdaRound, AdaScale)."""
    out: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for values in iterate_tensors(model, list(dict.fromkeys(names)), feeds):
        for n in out:
            out[n].append(values[n])
    return out


def iterate_chunks(
    model: onnx.ModelProto, tensors: Sequence[str], feeds: Iterable[Feed],
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


# --- statistics ----------------------------------------------------------------------------------------


def _range(name: str, value: np.ndarray, batch: int) -> tuple[float, float]:
    """Exact min/max in the value's own dtype (no float64 copy); NaN/inf are errors, as in the observers."""
    lo, hi = value.min(), value.max()
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise CalibrationDataError(f"tensor '{name}' has NaN or infinite values in batch {batch}")
    return float(lo), float(hi)


# Smallest bin exponent: 2^-1000 still scales any finite float64 to a finite number below 2^61.
_MIN_EXPONENT = -1000
# Bins are at least 2^-60 of the largest magnitude (only binding for a range of one value).
_RELATIVE_EXPONENT = 60


def _grid_exponent(lo: float, hi: float, capacity: int) -> int:
    """Smallest ``e`` whose bins of width ``2^e`` (edges at multiples of ``2^e``) span [lo, hi] in ``capacity`` bins.

    It depends only on ``lo`` and ``hi`` and never decreases as the range widens, which is what
    makes the histogram independent of how the values are batched.
    """
    magnitude = max(abs(lo), abs(hi))
    e = _MIN_EXPONENT if magnitude == 0.0 else max(math.frexp(magnitude)[1] - _RELATIVE_EXPONENT, _MIN_EXPONENT)
    if hi > lo:  # at 2^e <= (hi - lo) / (capacity + 1) the range needs more bins: start just under that
        e = max(e, math.frexp((hi - lo) / (capacity + 1))[1] - 3)
    while math.floor(math.ldexp(hi, -e)) - math.floor(math.ldexp(lo, -e)) >= capacity:
        e += 1
    return e


@dataclass(eq=False)
class _HistogramScratch:
    """Reused buffers of the chunked histogram update (one per worker; never shared between threads)."""

    values: np.ndarray = field(default_factory=lambda: np.empty(_CHUNK, np.float64))
    index: np.ndarray = field(default_factory=lambda: np.empty(_CHUNK, np.intp))


@dataclass(eq=False)
class _GridHistogram:
    """Exact counts of every value seen on a canonical grid, so the result does not depend on batching.

    Bin ``k`` holds the values with ``floor(x / 2^e) == k``, where ``e`` is ``_grid_exponent`` of the
    overall min/max with room for ``bins`` bins: more than ``bins / 2`` and at most ``bins`` bins
    cover [min, max] (the modes' search then costs no more than on a ``bins``-bin histogram).
    ``x / 2^e`` is exact in float64 and so is its floor, so every value lands in its exact bin; when the range grows,
    ``e`` only grows and each old bin falls entirely into one new bin. After any sequence of
    updates the counts are those of the one-shot histogram of all the values on the final grid:
    identical whatever the batch size, the cap per run or the order of the batches.
    """

    bins: int
    exponent: int = 0
    base: int = 0  # grid index of counts[0]
    counts: np.ndarray | None = None
    min: float = math.inf
    max: float = -math.inf

    @property
    def capacity(self) -> int:
        return self.bins

    def update(self, x: np.ndarray, lo: float, hi: float, scratch: _HistogramScratch) -> None:
        lo, hi = min(self.min, lo), max(self.max, hi)
        e = _grid_exponent(lo, hi, self.capacity)
        base = math.floor(math.ldexp(lo, -e))
        if self.counts is None:
            self.counts = np.zeros(self.capacity, np.int64)
        elif (e, base) != (self.exponent, self.base):
            filled = np.flatnonzero(self.counts)
            moved = ((filled + self.base) >> (e - self.exponent)) - base  # floor division by 2^(e - old e)
            merged = np.zeros(self.capacity, np.int64)
            np.add.at(merged, moved, self.counts[filled])
            self.counts = merged
        self.exponent, self.base, self.min, self.max = e, base, lo, hi
        scale, counts = math.ldexp(1.0, -e), self.counts
        flat = x.reshape(-1)
        for start in range(0, flat.size, _CHUNK):
            chunk = flat[start:start + _CHUNK]
            q = scratch.values[:chunk.size]
            np.multiply(chunk, scale, out=q, dtype=np.float64)  # exact: a power of two, far from overflow
            np.floor(q, out=q)
            np.subtract(q, base, out=q)  # exact: integers whose difference is below the capacity
            index = scratch.index[:chunk.size]
            np.copyto(index, q, casting="unsafe")
            counts += np.bincount(index, minlength=self.capacity)

    def observer(self) -> HistogramObserver:
        """A HistogramObserver holding these counts (trimmed to the occupied bins), for ``range_search.compute``."""
        assert self.counts is not None
        used = math.floor(math.ldexp(self.max, -self.exponent)) - self.base + 1
        obs = HistogramObserver(max(used, 2))
        obs._lo, obs._width = math.ldexp(float(self.base), self.exponent), math.ldexp(1.0, self.exponent)
        obs._counts = self.counts[:obs.bins].copy()
        obs._min, obs._max = self.min, self.max
        return obs


@dataclass(eq=False)
class _Collector:
    """Running ranges (and histograms) by tensor name, for tensors that have shown values.

    The ranges and histograms do not depend on how the values are split into pieces (rows, runs,
    batches): min/max trivially, histograms by construction (``_GridHistogram``). Channel means sum
    in float64, so their last bits do.
    """

    histogram: bool
    bins: int
    ranges: dict[str, tuple[float, float]] = field(default_factory=dict)
    histograms: dict[str, _GridHistogram] = field(default_factory=dict)
    scratch: _HistogramScratch = field(default_factory=_HistogramScratch)
    ranged: frozenset[str] = frozenset()
    means: dict[str, ChannelMeans] = field(default_factory=dict)

    def observe(self, values: dict[str, np.ndarray], batch: int) -> None:
        for name, value in values.items():
            if name in self.means:
                self.means[name].update(value)
            if value.size == 0 or name not in self.ranged:
                continue
            lo, hi = _range(name, value, batch)
            seen = self.ranges.get(name)
            self.ranges[name] = (lo, hi) if seen is None else (min(seen[0], lo), max(seen[1], hi))
            if self.histogram:
                hist = self.histograms.get(name)
                if hist is None:
                    hist = self.histograms[name] = _GridHistogram(self.bins)
                hist.update(value, lo, hi, self.scratch)

    def observers(self) -> dict[str, Observer]:
        if self.histogram:
            return {name: hist.observer() for name, hist in self.histograms.items()}
        out: dict[str, Observer] = {}
        for name, (lo, hi) in self.ranges.items():
            # A per-tensor MinMaxObserver keeps only min and max, so one update with the overall
            # range is exact; per batch it would cost a float64 copy of every activation.
            obs = out[name] = MinMaxObserver()
            obs.update(np.array([lo, hi]))
        return out


def collect_statistics(
    model: onnx.ModelProto,
    tensors: Sequence[str],
    feeds: Iterable[Feed],
    *,
    histogram: bool = False,
    progress: bool = True,
    num_batches: int | None = None,
    bins: int = DEFAULT_BINS,
    overlap: bool = True,
    channel_means: dict[str, ChannelMeans] | None = None,
    max_bytes_per_run: int | None = DEFAULT_MAX_BYTES_PER_RUN,
) -> dict[str, Observer]:
    """Per-tensor observers over all batches of ``feeds`` (dicts of input name -> batch array).

    ``histogram`` selects HistogramObserver (for enhanced / percentile modes) over MinMaxObserver;
    its grid is canonical (``_GridHistogram``): more than ``bins / 2`` and at most ``bins`` bins span
    the range. ``num_batches`` caps how many batches are read (and sizes the progress bar, on stderr).
    ``overlap`` computes statistics in a worker thread while onnxruntime runs the next piece.
    ``max_bytes_per_run`` caps the bytes of the tensors one onnxruntime run returns (one row per run,
    and consecutive segments of the model when a row is over it); the observers depend neither on it
    nor on the batch size. None: one run per batch, as before the cap (memory grows with the batch,
    and the values may depend on the batch size in the last bit). Tensors that never showed a value (unknown, constant,
    always empty) are absent from the result; ``unavailable_tensors`` tells why for the first two.
    ``channel_means`` (tensor -> ChannelMeans) are updated in place in the same pass over the data
    (bias correction uses them).
    """
    total = operator.length_hint(feeds) or None  # CalibrationData and lists know their length
    if num_batches is not None:
        feeds = itertools.islice(feeds, num_batches)
        total = num_batches if total is None else min(total, num_batches)
    means = channel_means or {}
    collector = _Collector(histogram, bins, ranged=frozenset(tensors), means=means)
    bar = tqdm(total=total, unit="batch", desc="calibrating", file=sys.stderr, disable=not progress, leave=False)
    stream = iterate_chunks(model, list(dict.fromkeys([*tensors, *means])), feeds, max_bytes_per_run)
    done = 0  # batches all of whose pieces have been observed

    def finished(batch: int) -> None:
        nonlocal done
        if batch > done:
            bar.update(batch - done)
            done = batch

    with closing(stream), bar:
        if not overlap:
            for batch, values in stream:
                finished(batch)
                collector.observe(values, batch)
                del values
        else:
            with ThreadPoolExecutor(max_workers=1, thread_name_prefix="qpasses-calibration") as worker:
                pending: Future[None] | None = None
                for batch, values in stream:
                    if pending is not None:
                        pending.result()  # at most one piece waits: memory stays flat; worker errors surface here
                        finished(batch)
                    pending = worker.submit(collector.observe, values, batch)
                    del values
                if pending is not None:
                    pending.result()
        if total is not None and bar.n < total:
            bar.update(total - bar.n)
        return collector.observers()
