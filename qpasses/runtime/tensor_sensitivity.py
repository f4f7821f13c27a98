"""Which activation quantizers cost an output the most: per-tensor sensitivity in one session.

Every activation Q/DQ pair of a lowered model gets a switch input ``m``: the reader sees
``x + m * (DQ(Q(x)) - x)``, so ``m = 1`` quantizes the tensor and ``m = 0`` leaves it float. One
onnxruntime session (exact semantics) then answers "only this tensor quantized" and "all but
these" with one forward pass each, instead of one lowering and session per question. With
``alternatives`` the switch chooses between two grids instead (``qpasses.runtime.range_clipping``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from qpasses.core import verification
from qpasses.data.evaluation import SHAPE_MISMATCH_DB, squared_error


def narrowed_scale(scale: onnx.TensorProto, factor: float, name: str) -> onnx.TensorProto:
    """A per-tensor scale times ``factor``, as float32 (the grid a clipped range gets)."""
    value = np.asarray(numpy_helper.to_array(scale), np.float32) * np.float32(factor)
    return numpy_helper.from_array(value.astype(np.float32), name)


@dataclass(frozen=True)
class Sensitivity:
    tensor: str  # the FP32 tensor the quantizer reads
    alone_db: float  # worst output SQNR vs FP32 with only this tensor quantized


def activation_qdq_pairs(model: onnx.ModelProto) -> Iterator[tuple[onnx.NodeProto, list[onnx.NodeProto]]]:
    """Each QuantizeLinear of a float activation (not a weight, not a conversion between two grids)
    with the DequantizeLinear nodes reading it; one per tensor."""
    g = model.graph
    constants = {t.name for t in g.initializer}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in g.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    producers = {o: n for n in g.node for o in n.output}
    seen: set[str] = set()
    for node in list(g.node):
        if node.op_type != "QuantizeLinear" or node.input[0] in constants or node.input[0] in seen:
            continue
        src = producers.get(node.input[0])
        if src is not None and src.op_type == "DequantizeLinear":
            continue  # a conversion between two grids, not a quantizer of a float tensor
        dqs = [r for r in readers.get(node.output[0], []) if r.op_type == "DequantizeLinear"]
        if dqs:
            seen.add(node.input[0])
            yield node, dqs


class SwitchableQDQ:
    """A lowered QDQ model whose activation quantizers can be switched on and off per run.

    ``alternatives`` (tensor -> factor): only those tensors get a switch, and it chooses between
    their grid (``m = 0``) and the same grid with its scale times the factor (``m = 1``; the zero
    point kept, so the range narrows around it)."""

    def __init__(self, model: onnx.ModelProto, alternatives: Mapping[str, float] | None = None) -> None:
        out = onnx.ModelProto()
        out.CopyFrom(model)
        g = out.graph
        initializers = {t.name: t for t in g.initializer}
        self.tensors: list[str] = []
        # The switch goes right after its DQ (stays sorted). Keyed by id(): every node's wrapper is held
        # alive in ``originals`` until the graph is rebuilt, so no id is reused meanwhile.
        originals = list(g.node)
        after: dict[int, list[onnx.NodeProto]] = {}
        for node, dqs in list(activation_qdq_pairs(out)):
            x = node.input[0]
            if alternatives is not None and x not in alternatives:
                continue
            switch = f"{x}__qswitch"
            self.tensors.append(x)
            g.input.append(helper.make_tensor_value_info(switch, TensorProto.FLOAT, []))
            base = x
            if alternatives is not None:  # the other grid: its own Q/DQ pair on x
                scale = f"{x}__alt_scale"
                g.initializer.append(narrowed_scale(initializers[node.input[1]], alternatives[x], scale))
                zp = node.input[2] if len(node.input) > 2 else ""
                base = f"{x}__alt"
                after[id(node)] = [
                    helper.make_node("QuantizeLinear", [x, scale, zp], [f"{x}__alt_q"]),
                    helper.make_node("DequantizeLinear", [f"{x}__alt_q", scale, zp], [base]),
                ]
            for dq in dqs:
                real = dq.output[0]
                sim = f"{real}__quantized"
                dq.output[0] = sim
                if alternatives is None:  # x + m * (DQ(Q(x)) - x)
                    first, second = x, sim
                else:  # DQ(Q(x)) + m * (alternative - DQ(Q(x)))
                    first, second = sim, base
                after.setdefault(id(dq), []).extend(
                    [
                        helper.make_node("Sub", [second, first], [f"{real}__delta"]),
                        helper.make_node("Mul", [f"{real}__delta", switch], [f"{real}__scaled"]),
                        helper.make_node("Add", [first, f"{real}__scaled"], [real]),
                    ]
                )
        nodes = [m for n in originals for m in (n, *after.get(id(n), ()))]
        del g.node[:]
        g.node.extend(nodes)
        self.model = out
        self._session = verification.exact_session(self.model) if self.tensors else None

    def run(self, feed: Mapping[str, np.ndarray], on: Sequence[str]) -> list[np.ndarray]:
        """Outputs with only the quantizers of ``on`` active."""
        assert self._session is not None
        active = set(on)
        switches = {f"{t}__qswitch": np.array(1.0 if t in active else 0.0, np.float32) for t in self.tensors}
        return self._session.run(None, {**feed, **switches})


def fallback_tensors(
    model: onnx.ModelProto,
    fp32: onnx.ModelProto,
    feeds: Sequence[Mapping[str, np.ndarray]],
    floor_db: float,
    max_tensors: int,
    before: float | None = None,
    reference: list[list[np.ndarray]] | None = None,
) -> tuple[list[Sensitivity], float, float]:
    """Greedy: keep the most harmful quantizer float until every output is above ``floor_db``.

    Each step bisects for the quantizer whose removal helps most (``most_harmful``: about log2 n
    scores instead of one per quantizer: of two halves one is run, the other's noise inferred, as
    noise powers of independent quantizers add, below the first split; a step that cannot buy 1 dB
    ends after two scores), every
    score on all of ``feeds`` (the parity check's few batches: on one batch of two samples the
    bisection followed a quantizer that bought 1 dB there and little on the rest). The one it ends
    on must buy at least 1 dB (measured, not inferred), and either lift every output above the floor or, alone, bring an
    output within 3 dB of the floor (a model whose loss comes from its weights or from many small
    errors gets none: each step would buy a little and cost integer compute without reaching the
    floor). Returns (tensors to keep in higher precision, worst SQNR before, after). ``before``: the
    all-quantized worst SQNR when already measured on these feeds (the runtime parity check's), so
    it is not measured again; ``reference``: ``fp32``'s outputs on ``feeds`` when already computed.
    """
    switchable = SwitchableQDQ(model)
    if not switchable.tensors:
        return [], float("inf"), float("inf")
    if reference is None:
        reference = reference_outputs(fp32, feeds)
    scorer = Scorer(reference)
    measured: dict[frozenset[str], np.ndarray | None] = {}  # noise per output, by the quantizers on

    def noise(on: Iterable[str]) -> np.ndarray | None:
        key = frozenset(on)
        if key not in measured:
            measured[key] = scorer.noise([switchable.run(f, sorted(on)) for f in feeds])
        return measured[key]

    def worst(on: Iterable[str]) -> float:
        return scorer.db(noise(on))

    everything = list(switchable.tensors)
    before = current = worst(everything) if before is None else before
    chosen: list[Sensitivity] = []
    while current < floor_db and len(chosen) < max_tensors:
        kept = {c.tensor for c in chosen}
        rest = [t for t in everything if t not in kept]
        if not rest:
            break
        inferred: dict[frozenset[str], np.ndarray | None] = {}

        def without_noise(group: Sequence[str], rest: list[str] = rest, inferred: dict = inferred) -> np.ndarray | None:
            on = frozenset(rest) - frozenset(group)
            return inferred[on] if on in inferred else noise(on)

        def without(group: Sequence[str]) -> float:
            return scorer.db(without_noise(group))

        def other_half(
            group: Sequence[str], half: Sequence[str], rest: list[str] = rest, inferred: dict = inferred
        ) -> float:
            # Noise powers of independent quantizers add: N(rest - B) = N(rest) + N(rest - G) - N(rest - A).
            on = frozenset(rest) - (frozenset(group) - frozenset(half))
            total, without_g, without_a = noise(rest), without_noise(group), without_noise(half)
            if total is None or without_g is None or without_a is None:
                return without([t for t in group if t not in set(half)])
            inferred[on] = np.maximum(total + without_g - without_a, without_g)  # keeping more float never adds
            return scorer.db(inferred[on])

        worst_one = most_harmful(rest, without, need=current + 1.0, other_half=other_half)
        if worst_one is None:
            break
        trial = scorer.db(noise(frozenset(rest) - {worst_one}))  # measured (the bisection may have inferred it)
        if trial < current + 1.0:
            break
        alone = Sensitivity(worst_one, worst([worst_one]))
        if alone.alone_db >= floor_db + 3.0 and trial < floor_db:
            break
        chosen.append(alone)
        current = trial
    return chosen, before, current


def reference_outputs(fp32: onnx.ModelProto, feeds: Sequence[Mapping[str, np.ndarray]]) -> list[list[np.ndarray]]:
    """The FP32 model's outputs on ``feeds``, run as the parity check runs it (default session)."""
    session = verification.runtime_session(fp32)
    return [session.run(None, dict(f)) for f in feeds]


def most_harmful(
    tensors: Sequence[str],
    without: Callable[[Sequence[str]], float],
    need: float,
    other_half: Callable[[Sequence[str], Sequence[str]], float] | None = None,
) -> str | None:
    """Bisection: of two halves, follow the one whose quantizers, kept float together, leave the
    better score (``without(group)``); the quantizer it ends on is the one costing most when one
    dominates, as a harmful quantizer does. ``2 log2 n`` scores instead of ``n``; ``log2 n`` when
    ``other_half(group, half)`` infers the second half's score from those taken (noise powers add),
    below the first split: both of its halves are scored, so a search that cannot reach ``need`` ends
    after two scores (inferred, ppocr_rec's second fallback step put a half at 21.9 dB that measured
    17.7 and bisected 11 more scores down to nothing).
    None as soon as the better half scores below ``need``: none of its members alone would reach it."""
    group = list(tensors)
    while len(group) > 1:
        half = len(group) // 2
        first, second = group[:half], group[half:]
        infer = other_half if len(group) < len(tensors) else None  # the first split: both halves scored
        scores = without(first), (without(second) if infer is None else infer(group, first))
        if max(scores) < need:
            return None
        group = first if scores[0] >= scores[1] else second
    return group[0]


class Scorer:
    """Worst pooled SQNR of float outputs vs fixed references, with the references prepared once."""

    def __init__(self, reference: list[list[np.ndarray]]) -> None:
        self.outputs = [
            j for j in range(len(reference[0])) if np.issubdtype(np.asarray(reference[0][j]).dtype, np.floating)
        ]
        self.reference = reference
        self.flat = {(b, j): np.asarray(reference[b][j]).ravel() for b in range(len(reference)) for j in self.outputs}
        self.signal = []  # per float output, over its finite values (as the noise)
        for j in self.outputs:
            flats = [self.flat[(b, j)].astype(np.float64) for b in range(len(reference))]
            self.signal.append(sum(float(f[np.isfinite(f)] @ f[np.isfinite(f)]) for f in flats))

    def noise(self, got: list[list[np.ndarray]]) -> np.ndarray | None:
        """Noise power per float output, all feeds pooled; None when an output's shape differs."""
        out = np.zeros(len(self.outputs))
        for k, j in enumerate(self.outputs):
            for b, batch in enumerate(got):
                if np.shape(batch[j]) != np.shape(self.reference[b][j]):
                    return None
                out[k] += squared_error(self.flat[(b, j)], batch[j])[0]
        return out

    def db(self, noise: np.ndarray | None) -> float:
        """The worst output's SQNR for ``noise`` (SHAPE_MISMATCH_DB for None)."""
        return min(self.dbs(noise), default=float("inf"))

    def dbs(self, noise: np.ndarray | None) -> list[float]:
        """Each float output's SQNR for ``noise`` (inf without noise; SHAPE_MISMATCH_DB for None)."""
        if noise is None:
            return [SHAPE_MISMATCH_DB] * len(self.outputs)
        return [
            float(10 * np.log10(max(self.signal[k], 1e-300) / noise[k])) if noise[k] > 0 else float("inf")
            for k in range(len(self.outputs))
        ]
