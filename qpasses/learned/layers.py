"""What AdaRound and AdaScale learn, found on the IR (no torch here).

- ``learnable_layers``: Conv/ConvTranspose/Gemm/MatMul ops with a constant float weight the plan
  quantizes, with the grid each starts from (SeqMSE's when ``seq-mse`` ran first, otherwise what
  ``encode-weights`` would compute); the others get a 'missed' remark saying why;
- ``constant_aliases``: the Identity chains of a weight a torch program must recompute;
- ``quantized_so_far``: the model with some weights replaced (``qpasses.data.weight_swap.SwappedWeights``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final

import numpy as np

from graph_ir import Graph, Op
from qpasses.core.errors import EncodingError
from qpasses.core.remarks import RemarkCollector
from qpasses.data.tensor_tap import Feed
from qpasses.data.weight_swap import SwappedWeights
from qpasses.quant.encodings import Encoding, Mode, fake_quantize
from qpasses.quant.plan import WeightSpec
from qpasses.quant.precision_type import tensor_precision
from qpasses.quant.range_search import compute

SUPPORTED: Final = ("Conv", "ConvTranspose", "Gemm", "MatMul")
ACTIVATIONS: Final = ("Relu", "Clip")


@dataclass
class Layer:
    """One weighted op to learn: its weight, the grid it starts from, the data input."""

    op: Op
    weight: str
    data: np.ndarray  # float32 FP32 weight
    encoding: Encoding  # the starting grid (min-max / the mode's, or SeqMSE's)
    source: str  # where the starting grid came from: "min-max" (the mode) or "seq-mse"
    channel_axis: int  # the weight's output-channel axis (per-channel encodings run along it)
    users: tuple[int, ...] = ()  # ids of every op reading the weight (several for a shared weight)

    @property
    def input(self) -> str:
        return self.op.inputs[0]

    @property
    def name(self) -> str:
        return self.op.name

    @property
    def bitwidth(self) -> int:
        return self.encoding.bitwidth


def starting_encoding(data: np.ndarray, bits: int, per_channel: bool, mode: Mode, axis: int) -> Encoding:
    """The encoding ``encode-weights`` computes for this weight (same per-channel / mode rules)."""
    if per_channel:
        return compute(data, bits, "tf" if mode in ("symmetric", "adjusted") else mode, axis=axis, role="weight")
    mode = mode if mode != "adjusted" or bits == 8 else "symmetric"
    return compute(data, bits, mode, role="weight")


def _is_alias(op: Op) -> bool:
    return op.op_type == "Identity" and op.is_standard and len(op.outputs) == 1


def weight_readers(graph: Graph, name: str) -> tuple[list[Op], set[str]]:
    """The ops reading ``name`` directly or through Identity ops (exporters write a shared weight's later uses
    as Identity of the initializer), and the tensor names involved (``name`` and its Identity aliases)."""
    readers: list[Op] = []
    aliases = {name}
    pending = [name]
    while pending:
        current = pending.pop()
        for op in graph.consumers(current):
            out = op.outputs[0] if _is_alias(op) else ""
            if out and not graph.is_graph_output(out) and out not in aliases:
                aliases.add(out)
                pending.append(out)
            elif op not in readers:
                readers.append(op)
    return readers, aliases


def aliases_constant(graph: Graph, op: Op) -> bool:
    """Whether ``op`` is an Identity (chain) of a constant: its output is a weight, not an activation."""
    while _is_alias(op) and op.inputs[0]:
        source = op.inputs[0]
        up = graph.producer(source)
        if up is None:
            return graph.tensors[source].is_constant
        op = up
    return False


def constant_aliases(graph: Graph, ops: Sequence[Op]) -> list[Op]:
    """Identity ops outside ``ops`` that compute, from a constant, a tensor ``ops`` read: a torch program runs
    them first so a swapped (learned) weight reaches every reader, never a captured FP32 copy."""
    inside = {op.id for op in ops}
    found: list[Op] = []
    pending = [n for op in ops for n in op.inputs if n]
    seen: set[str] = set()
    while pending:
        name = pending.pop()
        if name in seen:
            continue
        seen.add(name)
        producer = graph.producer(name)
        if producer is not None and producer.id not in inside and aliases_constant(graph, producer):
            found.append(producer)
            pending.append(producer.inputs[0])
    return list(reversed(found))  # a chain's first Identity first


def learnable_layers(
    graph: Graph,
    order: Sequence[Op],
    weights: dict[str, WeightSpec],
    remarks: RemarkCollector,
    *,
    weight_bw: int,
    per_channel: bool,
    mode: Mode,
    exclude: Iterable[str] = (),
    shared: bool = False,
) -> list[Layer]:
    """Supported ops in topological order; the others get a 'missed' remark with the reason.

    ``shared``: a weight read by several ops of one type (ALBERT's layers, a weight-tied decoder) is one
    layer at its first reader, ``users`` naming them all; AdaScale learns it when one block holds them
    all. Without it such weights are missed (AdaRound learns one op's output at a time).
    """
    excluded = set(exclude)
    seen: set[str] = set()
    unknown = excluded - {op.name for op in order}
    if unknown:
        remarks.missed("excluded ops not found", sorted(unknown), reason="no op of that name")
    layers: list[Layer] = []
    for op in order:
        if op.op_type not in SUPPORTED or not op.is_standard or len(op.inputs) < 2:
            continue
        name = op.inputs[1]
        spec = weights.get(name)
        if spec is None or name in seen:
            continue  # no constant float weight the plan quantizes, or a shared weight's later reader
        t = graph.tensors[name]
        precision = tensor_precision(t)
        bits = precision.bitwidth if precision is not None and not precision.is_float else weight_bw
        users, aliases = weight_readers(graph, name) if shared else (graph.consumers(name), {name})
        reason = ""
        if op.name in excluded:
            reason = "excluded by the exclude option"
        elif len(users) > 1 and not shared:
            reason = f"weight '{name}' is shared by several ops (its rounding would be learned for one of them)"
        elif len(users) > 1 and any(
            u.op_type != op.op_type
            or len(u.inputs) < 2
            or u.inputs[1] not in aliases
            or u.inputs[0] in aliases
            or u.name in excluded
            for u in users
        ):
            reason = f"weight '{name}' is shared by ops of other types, other input slots or excluded ops"
        elif len(users) == 1 and spec.op != op.name:
            reason = f"weight '{name}' is planned for op '{spec.op}'"
        elif t.meta.get("encoding_source") == "override":
            reason = "weight encoding given by the overrides file"
        elif t.meta.get("encoding_source") in ("adaround", "adascale"):
            reason = f"weight already learned by {t.meta['encoding_source']}"
        elif precision is not None and precision.is_float:
            reason = f"the weight is annotated {precision}"
        elif not 4 <= bits <= 16:
            reason = f"{bits}-bit weights are outside the 4-16 bit grids"
        elif not op.inputs[0] or graph.tensors[op.inputs[0]].is_constant:
            reason = "no data input"
        elif any(
            c.op_type == "BatchNormalization" for u in users for out in u.outputs[:1] for c in graph.consumers(out)
        ):
            reason = "a BatchNormalization follows: run fold-batchnorm first (folding later rescales the weight)"
        if len(users) > 1:
            seen.add(name)
        if reason:
            remarks.missed("not learned", [op.name], reason=reason)
            continue
        if spec.axis is None:  # e.g. Gemms with transB 0 and 1 sharing it: no one output-channel axis
            remarks.missed(
                "not learned",
                [op.name],
                reason=f"weight '{name}' is shared by layers whose output channels lie on different axes",
            )
            continue
        data = np.asarray(t.data, dtype=np.float32)
        if not np.isfinite(data).all():
            remarks.missed("not learned", [op.name], reason="the weight holds NaN or infinite values")
            continue
        if t.meta.get("encoding_source") == "seq-mse" and isinstance(t.encoding, Encoding):
            encoding, source = t.encoding, "seq-mse"
        else:
            try:
                encoding = starting_encoding(data, bits, per_channel, mode, spec.axis)
            except EncodingError as exc:
                raise EncodingError(f"weight {name} of {op.name}: {exc}") from None
            source = "min-max" if mode in ("symmetric", "tf") else mode
        layers.append(Layer(op, name, data, encoding, source, spec.axis, tuple(u.id for u in users)))
    return layers


def _sole_reader(graph: Graph, op: Op) -> Op | None:
    out = op.outputs[0] if op.outputs else ""
    if not out or graph.is_graph_output(out):
        return None
    readers = graph.consumers(out)
    return readers[0] if len(readers) == 1 and readers[0].is_standard else None


def activation_after(graph: Graph, op: Op) -> list[Op]:
    """The ops from ``op`` to a Relu or Clip (constant bounds) that alone reads its output, directly or
    through a constant bias Add (paddle2onnx, keras2onnx): the loss is taken after them. [] when none."""
    chain: list[Op] = []
    reader = _sole_reader(graph, op)
    if reader is not None and reader.op_type == "Add":
        other = [n for n in reader.inputs if n != op.outputs[0]]
        if len(other) == 1 and other[0] and graph.tensors[other[0]].is_constant:
            chain.append(reader)
            reader = _sole_reader(graph, reader)
    if reader is None or reader.op_type not in ACTIVATIONS or reader.inputs[0] != (chain or [op])[-1].outputs[0]:
        return []
    if any(name and not graph.tensors[name].is_constant for name in reader.inputs[1:]):
        return []
    return [*chain, reader]


# --- the quantized model so far ------------------------------------------------------------------------


def quantized_so_far(graph: Graph, weights: Iterable[str]) -> SwappedWeights:
    """The model as quantized before any layer is learned: weights with overridden encodings fake-quantized
    (the others stay FP32 until learned; activations stay float, as they are calibrated afterwards)."""
    swapped = SwappedWeights(graph.to_onnx())
    for name in weights:
        t = graph.tensors[name]
        if t.meta.get("encoding_source") == "override" and isinstance(t.encoding, Encoding):
            try:
                swapped.set(name, fake_quantize(np.asarray(t.data, np.float32), t.encoding))
            except EncodingError:
                pass  # a layout mismatch is reported by the lowering
    return swapped


def per_channel_weights(requested: bool, target: object, remarks: RemarkCollector) -> bool:
    """Per-channel grids unless the target runs per-tensor weights only (then a 'missed' remark)."""
    allowed = target is None or getattr(target, "per_channel_weights", True)
    if requested and not allowed:
        remarks.missed(
            "per-channel grids disabled", reason=f"target {getattr(target, 'name', target)} is per-tensor only"
        )
    return requested and allowed


def count_samples(feeds: Sequence[Feed]) -> int:
    """Samples in ``feeds``: rows of each feed's first input (1 for a scalar)."""
    total = 0
    for feed in feeds:
        first = next(iter(feed.values()), None)
        total += int(np.shape(first)[0]) if first is not None and np.ndim(first) else 1
    return total


__all__ = [
    "ACTIVATIONS",
    "SUPPORTED",
    "Layer",
    "activation_after",
    "aliases_constant",
    "constant_aliases",
    "count_samples",
    "learnable_layers",
    "per_channel_weights",
    "quantized_so_far",
    "starting_encoding",
    "weight_readers",
]
