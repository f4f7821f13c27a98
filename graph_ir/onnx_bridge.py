"""Lift ONNX into the IR and lower it back, losslessly.

The IR keeps references to the caller's protos (no copy on load) and never mutates
them in place; lowering copies into a fresh ModelProto. Models whose weights exceed
the 2 GB protobuf limit are saved with external data.
"""

from __future__ import annotations

import functools
import gc
import os
import shutil
import tempfile
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError

from graph_ir.elements import Op, Slots
from graph_ir.errors import GraphError, ModelLoadError
from graph_ir.graph import Graph

_EXTERNAL_THRESHOLD = 1_800_000_000  # bytes of weights beyond which we must use external data
_GRAPH_SHELL_FIELDS = ("name", "doc_string", "sparse_initializer", "quantization_annotation", "metadata_props")
_NODE_EXTRA_FIELDS = frozenset({"doc_string", "overload", "metadata_props", "device_configurations"})


def _gc_paused(fn):
    """Run without the cyclic GC: bulk conversion allocates many objects and frees none."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        enabled = gc.isenabled()
        gc.disable()
        try:
            return fn(*args, **kwargs)
        finally:
            if enabled:
                gc.enable()

    return wrapper


def read_model(source: str | os.PathLike | onnx.ModelProto) -> onnx.ModelProto:
    """Read a model file (with its external data) or pass a ModelProto through."""
    if isinstance(source, onnx.ModelProto):
        return source
    path = Path(source)
    if not path.exists():
        raise ModelLoadError(f"model file not found: {path}")
    if not path.is_file():
        raise ModelLoadError(f"not a file: {path}")
    try:
        model = onnx.load(str(path), load_external_data=False)
        if _has_external_data(model):
            onnx.load_external_data_for_model(model, str(path.parent))
    except (DecodeError, RuntimeError, ValueError, OSError, onnx.onnx_cpp2py_export.checker.ValidationError) as exc:
        raise ModelLoadError(f"{path} is not a readable ONNX model ({type(exc).__name__}: {exc})") from None
    if not model.HasField("graph") or (not model.graph.node and not model.graph.output):
        raise ModelLoadError(f"{path} is not an ONNX model (no graph found)")
    return model


def _has_external_data(model: onnx.ModelProto) -> bool:
    # onnx.load's own scan walks every attribute of every node: 4x slower than the parse itself.
    external = onnx.TensorProto.EXTERNAL
    if any(t.data_location == external for t in model.graph.initializer):
        return True
    for node in model.graph.node:
        if node.op_type == "Constant" or node.op_type in ("If", "Loop", "Scan"):
            for a in node.attribute:
                if (a.t.data_location == external) or a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS):
                    return True  # subgraphs: let onnx do the full recursive scan
    return False


def load(source: str | os.PathLike | onnx.ModelProto) -> Graph:
    """Load a model file or ModelProto into the IR."""
    return from_onnx(read_model(source))


@_gc_paused
def from_onnx(model: onnx.ModelProto) -> Graph:
    """Lift a ModelProto. The proto is referenced, never modified."""
    shell = onnx.ModelProto()
    for field, value in model.ListFields():
        if field.name != "graph":
            _copy_field(shell, field.name, value)
    src = model.graph
    sg = shell.graph
    for field, value in src.ListFields():
        if field.name in _GRAPH_SHELL_FIELDS:
            _copy_field(sg, field.name, value)

    g = Graph(shell)
    output_names = {vi.name for vi in src.output} if src.value_info else ()
    for init in src.initializer:
        g.add_tensor(init.name).initializer = init
    for vi in src.input:
        g.add_tensor(vi.name).value_info = vi
        g.inputs.append(vi.name)
    for vi in src.value_info:
        t = g.add_tensor(vi.name)
        if t.initializer is None and t.value_info is None and vi.name not in output_names:
            t.value_info = vi
        else:  # an input's, output's or initializer's entry: kept beside the tensor's own
            g._value_info_extra[vi.name] = (vi, t)
    ops = []
    ids = g._ids
    for node in src.node:
        fields = {f.name: v for f, v in node.ListFields()}
        op = Op(
            next(ids),
            fields.get("op_type", ""),
            fields.get("name", ""),
            fields.get("domain", ""),
            attribute_protos=fields.get("attribute", ()),
        )
        op._inputs = Slots(fields.get("input", ()))
        op._outputs = Slots(fields.get("output", ()))
        if len(fields) > 6 or not _NODE_EXTRA_FIELDS.isdisjoint(fields) or fields.get("domain") == "":
            extra = onnx.NodeProto()
            for name in _NODE_EXTRA_FIELDS.intersection(fields):
                _copy_field(extra, name, fields[name])
            if fields.get("domain") == "":
                extra.domain = ""  # proto2: an explicitly set '' is serialized (keras2onnx writes it)
            op.extra = extra
        ops.append(op)
    g._bulk_insert(ops)
    for vi in src.output:
        g.add_tensor(vi.name).value_info = vi
        g.outputs.append(vi.name)
    _check_dangling(g, ops)
    if g._value_info_extra:  # anchor each entry to what it describes, as loaded
        g._value_info_extra = {
            name: (vi, t.initializer if t.initializer is not None else t.value_info)
            for name, (vi, t) in g._value_info_extra.items()
        }
    g.version = 0
    return g


def _check_dangling(g: Graph, ops: list[Op]) -> None:
    """Every input an op reads must come from somewhere (onnxruntime refuses the model otherwise)."""
    for op in ops:
        for name in op.inputs:
            if name and g.producer(name) is None and name not in g.inputs and g.tensors[name].initializer is None:
                who = f"{op.op_type} '{op.name}'" if op.name else f"an unnamed {op.op_type}"
                raise ModelLoadError(
                    f"model is invalid: {who} reads '{name}', which no node, graph input or initializer provides"
                )


def _copy_field(msg, name: str, value) -> None:
    target = getattr(msg, name)
    if isinstance(value, (str, bytes, int, float)):
        setattr(msg, name, value)
    elif hasattr(target, "extend"):
        target.extend(value)
    else:
        target.CopyFrom(value)


@_gc_paused
def to_onnx(graph: Graph) -> onnx.ModelProto:
    """Lower the IR to a fresh ModelProto (nodes in the cached topological order)."""
    model = onnx.ModelProto()
    model.CopyFrom(graph.shell)
    g = model.graph
    tensors = graph.tensors
    for name in graph.inputs:
        g.input.append(_value_info(graph, name))
    io = set(graph.inputs) | set(graph.outputs)
    for t in tensors.values():
        if t.initializer is not None:
            g.initializer.append(t.initializer)
            if model.ir_version < 4 and t.name not in io:
                # IR < 4: every initializer is also a graph input (a default value); passes add new ones.
                g.input.append(
                    onnx.helper.make_tensor_value_info(t.name, t.initializer.data_type, list(t.initializer.dims))
                )
    for op in graph.topological_order():
        n = g.node.add()
        n.op_type = op.op_type
        if op.name:
            n.name = op.name
        if op.domain:
            n.domain = op.domain
        n.input.extend(op.inputs)
        n.output.extend(op.outputs)
        n.attribute.extend(op.attribute_protos())
        if op.extra is not None:
            n.MergeFrom(op.extra)
            if op.domain:  # the extra may hold an explicit '' domain: a pass's new domain wins
                n.domain = op.domain
    extra = graph._value_info_extra
    for t in tensors.values():
        vi = t.value_info
        if t.initializer is None and t.name not in io:
            if vi is not None and vi.HasField("type") and (graph.producer(t.name) is not None or graph.uses(t.name)):
                g.value_info.append(vi)
        elif extra and t.name in extra:
            entry, anchor = extra[t.name]
            if anchor is (t.initializer if t.initializer is not None else vi):
                g.value_info.append(entry)
    for name in graph.outputs:
        g.output.append(_value_info(graph, name))
    return model


def _value_info(graph: Graph, name: str) -> onnx.ValueInfoProto:
    t = graph.tensors.get(name)
    if t is None:
        raise GraphError(f"graph input/output {name!r} has no tensor")
    if t.value_info is not None:
        return t.value_info
    vi = onnx.ValueInfoProto()
    vi.name = name
    if t.dtype:
        vi.type.tensor_type.elem_type = t.dtype
    return vi


def weights_nbytes(model: onnx.ModelProto) -> int:
    return sum(len(t.raw_data) or t.ByteSize() for t in model.graph.initializer)


def save(
    graph: Graph | onnx.ModelProto,
    path: str | os.PathLike,
    *,
    external_data: bool | None = None,
) -> Path:
    """Write atomically. ``external_data=None`` picks external data when weights exceed ~1.8 GB.

    The model (and its ``<name>.data`` file) is written in a temporary folder beside the
    target and renamed into place, so a failed save leaves no partial file.
    """
    model = graph if isinstance(graph, onnx.ModelProto) else to_onnx(graph)
    path = Path(path)
    if external_data is None:
        external_data = weights_nbytes(model) > _EXTERNAL_THRESHOLD
    path.parent.mkdir(parents=True, exist_ok=True)
    tmpdir = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        data_name = f"{path.name}.data"
        if external_data:
            onnx.save_model(
                model,
                str(tmpdir / path.name),
                save_as_external_data=True,
                all_tensors_to_one_file=True,
                location=data_name,
                size_threshold=1024,
            )
        else:
            onnx.save_model(model, str(tmpdir / path.name))
        if (tmpdir / data_name).exists():
            os.replace(tmpdir / data_name, path.parent / data_name)
        os.replace(tmpdir / path.name, path)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    return path
