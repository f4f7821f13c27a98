"""The IR graph: a networkx MultiDiGraph of ops, with tensors as first-class objects.

Nodes of ``Graph.nx`` are op ids; an edge ``producer -> consumer`` is keyed by the
consumer's input slot (negative slots are subgraph captures), so ``Mul(x, x)`` keeps two
edges. Producer and consumer indices are dicts kept in sync with the edges, so both
lookups are O(1). Every mutation bumps ``version``; cached analyses (topological order
here, the pass manager's analyses elsewhere) are keyed by it.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from graph_ir.elements import Op, Slots, Tensor
from graph_ir.errors import GraphError
from graph_ir.graph_state import GraphState, Use
from graph_ir.subgraphs import captured_names, rename_captured


class Graph(GraphState):
    """A mutable ONNX graph. Build it with ``graph_ir.load`` / ``graph_ir.from_onnx``.

    What it holds and the lookups are ``GraphState``'s; here is every edit, each keeping the
    producer/use indices and the networkx edges in sync and bumping ``version``.
    """

    # --- model level: opset, the ONNX round trip, adoption ---------------------------
    def set_opset(self, version: int, domain: str = "") -> None:
        for imp in self.shell.opset_import:
            if imp.domain == domain:
                imp.version = version
                break
        else:
            self.shell.opset_import.append(helper.make_opsetid(domain, version))
        self.touch()

    def to_onnx(self) -> onnx.ModelProto:
        from graph_ir.onnx_bridge import to_onnx

        return to_onnx(self)

    def copy(self) -> Graph:
        """An independent deep copy (through ONNX; passes should edit in place instead)."""
        from graph_ir.onnx_bridge import from_onnx

        model = self.to_onnx()
        return from_onnx(model)

    def adopt(self, other: Graph) -> None:
        """Take over another graph's contents in place (for passes that rebuild the graph)."""
        version = self.version
        self.__dict__.update(other.__dict__)
        for t in self.tensors.values():
            t._graph = self
        self.version = max(version, other.version) + 1
        self.precision_version += 1
        self._topo = None

    def touch(self) -> None:
        """Record a change: invalidates cached analyses."""
        self.version += 1

    # --- naming --------------------------------------------------------------------
    def unique_name(self, base: str) -> str:
        """A tensor/op name not used in this graph."""
        name = base
        while name in self.tensors or name in self._op_names:
            name = f"{base}_{next(self._names)}"
        return name

    # --- mutation: tensors -------------------------------------------------------------
    def add_tensor(self, name: str) -> Tensor:
        t = self.tensors.get(name)
        if t is None:
            t = self.tensors[name] = Tensor(self, name)
        return t

    def add_initializer(self, name: str, array: np.ndarray | onnx.TensorProto) -> Tensor:
        if name in self.tensors and (self.tensors[name].is_constant or name in self._producer):
            raise GraphError(f"tensor {name!r} already exists")
        t = self.add_tensor(name)
        if isinstance(array, onnx.TensorProto):
            if array.name != name:
                proto = onnx.TensorProto()
                proto.CopyFrom(array)
                proto.name = name
                array = proto
            t.initializer = array
        else:
            t.initializer = numpy_helper.from_array(np.asarray(array), name)
        self.touch()
        return t

    def remove_tensor(self, name: str) -> None:
        """Drop an unused tensor (initializer or dangling value)."""
        if self._uses.get(name) or name in self._producer or name in self.outputs or name in self.inputs:
            raise GraphError(f"tensor {name!r} is still in use")
        self.tensors.pop(name, None)
        self.touch()

    # --- mutation: ops -----------------------------------------------------------------
    def add_op(
        self,
        op_type: str,
        inputs: Sequence[str],
        outputs: Sequence[str] | int = 1,
        *,
        name: str | None = None,
        domain: str = "",
        attributes: dict[str, Any] | None = None,
    ) -> Op:
        """Create an op. ``outputs`` are names, or a count for fresh unique names."""
        op_name = self.unique_name(name or op_type)
        op = Op(next(self._ids), op_type, op_name, domain)
        for key, value in (attributes or {}).items():
            op.attributes[key] = value if isinstance(value, onnx.AttributeProto) else _make_attr(key, value)
        if isinstance(outputs, int):
            count = outputs
            outputs = [self.unique_name(f"{op_name}_out{i}" if count > 1 else f"{op_name}_out") for i in range(count)]
        self._insert(op, list(inputs), list(outputs))
        return op

    def _insert(self, op: Op, inputs: list[str], outputs: list[str]) -> None:
        for out in outputs:
            if out and out in self._producer:
                raise GraphError(f"tensor {out!r} already has producer {self._producer[out][0].name!r}")
            if out and out in self.tensors and self.tensors[out].initializer is not None:
                raise GraphError(f"tensor {out!r} is an initializer and cannot be an op output")
        self._ops[op.id] = op
        self._op_names.add(op.name)
        self.nx.add_node(op.id, op=op)
        op._inputs = Slots(inputs)
        op._outputs = Slots(outputs)
        for slot, name in enumerate(inputs):
            if name:
                self._add_use(name, op, slot)
        for idx, name in enumerate(outputs):
            if name:
                self.add_tensor(name)
                self._set_producer(name, op, idx)
        self._refresh_captures(op)
        self.touch()

    def _bulk_insert(self, ops: list[Op]) -> None:
        """Insert many ops at once (loading): same indices as ``_insert``, with edges added in bulk."""
        tensors, uses, producer = self.tensors, self._uses, self._producer
        nodes = []
        for op in ops:
            op_id = op.id
            self._ops[op_id] = op
            self._op_names.add(op.name)
            nodes.append((op_id, {"op": op}))
            for slot, name in enumerate(op.inputs):
                if name:
                    if name not in tensors:
                        tensors[name] = Tensor(self, name)
                    if name in uses:
                        uses[name][(op_id, slot)] = None
                    else:
                        uses[name] = {(op_id, slot): None}
            for idx, name in enumerate(op.outputs):
                if name:
                    if name in producer:
                        raise GraphError(
                            f"tensor {name!r} has two producers: {producer[name][0].name!r} and {op.name!r}"
                        )
                    if name not in tensors:
                        tensors[name] = Tensor(self, name)
                    producer[name] = (op, idx)
        self.nx.add_nodes_from(nodes)
        edges: list[tuple[int, int, int, dict[str, str]]] = []
        for name, readers in uses.items():
            prod = producer.get(name)
            if prod is not None:
                pid = prod[0].id
                edges.extend((pid, cid, slot, {"tensor": name}) for cid, slot in readers)
        self.nx.add_edges_from(edges)
        for op in ops:
            if op.may_have_subgraphs and op.subgraphs:
                self._refresh_captures(op)
        self.touch()

    def remove_op(self, op: Op) -> None:
        """Delete an op; its outputs disappear unless still used or graph outputs."""
        for slot, name in enumerate(op.inputs):
            if name:
                self._drop_use(name, op, slot)
        for k, name in enumerate(op.captures):
            self._drop_use(name, op, -1 - k)
        for name in op.outputs:
            if not name:
                continue
            self._producer.pop(name, None)
            if not self._uses.get(name) and name not in self.outputs:
                self.tensors.pop(name, None)
        self.nx.remove_node(op.id)
        del self._ops[op.id]
        self._op_names.discard(op.name)
        self.touch()

    def set_input(self, op: Op, slot: int, name: str) -> None:
        """Point one input slot of an op at another tensor ("" empties an optional slot)."""
        if slot >= len(op.inputs):
            op._inputs = Slots([*op.inputs, *([""] * (slot + 1 - len(op.inputs)))])
        old = op.inputs[slot]
        if old:
            self._drop_use(old, op, slot)
        list.__setitem__(op.inputs, slot, name)
        if name:
            self._add_use(name, op, slot)
        self.touch()

    def truncate_inputs(self, op: Op, count: int) -> None:
        """Drop ``op``'s input slots from ``count`` on (their uses go with them)."""
        for slot in range(count, len(op.inputs)):
            if op.inputs[slot]:
                self.set_input(op, slot, "")
        op._inputs = Slots(op.inputs[:count])
        self.touch()

    def set_op_type(self, op: Op, op_type: str, domain: str | None = None) -> None:
        """Turn ``op`` into another operator (same slots; attributes are the caller's to adjust)."""
        op.op_type = op_type
        if domain is not None:
            op.domain = domain
        self._topo = None
        self.touch()

    def set_output(self, op: Op, idx: int, name: str) -> None:
        """Make output ``idx`` of ``op`` write ``name`` (a tensor nothing produces yet).

        The tensor it wrote before keeps its readers and graph-output role, now without a
        producer, so another op (a DequantizeLinear, a folded layer) can take it over.
        """
        if name in self._producer:
            raise GraphError(f"tensor {name!r} already has producer {self._producer[name][0].name!r}")
        if name in self.tensors and self.tensors[name].initializer is not None:
            raise GraphError(f"tensor {name!r} is an initializer and cannot be an op output")
        old = op.outputs[idx]
        if old:
            for reader_id, slot in self._uses.get(old, ()):
                if self.nx.has_edge(op.id, reader_id, key=slot):
                    self.nx.remove_edge(op.id, reader_id, key=slot)
            del self._producer[old]
            if not self._uses.get(old) and old not in self.outputs:
                del self.tensors[old]  # nothing refers to it any more (as remove_op does)
        list.__setitem__(op.outputs, idx, name)
        if name:
            self.add_tensor(name)
            self._set_producer(name, op, idx)
        self.touch()

    def replace_use(self, op: Op, slot: int, new: str) -> None:
        """Redirect one use (as returned by ``uses``): an input slot, or a subgraph capture (slot < 0)."""
        if slot >= 0:
            self.set_input(op, slot, new)
        else:
            self._rename_capture(op, op.captures[-1 - slot], new)

    def replace_all_uses(self, old: str, new: str, *, graph_outputs: bool = True) -> None:
        """Make every reader of ``old`` (subgraph captures and, optionally, graph outputs) read ``new``."""
        self.add_tensor(new)
        for op, slot in self.uses(old):
            self.replace_use(op, slot, new)
        if graph_outputs:
            self.outputs = [new if o == old else o for o in self.outputs]
        self.touch()

    def rename_tensor(self, old: str, new: str) -> Tensor:
        """Give an activation a new name everywhere (producer, readers, graph outputs, captures)."""
        t = self.tensor(old)
        if new in self.tensors:
            raise GraphError(f"cannot rename {old!r} to {new!r}: the name is taken")
        if t.initializer is not None or old in self.inputs:
            raise GraphError(f"cannot rename {old!r}: initializers and graph inputs keep their names")
        uses = self.uses(old)
        for op, slot in uses:
            self._drop_use(old, op, slot)
        prod = self._producer.pop(old, None)
        if prod is not None:
            list.__setitem__(prod[0].outputs, prod[1], new)
        del self.tensors[old]
        t.name = new
        if t.value_info is not None:
            vi = onnx.ValueInfoProto()
            vi.CopyFrom(t.value_info)
            vi.name = new
            t.value_info = vi
        self.tensors[new] = t
        if prod is not None:
            self._set_producer(new, prod[0], prod[1])
        for op, slot in uses:
            if slot >= 0:
                list.__setitem__(op.inputs, slot, new)
            else:
                self._rewrite_subgraphs(op, old, new)
                op.captures[-1 - slot] = new
            self._add_use(new, op, slot)
        self.outputs = [new if o == old else o for o in self.outputs]
        self.touch()
        return t

    def insert_op_on_edge(
        self,
        tensor: str,
        op_type: str,
        *,
        extra_inputs: Sequence[str] = (),
        consumers: Iterable[Use] | None = None,
        name: str | None = None,
        attributes: dict[str, Any] | None = None,
        domain: str = "",
        output: str | None = None,
    ) -> Op:
        """Insert ``op_type(tensor, *extra_inputs)`` between a tensor and (some of) its readers.

        Graph outputs keep reading the original tensor, so the model interface is unchanged.
        """
        readers = list(self.uses(tensor) if consumers is None else consumers)
        out = output or self.unique_name(f"{tensor}_{op_type.lower()}")
        op = self.add_op(op_type, [tensor, *extra_inputs], [out], name=name, attributes=attributes, domain=domain)
        for reader, slot in readers:
            if reader is not op:
                self.replace_use(reader, slot, out)
        return op

    def remove_dead_ops(self) -> int:
        """Remove ops none of whose outputs are read or are graph outputs. Returns the count."""
        removed = 0
        work = list(self._ops.values())
        while work:
            next_work: list[Op] = []
            for op in work:
                if op.id not in self._ops:
                    continue
                if any(o and (self._uses.get(o) or o in self.outputs) for o in op.outputs):
                    continue
                feeders = [self._producer[n][0] for n in itertools.chain(op.inputs, op.captures) if n in self._producer]
                self.remove_op(op)
                removed += 1
                next_work.extend(feeders)
            work = next_work
        return removed

    def remove_unused_initializers(self) -> int:
        dead = [
            n
            for n, t in self.tensors.items()
            if t.initializer is not None and not self._uses.get(n) and n not in self.outputs and n not in self.inputs
        ]
        for n in dead:
            del self.tensors[n]
        if dead:
            self.touch()
        return len(dead)

    # --- internals ---------------------------------------------------------------------
    def _add_use(self, name: str, op: Op, slot: int) -> None:
        self.add_tensor(name)
        self._uses.setdefault(name, {})[(op.id, slot)] = None
        prod = self._producer.get(name)
        if prod is not None:
            self.nx.add_edge(prod[0].id, op.id, key=slot, tensor=name)

    def _drop_use(self, name: str, op: Op, slot: int) -> None:
        uses = self._uses.get(name)
        if uses is not None:
            uses.pop((op.id, slot), None)
            if not uses:
                del self._uses[name]
        prod = self._producer.get(name)
        if prod is not None and self.nx.has_edge(prod[0].id, op.id, key=slot):
            self.nx.remove_edge(prod[0].id, op.id, key=slot)

    def _set_producer(self, name: str, op: Op, idx: int) -> None:
        self._producer[name] = (op, idx)
        for op_id, slot in self._uses.get(name, ()):
            self.nx.add_edge(op.id, op_id, key=slot, tensor=name)

    def _refresh_captures(self, op: Op) -> None:
        if not op.captures and not op.may_have_subgraphs:
            return
        for k, name in enumerate(op.captures):
            self._drop_use(name, op, -1 - k)
        subgraphs = op.subgraphs
        names: dict[str, None] = {}
        for g in subgraphs:
            for n in captured_names(g):
                names.setdefault(n)
        op.captures = list(names)
        for k, name in enumerate(op.captures):
            self._add_use(name, op, -1 - k)

    def _rename_capture(self, op: Op, old: str, new: str) -> None:
        self._rewrite_subgraphs(op, old, new)
        self._refresh_captures(op)
        self.touch()

    def _rewrite_subgraphs(self, op: Op, old: str, new: str) -> None:
        # Copy-on-write: the subgraph protos may be shared with the caller's ModelProto.
        for key, attr in list(op.attributes.items()):
            if attr.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS):
                copy = onnx.AttributeProto()
                copy.CopyFrom(attr)
                graphs = [copy.g] if attr.type == onnx.AttributeProto.GRAPH else list(copy.graphs)
                for g in graphs:
                    rename_captured(g, old, new)
                op.attributes[key] = copy


def _make_attr(key: str, value: Any) -> onnx.AttributeProto:
    if isinstance(value, np.ndarray):
        value = numpy_helper.from_array(value)
    return helper.make_attribute(key, value)
