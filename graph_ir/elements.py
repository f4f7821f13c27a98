"""Tensors and ops: the two first-class elements of the IR.

Both keep the ONNX protos they came from for whatever the IR does not model itself
(type protos, doc strings, metadata, raw attributes), so the round trip is lossless
without the IR having to know every field ONNX will ever add.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from graph_ir.errors import InternalError

if TYPE_CHECKING:
    from graph_ir.graph import Graph

Dim = int | str | None
_CONTROL_FLOW = frozenset({"If", "Loop", "Scan", "SequenceMap"})


class Tensor:
    """A named value: graph input, initializer, Constant output or activation.

    ``encoding`` and ``precision`` are the slots quantization passes fill (setting a precision bumps
    ``Graph.precision_version``, which analyses that read precisions are keyed on); ``meta`` is
    free-form per-pass data. Weight data is read lazily from the initializer or from the
    producing ``Constant`` node, so both look the same to passes.
    """

    __slots__ = ("name", "value_info", "initializer", "encoding", "_precision", "meta", "_graph")

    def __init__(self, graph: Graph, name: str) -> None:
        self._graph = graph
        self.name = name
        self.value_info: onnx.ValueInfoProto | None = None
        self.initializer: onnx.TensorProto | None = None
        self.encoding: Any = None
        self._precision: Any = None
        self.meta: dict[str, Any] = {}

    # --- precision annotation (analyses such as the quantization plan are keyed on it) ---
    @property
    def precision(self) -> Any:
        return self._precision

    @precision.setter
    def precision(self, value: Any) -> None:
        if value is not self._precision:
            self._precision = value
            self._graph.precision_version += 1

    def __repr__(self) -> str:
        return f"Tensor({self.name!r}, dtype={self.dtype}, shape={self.shape})"

    # --- type -----------------------------------------------------------------
    @property
    def dtype(self) -> int:
        """ONNX element type (``onnx.TensorProto.FLOAT`` ...), 0 when unknown."""
        if self.initializer is not None:
            return self.initializer.data_type
        const = self._constant_attr()
        if const is not None:
            return _constant_dtype(const)
        if self.value_info is not None and self.value_info.type.HasField("tensor_type"):
            return self.value_info.type.tensor_type.elem_type
        return 0

    @property
    def shape(self) -> tuple[Dim, ...] | None:
        """Dims as ints, symbolic names, or None; None when the rank is unknown."""
        if self.initializer is not None:
            return tuple(self.initializer.dims)
        const = self._constant_attr()
        if const is not None:
            return tuple(_constant_array(const).shape)
        if self.value_info is None or not self.value_info.type.HasField("tensor_type"):
            return None
        tt = self.value_info.type.tensor_type
        if not tt.HasField("shape"):
            return None
        return tuple(
            d.dim_value if d.HasField("dim_value") else (d.dim_param if d.HasField("dim_param") else None)
            for d in tt.shape.dim
        )

    @property
    def static_shape(self) -> tuple[int, ...] | None:
        """``shape`` when every dim is a known int (always so for constants), else None."""
        shape = self.shape
        if shape is None:
            return None
        dims = tuple(d for d in shape if isinstance(d, int))
        return dims if len(dims) == len(shape) else None

    def set_type(self, dtype: int, shape: tuple[Dim, ...] | None = None) -> None:
        """Set element type and shape (kept in a value_info so it lowers to ONNX)."""
        vi = helper.make_tensor_value_info(self.name, dtype, list(shape) if shape is not None else None)
        if self.value_info is not None:
            vi.doc_string = self.value_info.doc_string
            vi.metadata_props.extend(self.value_info.metadata_props)
        self.value_info = vi

    # --- data -------------------------------------------------------------------
    @property
    def is_constant(self) -> bool:
        """True for initializers and outputs of ``Constant`` nodes (not graph inputs)."""
        return self.initializer is not None or self._constant_attr() is not None

    @property
    def data(self) -> np.ndarray | None:
        """The weight as numpy, from the initializer or the producing Constant node."""
        if self.initializer is not None:
            return numpy_helper.to_array(self.initializer)
        const = self._constant_attr()
        return None if const is None else _constant_array(const)

    def constant_data(self) -> np.ndarray:
        """``data`` where the caller has established that the tensor is constant (a bug otherwise)."""
        data = self.data
        if data is None:
            raise InternalError(f"tensor {self.name!r} was taken for a constant but has no data")
        return data

    def set_data(self, array: np.ndarray) -> None:
        """Replace the weight where it lives (initializer or Constant attribute)."""
        array = np.asarray(array)
        producer = self._graph.producer(self.name)
        if self.initializer is None and producer is not None and producer.op_type == "Constant":
            producer.attributes = {"value": helper.make_attribute("value", numpy_helper.from_array(array))}
        else:
            self.initializer = numpy_helper.from_array(array, self.name)
        self._graph.touch()

    @property
    def producer(self) -> Op | None:
        return self._graph.producer(self.name)

    @property
    def consumers(self) -> list[Op]:
        return self._graph.consumers(self.name)

    def _constant_attr(self) -> onnx.AttributeProto | None:
        op = self._graph.producer(self.name)
        if op is None or op.op_type != "Constant" or not op.is_standard:
            return None
        return next(iter(op.attributes.values()), None)


def _constant_array(attr: onnx.AttributeProto) -> np.ndarray:
    """Decode any of Constant's value_* attributes into numpy."""
    kind = attr.type
    if kind == onnx.AttributeProto.TENSOR:
        return numpy_helper.to_array(attr.t)
    if kind == onnx.AttributeProto.FLOAT:
        return np.array(attr.f, dtype=np.float32)
    if kind == onnx.AttributeProto.INT:
        return np.array(attr.i, dtype=np.int64)
    if kind == onnx.AttributeProto.FLOATS:
        return np.array(list(attr.floats), dtype=np.float32)
    if kind == onnx.AttributeProto.INTS:
        return np.array(list(attr.ints), dtype=np.int64)
    if kind == onnx.AttributeProto.STRING:
        return np.array(attr.s.decode())
    if kind == onnx.AttributeProto.STRINGS:
        return np.array([s.decode() for s in attr.strings])
    if kind == onnx.AttributeProto.SPARSE_TENSOR:
        dense = numpy_helper.to_array(attr.sparse_tensor.values)
        out = np.zeros(tuple(attr.sparse_tensor.dims), dtype=dense.dtype)
        idx = numpy_helper.to_array(attr.sparse_tensor.indices)
        out.reshape(-1)[idx.reshape(-1) if idx.ndim == 1 else np.ravel_multi_index(idx.T, out.shape)] = dense
        return out
    raise ValueError(f"unsupported Constant attribute type {kind}")


def _constant_dtype(attr: onnx.AttributeProto) -> int:
    if attr.type == onnx.AttributeProto.TENSOR:
        return attr.t.data_type
    if attr.type == onnx.AttributeProto.SPARSE_TENSOR:
        return attr.sparse_tensor.values.data_type
    return helper.np_dtype_to_tensor_dtype(_constant_array(attr).dtype)


class Slots(list[str]):
    """An op's input or output names: read like a list, edited only through ``Graph`` methods
    (``set_input``, ``set_output``, ``replace_use``...), which keep producers and uses right."""

    __slots__ = ()

    def _refuse(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError("an op's inputs/outputs are edited through Graph.set_input / set_output / replace_use")

    __setitem__ = __delitem__ = __iadd__ = __imul__ = _refuse
    append = extend = insert = pop = remove = clear = sort = reverse = _refuse


class Op:
    """One ONNX node with explicit, ordered input/output slots.

    ``inputs`` may hold ``""`` for an omitted optional input; the same tensor may sit in
    several slots (``Mul(x, x)``). ``captures`` are outer-scope tensors read inside
    If/Loop/Scan subgraphs: they are uses like any input. Mutate slots through
    ``Graph`` methods so producer/consumer indices stay right.
    """

    __slots__ = (
        "id",
        "name",
        "op_type",
        "domain",
        "_attributes",
        "_attribute_protos",
        "_inputs",
        "_outputs",
        "captures",
        "extra",
        "meta",
    )

    def __init__(
        self,
        op_id: int,
        op_type: str,
        name: str,
        domain: str = "",
        attributes: dict[str, onnx.AttributeProto] | None = None,
        attribute_protos: Sequence[onnx.AttributeProto] | None = None,
    ) -> None:
        self.id = op_id
        self.op_type = op_type
        self.name = name
        self.domain = domain
        # Loading keeps the proto's repeated field and builds the dict on first use:
        # most ops' attributes are never looked at, and the dict costs more than the rest of the op.
        self._attributes: dict[str, onnx.AttributeProto] | None = attributes
        self._attribute_protos = attribute_protos if attributes is None else None
        self._inputs = Slots()
        self._outputs = Slots()
        self.captures: list[str] = []
        self.extra: onnx.NodeProto | None = None  # doc_string, metadata_props, overload ... verbatim
        self.meta: dict[str, Any] = {}

    @property
    def inputs(self) -> Slots:
        return self._inputs

    @property
    def outputs(self) -> Slots:
        return self._outputs

    def __repr__(self) -> str:
        return f"Op({self.name!r}, {self.op_type}, in={self.inputs}, out={self.outputs})"

    @property
    def attributes(self) -> dict[str, onnx.AttributeProto]:
        if self._attributes is None:
            self._attributes = {a.name: a for a in self._attribute_protos or ()}
            self._attribute_protos = None
        return self._attributes

    @attributes.setter
    def attributes(self, value: dict[str, onnx.AttributeProto]) -> None:
        self._attributes = value
        self._attribute_protos = None

    def attribute_protos(self) -> Iterable[onnx.AttributeProto]:
        """Attributes in order, without materializing the dict."""
        return (self._attribute_protos or ()) if self._attributes is None else self._attributes.values()

    @property
    def is_standard(self) -> bool:
        """In the default ONNX domain (ai.onnx), where op types mean what the ONNX spec says."""
        return self.domain in ("", "ai.onnx")

    @property
    def may_have_subgraphs(self) -> bool:
        """Only If/Loop/Scan/SequenceMap (and custom-domain ops) can carry graph attributes."""
        if self.is_standard:
            return self.op_type in _CONTROL_FLOW
        return True

    def attr(self, name: str, default: Any = None) -> Any:
        """Attribute value as a Python object (ints, floats, lists, numpy for tensors)."""
        a = self.attributes.get(name)
        if a is None:
            return default
        if a.type == onnx.AttributeProto.TENSOR:
            return numpy_helper.to_array(a.t)
        return helper.get_attribute_value(a)

    def set_attr(self, name: str, value: Any) -> None:
        if isinstance(value, np.ndarray):
            value = numpy_helper.from_array(value)
        self.attributes[name] = helper.make_attribute(name, value)

    @property
    def subgraphs(self) -> list[onnx.GraphProto]:
        out: list[onnx.GraphProto] = []
        if not self.may_have_subgraphs:
            return out
        for a in self.attributes.values():
            if a.type == onnx.AttributeProto.GRAPH:
                out.append(a.g)
            elif a.type == onnx.AttributeProto.GRAPHS:
                out.extend(a.graphs)
        return out
