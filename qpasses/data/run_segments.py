"""Cutting one calibration run into consecutive segments when one sample's requested tensors exceed the
byte cap: the graph's structure, per-tensor bytes from shape inference, and the cut points (only between
requested tensors, so every node still runs once per row and each segment computes bit for bit what the
whole model computes)."""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

# Initializers above this many bytes are left out of the copy that shape inference sees.
_SHAPE_ONLY_BYTES = 1024
# Ops whose outputs are not a function of their inputs: never duplicated into several segments.
_NONDETERMINISTIC = frozenset(
    {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli"}
)

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


def node_reads(node: onnx.NodeProto) -> list[str]:
    """Every value a node reads: its inputs and what its subgraphs take from the enclosing graph."""
    names = [n for n in node.input if n]
    for sub in _subgraphs(node):
        names.extend(sorted(_outer_references(sub) - set(names)))
    return list(dict.fromkeys(names))


def value_elem_type(vi: onnx.ValueInfoProto) -> int | None:
    """The element type of a tensor value, 0 if unknown, None for non-tensors (sequences, maps...)."""
    kind = vi.type.WhichOneof("value")
    if kind is None:
        return 0
    return vi.type.tensor_type.elem_type if kind == "tensor_type" else None


def value_static_shape(vi: onnx.ValueInfoProto) -> tuple[int, ...] | None:
    if vi.type.WhichOneof("value") != "tensor_type" or not vi.type.tensor_type.HasField("shape"):
        return None
    dims = vi.type.tensor_type.shape.dim
    if not all(d.HasField("dim_value") and d.dim_value >= 0 for d in dims):
        return None
    return tuple(d.dim_value for d in dims)


def dtype_itemsize(elem_type: int | None) -> int:
    try:
        return np.dtype(helper.tensor_dtype_to_np_dtype(elem_type)).itemsize if elem_type else 4
    except (KeyError, TypeError):
        return 4  # unknown or sub-byte types: an estimate


def shape_only_model(model: onnx.ModelProto) -> onnx.ModelProto:
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


def infer_value_infos(model: onnx.ModelProto) -> dict[str, onnx.ValueInfoProto]:
    """Value infos of every typed value onnx shape inference finds (empty when it fails)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model, check_type=False, strict_mode=False, data_prop=True)
    except Exception:  # shape inference is only an estimate here; onnxruntime is asked instead
        return {}
    g = inferred.graph
    return {vi.name: vi for vi in itertools.chain(g.input, g.value_info, g.output)}


@dataclass(frozen=True)
class Segment:
    """Nodes ``[start, stop)`` of ``GraphStructure.nodes`` as one session: what it reads, returns and frees."""

    start: int
    stop: int
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]  # the requested tensors it produces, then values later segments read
    requested: tuple[str, ...]
    keep: tuple[str, ...]  # values it produces that later segments read
    done: tuple[str, ...]  # values it reads that nothing after it reads


@dataclass(frozen=True)
class SegmentPlan:
    """How one feed is run: ``rows`` rows per run (None: the feed whole), ``segments`` in order (None: one run)."""

    rows: int | None
    segments: tuple[Segment, ...] | None


class GraphStructure:
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
            reads = node_reads(node)
            outputs = [o for o in node.output if o]
            if (
                all(r in constant for r in reads)
                and node.op_type not in _NONDETERMINISTIC
                and not any(True for _ in _subgraphs(node))
                and not wanted.intersection(outputs)
            ):
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

    def cut(
        self, sizes: Mapping[str, int], requested: set[str], limit: int, non_tensors: set[str]
    ) -> tuple[tuple[int, int], ...]:
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
            crossing += sum(
                1
                for o in self.nodes[i].output
                if o and last.get(o, -1) > i and (o not in requested or o in non_tensors)
            )
            crossing -= sum(
                1 for o in ending.get(i, ()) if self.producer.get(o, i) < i and (o not in requested or o in non_tensors)
            )
            clean[c] = crossing == 0

        def returned(i: int, stop: int) -> int:
            """Bytes node ``i`` adds to a range ending before ``stop``."""
            return sum(
                sizes.get(o, 0) for o in self.nodes[i].output if o and (o in requested or last.get(o, -1) >= stop)
            )

        ranges: list[tuple[int, int]] = []
        start = 0
        while start < n:
            stop, cost = start + 1, returned(start, start + 1)
            best = stop if clean[stop] else None
            while stop < n:
                # [start, stop + 1): node ``stop`` joins; the values it is the last to read stop crossing.
                grown = (
                    cost
                    + returned(stop, stop + 1)
                    - sum(
                        sizes.get(o, 0)
                        for o in ending.get(stop, ())
                        if o not in requested and start <= self.producer.get(o, -1) < stop
                    )
                )
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
            if all(r in ready for r in node_reads(node)):
                out.append(node)
                ready.update(o for o in node.output if o)
            else:
                left.append(node)
        if len(left) == len(pending):  # reads something nobody produces: keep the file's order
            return out + left
        pending = left
    return out
