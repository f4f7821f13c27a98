"""Quantizer groups: the units AMP gives one candidate each.

A group is a set of quantizable compute ops with the quantizers whose precision moves together:

- an op's output quantizer and its parameter quantizers (weight, bias). In qpasses an op runs in
  the precision of its output and ``insert-converts`` converts what it reads, so the output is
  the op's own quantizer (AIMET, which quantizes op inputs, groups it with the reader instead);
- a Relu/Clip the target fuses into its producer joins the producer (``fused_intermediates``);
- ops sharing a parameter are one group (a tensor has one precision), closed transitively;
- a graph input is the input quantizer of the ops reading it (through data-movement ops), and
  joins them; data-movement outputs (Reshape, MaxPool...) follow their input's group.

Tensors no group owns are outputs of float ops: they stay float, and int readers convert them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from graph_ir import Graph, Op
from qpasses.core.analyses import Shapes
from qpasses.core.context import PassContext
from qpasses.quant.plan import DATA_MOVEMENT, build_plan, fused_intermediates
from qpasses.targets.quantizable_ops import activation_slots, quantizable

MAC_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})


@dataclass(frozen=True)
class QuantizerGroup:
    """One AMP decision. ``activations`` are the tensors whose precision the group sets
    (op outputs and input quantizers); ``shared`` follow them through data-movement ops."""

    name: str
    ops: tuple[str, ...]
    op_types: tuple[str, ...]
    activations: tuple[str, ...] = ()
    inputs: tuple[str, ...] = ()
    shared: tuple[str, ...] = ()
    weights: tuple[str, ...] = ()
    biases: tuple[str, ...] = ()
    reads: tuple[str, ...] = ()
    """Activation tensors its ops read that another group (or a float op) produces: where converts go."""

    @property
    def mac_ops(self) -> tuple[str, ...]:
        return tuple(n for n, t in zip(self.ops, self.op_types, strict=True) if t in MAC_OPS)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "ops": list(self.ops),
            "op_types": list(self.op_types),
            "activations": list(self.activations),
            "inputs": list(self.inputs),
            "shared": list(self.shared),
            "weights": list(self.weights),
            "biases": list(self.biases),
            "reads": list(self.reads),
        }


@dataclass(frozen=True)
class GroupPartition:
    """All groups of a graph, in topological order, and who owns each quantized activation."""

    groups: tuple[QuantizerGroup, ...]
    owner: Mapping[str, str] = field(default_factory=dict)
    """Quantized activation tensor (root or shared) -> owning group name."""
    float_sources: tuple[str, ...] = ()
    """Quantized activations produced by float ops: converted at each int reader's precision."""

    def __iter__(self):  # noqa: ANN204 - iterator over groups
        return iter(self.groups)

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, name: str) -> QuantizerGroup:
        for g in self.groups:
            if g.name == name:
                return g
        raise KeyError(name)

    @property
    def names(self) -> list[str]:
        return [g.name for g in self.groups]


class _UnionFind:
    def __init__(self) -> None:
        self.parent: dict[str, str] = {}

    def find(self, x: str) -> str:
        self.parent.setdefault(x, x)
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, a: str, b: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[rb] = ra


def _is_seed(op: Op) -> bool:
    """A quantizable compute op: it has an int precision of its own (data movement follows its input)."""
    return quantizable(op) and op.op_type not in DATA_MOVEMENT


def _readers_through_data_movement(graph: Graph, name: str) -> list[Op]:
    """Compute ops reading ``name`` directly or through chains of data-movement ops."""
    found: list[Op] = []
    stack, seen = [name], {name}
    while stack:
        tensor = stack.pop()
        for op in graph.consumers(tensor):
            if _is_seed(op):
                found.append(op)
            elif quantizable(op) and op.op_type in DATA_MOVEMENT:
                for out in op.outputs:
                    if out and out not in seen:
                        seen.add(out)
                        stack.append(out)
    return found


def find_groups(graph: Graph) -> GroupPartition:
    """Partition the quantizers of a (batch-norm folded, FP32) graph into AMP groups."""
    ctx = PassContext()
    plan = build_plan(graph, ctx.get(Shapes, graph))
    order = graph.topological_order()
    position = {op.name: i for i, op in enumerate(order)}
    seeds = [op for op in order if _is_seed(op)]
    uf = _UnionFind()
    for op in seeds:
        uf.find(op.name)
    for x, y in fused_intermediates(graph).items():
        px, py = graph.producer(x), graph.producer(y)
        if px is not None and py is not None and _is_seed(px) and _is_seed(py):
            uf.union(px.name, py.name)
    for name in (*plan.weights, *plan.biases):
        users = [op.name for op in graph.consumers(name) if _is_seed(op)]
        for other in users[1:]:
            uf.union(users[0], other)

    roots = list(plan.activations)
    owner_op: dict[str, str] = {}  # activation root -> a seed op of its group
    input_roots: dict[str, list[str]] = {}
    float_sources: list[str] = []
    for r in roots:
        producer = graph.producer(r)
        if producer is not None and _is_seed(producer):
            owner_op[r] = producer.name
        elif producer is None:
            readers = [op.name for op in _readers_through_data_movement(graph, r)]
            for other in readers[1:]:
                uf.union(readers[0], other)
            input_roots[r] = readers
        else:
            float_sources.append(r)

    members: dict[str, list[Op]] = {}
    for op in seeds:
        members.setdefault(uf.find(op.name), []).append(op)
    key_of_op = {op.name: uf.find(op.name) for op in seeds}
    activations: dict[str, list[str]] = {}
    inputs: dict[str, list[str]] = {}
    for r in roots:
        if r in owner_op:
            activations.setdefault(key_of_op[owner_op[r]], []).append(r)
        elif r in input_roots:
            key = key_of_op[input_roots[r][0]] if input_roots[r] else f"input:{r}"
            activations.setdefault(key, []).append(r)
            inputs.setdefault(key, []).append(r)
            members.setdefault(key, [])
    weights: dict[str, list[str]] = {}
    biases: dict[str, list[str]] = {}
    for table, specs in ((weights, plan.weights), (biases, plan.biases)):
        for name, spec in specs.items():
            if spec.op in key_of_op:
                table.setdefault(key_of_op[spec.op], []).append(name)

    root_key = {r: key for key, rs in activations.items() for r in rs}
    shared: dict[str, list[str]] = {}
    for name, root in plan.shared.items():
        if root in root_key:
            shared.setdefault(root_key[root], []).append(name)
    tensor_key = {**root_key, **{s: root_key[r] for s, r in plan.shared.items() if r in root_key}}
    quantized = set(tensor_key) | set(float_sources) | {s for s, r in plan.shared.items() if r in float_sources}

    def first_position(key: str) -> float:
        ops = members.get(key, [])
        if ops:
            return min(position[o.name] for o in ops)
        return -1.0  # an input read by no compute op: first

    keys = sorted((k for k in members if members[k] or activations.get(k)), key=first_position)
    names: dict[str, str] = {}
    used: set[str] = set()
    for key in keys:
        ops = members[key]
        mac = [o for o in ops if o.op_type in MAC_OPS]
        base = (mac or ops)[0].name if ops else activations[key][0]
        name, i = base, 1
        while name in used:
            i += 1
            name = f"{base}#{i}"
        used.add(name)
        names[key] = name

    groups: list[QuantizerGroup] = []
    for key in keys:
        ops = sorted(members[key], key=lambda o: position[o.name])
        reads: list[str] = []
        for op in ops:
            for slot in activation_slots(op):
                t = op.inputs[slot] if slot < len(op.inputs) else ""
                if t and t in quantized and tensor_key.get(t) != key and t not in reads:
                    reads.append(t)
        if not (activations.get(key) or weights.get(key)):
            continue  # controls no quantizer (e.g. an op whose output is never quantized)
        groups.append(
            QuantizerGroup(
                name=names[key],
                ops=tuple(o.name for o in ops),
                op_types=tuple(o.op_type for o in ops),
                activations=tuple(activations.get(key, ())),
                inputs=tuple(inputs.get(key, ())),
                shared=tuple(shared.get(key, ())),
                weights=tuple(weights.get(key, ())),
                biases=tuple(biases.get(key, ())),
                reads=tuple(reads),
            )
        )
    kept = {names[k] for k in keys}
    owner = {t: names[k] for t, k in tensor_key.items() if names.get(k) in kept}
    return GroupPartition(tuple(groups), owner, tuple(float_sources))
