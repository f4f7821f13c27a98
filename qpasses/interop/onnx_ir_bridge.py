"""Interop with ``onnx_ir`` (the IR of onnxscript and PyTorch's ONNX exporter).

An onnxscript-based compiler holds an ``onnx_ir.Model``; these two functions let it run qpasses
passes on it and take the result (and the quantization annotations) back as an ``onnx_ir.Model``.

The route is the ONNX proto, on purpose: both IRs round-trip it losslessly (initializers,
attributes, value_info, opset imports, metadata, functions, subgraphs), so nothing has to be
mapped field by field and neither side can drift from the other. It costs one copy of the weights
per crossing, the same as ``graph_ir.to_onnx``: ``onnx_ir`` serializes each initializer once into
the proto, which ``graph_ir.from_onnx`` then references without copying; the other way,
``graph_ir.to_onnx`` copies once and ``onnx_ir`` wraps the resulting protos without copying. No
crossing copies a weight twice. Weights ``onnx_ir`` holds as external data are read in, so the
IR never points at a file it does not know the folder of.

Annotations cross too, on the top-level graph's values: a tensor's ``encoding`` (an
``Encoding``), ``precision`` and ``meta`` go to the ``onnx_ir`` value's ``meta`` as objects
(``meta["qpasses.encoding"]`` ...) and, where they are JSON-able, to its ``metadata_props`` as JSON
(``metadata_props["qpasses.encoding"]``), which ``onnx_ir.save`` writes to the file. Coming back,
``meta`` is read first and ``metadata_props`` otherwise, and the ``qpasses.*`` props are taken off
the value_info so the IR keeps its annotations in one place. Anything else in ``onnx_ir``'s
in-memory ``meta`` is not part of ONNX and is not carried.

``onnx_ir`` is an optional dependency (``pip install 'qpasses[onnx-ir]'``), imported on first use.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import onnx

from graph_ir.graph import Graph
from graph_ir.onnx_bridge import from_onnx, to_onnx
from qpasses.core.errors import QPassesError
from qpasses.quant.encodings import Encoding
from qpasses.quant.precision_type import Precision

if TYPE_CHECKING:
    import onnx_ir

ENCODING_KEY = "qpasses.encoding"
PRECISION_KEY = "qpasses.precision"
META_KEY = "qpasses.meta"
_KEYS = (ENCODING_KEY, PRECISION_KEY, META_KEY)


class OnnxIrMissingError(QPassesError, ImportError):
    """The optional ``onnx-ir`` package is not installed."""


def _onnx_ir() -> Any:
    try:
        import onnx_ir
    except ImportError as exc:
        raise OnnxIrMissingError(
            "the onnx_ir bridge needs the onnx-ir package: pip install 'qpasses[onnx-ir]'"
        ) from exc
    return onnx_ir


def from_onnx_ir(model: onnx_ir.Model) -> Graph:
    """Lift an ``onnx_ir.Model`` into the IR (the model is not modified)."""
    ir = _onnx_ir()
    if not isinstance(model, ir.Model):
        raise QPassesError(f"from_onnx_ir expects an onnx_ir.Model, got {type(model).__name__}")
    values = dict(_top_level_values(model.graph))
    proto = ir.serde.serialize_model(model)
    _inline_external_data(proto, values)
    _strip_annotation_props(proto.graph)
    graph = from_onnx(proto)
    for name, value in values.items():
        t = graph.tensors.get(name)
        if t is not None:
            _read_annotations(value, t)
    return graph


def to_onnx_ir(graph: Graph) -> onnx_ir.Model:
    """Lower the IR to a fresh ``onnx_ir.Model`` carrying the tensors' annotations."""
    ir = _onnx_ir()
    model = ir.serde.deserialize_model(to_onnx(graph))
    for name, value in _top_level_values(model.graph):
        t = graph.tensors.get(name)
        if t is not None:
            _write_annotations(t, value)
    return model


# --- values ------------------------------------------------------------------------------------------


def _top_level_values(g: onnx_ir.Graph) -> Iterator[tuple[str, onnx_ir.Value]]:
    for v in g.inputs:
        yield v.name or "", v
    for v in g.initializers.values():
        yield v.name or "", v
    for node in g:
        for v in node.outputs:
            if v.name:
                yield v.name, v


def _inline_external_data(proto: onnx.ModelProto, values: dict[str, onnx_ir.Value]) -> None:
    """Replace external-data initializers by their bytes (the IR has no base folder to resolve them)."""
    for init in proto.graph.initializer:
        if init.data_location != onnx.TensorProto.EXTERNAL:
            continue
        tensor = values[init.name].const_value
        if tensor is None:  # pragma: no cover - onnx_ir serializes only initializers with a value
            raise QPassesError(f"initializer {init.name!r} has no value")
        init.raw_data = tensor.tobytes()
        del init.external_data[:]
        init.data_location = onnx.TensorProto.DEFAULT


def _strip_annotation_props(g: onnx.GraphProto) -> None:
    """Drop ``qpasses.*`` value props (they become tensor slots), then the value_infos that say nothing:
    empty ones, and those repeating an initializer's own type and shape (``onnx_ir`` writes one for
    every initializer and rebuilds them itself, so the IR's lowered models stay as they were)."""
    for field in (g.input, g.output, g.value_info):
        for vi in field:
            if any(p.key in _KEYS for p in vi.metadata_props):
                kept = [p for p in vi.metadata_props if p.key not in _KEYS]
                del vi.metadata_props[:]
                vi.metadata_props.extend(kept)
    inits = {t.name: t for t in g.initializer}
    kept = [
        vi
        for vi in g.value_info
        if vi.doc_string
        or vi.metadata_props
        or (vi.HasField("type") and not (vi.name in inits and _same_type(vi, inits[vi.name])))
    ]
    if len(kept) < len(g.value_info):  # rebuilt at once: removing one by one is quadratic
        kept = [_copied(vi) for vi in kept]
        del g.value_info[:]
        g.value_info.extend(kept)


def _copied(vi: onnx.ValueInfoProto) -> onnx.ValueInfoProto:
    out = onnx.ValueInfoProto()
    out.CopyFrom(vi)
    return out


def _same_type(vi: onnx.ValueInfoProto, init: onnx.TensorProto) -> bool:
    expected = onnx.helper.make_tensor_type_proto(init.data_type, list(init.dims))
    return vi.type == expected


# --- annotations -------------------------------------------------------------------------------------


def _write_annotations(t: Any, value: onnx_ir.Value) -> None:
    if t.encoding is not None:
        value.meta[ENCODING_KEY] = t.encoding
        if isinstance(t.encoding, Encoding):
            value.metadata_props[ENCODING_KEY] = json.dumps(dataclasses.asdict(t.encoding))
    precision = Precision.of(t.precision) if t.precision is not None else None
    if precision is not None:
        value.meta[PRECISION_KEY] = precision
        value.metadata_props[PRECISION_KEY] = str(precision)
    if t.meta:
        value.meta[META_KEY] = dict(t.meta)
        try:
            value.metadata_props[META_KEY] = json.dumps(t.meta, sort_keys=True, allow_nan=False)
        except (TypeError, ValueError):
            pass  # objects a pass keeps in meta: carried in memory only


def _read_annotations(value: onnx_ir.Value, t: Any) -> None:
    meta, props = value.meta, value.metadata_props
    if ENCODING_KEY in meta:
        t.encoding = meta[ENCODING_KEY]
    elif ENCODING_KEY in props:
        t.encoding = _parse(props[ENCODING_KEY], ENCODING_KEY, value, lambda d: Encoding(**d))
    if PRECISION_KEY in meta:
        t.precision = meta[PRECISION_KEY]
    elif PRECISION_KEY in props:
        t.precision = Precision.parse(props[PRECISION_KEY])
    if META_KEY in meta:
        t.meta = dict(meta[META_KEY])
    elif META_KEY in props:
        t.meta = _parse(props[META_KEY], META_KEY, value, dict)


def _parse(text: str, key: str, value: onnx_ir.Value, build: Any) -> Any:
    try:
        return build(json.loads(text))
    except (TypeError, ValueError) as exc:
        raise QPassesError(
            f"value {value.name!r}: metadata_props[{key!r}] is not a qpasses annotation ({type(exc).__name__}: {exc})"
        ) from None
