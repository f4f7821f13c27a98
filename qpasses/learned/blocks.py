"""AdaScale's blocks, found on the IR (no torch here): single-input single-output regions.

``cut_points`` are the tensors that are the only live activation at some point of the topological
order (a residual block is one region: its skip tensor is live alongside the body);
``find_blocks`` groups the ops between them around the learnable layers, ``named_block`` checks a
user's ``start->end``. Apart from ``layers`` (what is learned) because only AdaScale cuts blocks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final

import onnx

from graph_ir import Graph, Op
from qpasses.core.errors import PassError
from qpasses.learned.layers import Layer, aliases_constant

_FLOATS: Final = frozenset(
    {0, onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE}
)


@dataclass
class Block:
    """A single-input single-output region: ``ops`` compute ``output`` from ``input`` and constants."""

    input: str
    output: str
    ops: list[Op]
    layers: list[Layer] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"{self.input} -> {self.output}"

    def side_inputs(self, graph: Graph) -> list[str]:
        """Non-constant tensors the ops read from outside besides ``input``: tensors that are not float
        activations (an attention mask's integer ids, shapes), which the cut points do not count."""
        inside = {n for op in self.ops for n in op.outputs if n}
        names = (
            n
            for op in self.ops
            for n in op.inputs
            if n and n != self.input and n not in inside and not graph.tensors[n].is_constant
        )
        return list(dict.fromkeys(names))

    def outside_users(self, layer: Layer) -> bool:
        """Whether ops outside the block also read the layer's (shared) weight."""
        members = {op.id for op in self.ops}
        return any(u not in members for u in layer.users)


def _is_activation(graph: Graph, name: str, dtypes: dict[str, int]) -> bool:
    t = graph.tensors.get(name)
    return t is not None and not t.is_constant and dtypes.get(name, t.dtype) in _FLOATS


def cut_points(graph: Graph, order: Sequence[Op], dtypes: dict[str, int]) -> list[tuple[int, str]]:
    """(position, tensor): after the op at ``position`` (-1: before the first op) only ``tensor`` is live."""
    position = {op.id: i for i, op in enumerate(order)}
    end = len(order)
    born: dict[int, list[str]] = {}
    dies: dict[int, list[str]] = {}

    def track(name: str, start: int) -> None:
        if not _is_activation(graph, name, dtypes):
            return
        last = max((position[op.id] for op in graph.consumers(name) if op.id in position), default=start)
        if graph.is_graph_output(name):
            last = end
        if last > start:
            born.setdefault(start, []).append(name)
            dies.setdefault(last, []).append(name)

    for name in graph.inputs:
        track(name, -1)
    for op in order:
        if aliases_constant(graph, op):
            continue  # an Identity of a weight: a constant, which torch programs recompute (constant_aliases)
        for name in op.outputs:
            if name:
                track(name, position[op.id])
    live: dict[str, None] = {}
    cuts: list[tuple[int, str]] = []
    for i in range(-1, end):
        for name in dies.get(i, ()):
            live.pop(name, None)
        for name in born.get(i, ()):
            live[name] = None
        if len(live) == 1:
            cuts.append((i, next(iter(live))))
    return cuts


def find_blocks(
    graph: Graph, order: Sequence[Op], layers: Sequence[Layer], dtypes: dict[str, int], layers_per_block: int = 1
) -> tuple[list[Block], list[Layer]]:
    """Blocks between cut points, each holding at least ``layers_per_block`` layers (fewer at the end).

    A block ends where the next region with a layer begins, so the ops after a layer (activation,
    pooling, a residual Add...) belong to its block and its loss is taken after them. Layers outside
    every block (before the first cut point) are returned as the second item.
    """
    by_op = {layer.op.id: layer for layer in layers}
    cuts = cut_points(graph, order, dtypes)
    blocks: list[Block] = []
    current: Block | None = None
    placed: set[int] = set()
    for (start, source), (stop, target) in zip(cuts, cuts[1:], strict=False):
        ops = list(order[start + 1 : stop + 1])
        found = [by_op[op.id] for op in ops if op.id in by_op]
        if current is not None and found and len(current.layers) >= layers_per_block:
            blocks.append(current)
            current = None
        if current is None:
            if not found:
                continue
            current = Block(source, target, [])
        current.ops += ops
        current.output = target
        current.layers += found
        placed.update(layer.op.id for layer in found)
    if current is not None:
        blocks.append(current)
    return blocks, [layer for layer in layers if layer.op.id not in placed]


def named_block(graph: Graph, order: Sequence[Op], spec: str, layers: Sequence[Layer]) -> Block:
    """The block ``"start->end"`` named by the user, checked to be single-input single-output."""
    if "->" not in spec:
        raise PassError(f"pass 'adascale': block {spec!r} is not written start->end (two tensor names)")
    start, end = (s.strip() for s in spec.split("->", 1))
    for name in (start, end):
        if name not in graph.tensors or graph.tensors[name].is_constant:
            raise PassError(f"pass 'adascale': block {spec!r}: '{name}' is not an activation tensor of the model")
    # Ops that depend on start and that end depends on.
    after: set[str] = {start}
    downstream: set[int] = set()
    for op in order:
        if any(n in after for n in op.inputs if n):
            downstream.add(op.id)
            after.update(n for n in op.outputs if n)
    needed: set[int] = set()
    wanted = {end}
    for op in reversed(order):
        if any(n in wanted for n in op.outputs if n) and op.id in downstream:
            needed.add(op.id)
            wanted.update(n for n in op.inputs if n)
    ops = [op for op in order if op.id in needed]
    if not ops:
        raise PassError(f"pass 'adascale': block {spec!r}: '{end}' is not computed from '{start}'")
    inside = {n for op in ops for n in op.outputs if n}
    for op in ops:
        for name in op.inputs:
            if name and name != start and name not in inside and not graph.tensors[name].is_constant:
                raise PassError(
                    f"pass 'adascale': block {spec!r} is not single-input: {op.op_type} '{op.name}' "
                    f"also reads '{name}' from outside the block"
                )
    for name in inside - {end}:
        outside = [op.name for op in graph.consumers(name) if op.id not in needed]
        if outside or graph.is_graph_output(name):
            who = f"op '{outside[0]}'" if outside else "a graph output"
            raise PassError(f"pass 'adascale': block {spec!r} is not single-output: '{name}' is also read by {who}")
    members = {op.id for op in ops}
    return Block(start, end, ops, [layer for layer in layers if layer.op.id in members])


__all__ = ["Block", "cut_points", "find_blocks", "named_block"]
