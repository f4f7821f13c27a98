"""Clipped activation ranges where the outputs say so: the automatic fallback's first remedy.

A min-max range spends its levels on the rarest values: one long tail and the bulk of a tensor
shares a handful of steps. Narrowing the grid (its scale times a factor, the zero point kept, so the
range shrinks around zero and zero stays a level) trades clipping the tail for finer steps. Which
factor is best for the tensor is a local question (``clip_factors``: the least expected error over the
histogram of its integers, exact semantics, every checked sample); whether clipping helps the model is
not (a global max, or an output read by a threshold, lives on its extremes), so the outputs decide
(``choose_clips``): all candidates clipped against none, then single quantizers flipped while one
buys at least ``need_db``, each answer one forward pass of a switchable model
(``qpasses.runtime.tensor_sensitivity``). Clipping costs no integer compute, unlike keeping a tensor
float; on ppocr_det and ppocr_rec it is what the keep-float search could not find (their loss is
spread over many quantizers, none buying 1 dB alone). At 8 bits a clip pays only where a few values set
the range of a large tensor (a value at twice the bulk's extent costs less than the finer steps gain
once ~1e5 values share the grid): image feature maps, not small vectors.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from qpasses.core import verification
from qpasses.data.sessions import with_outputs
from qpasses.quant.range_search import grid_error
from qpasses.runtime.parity import split_first_sample
from qpasses.runtime.tensor_sensitivity import (
    Scorer,
    SwitchableQDQ,
    activation_qdq_pairs,
    most_harmful,
    narrowed_scale,
)

FACTORS: Final = np.round(np.arange(1.0, 0.2499, -0.05), 2)
"""The narrower grids tried per tensor: scale times 1.0, 0.95, ..., 0.25."""
EXTREME_READERS: Final = frozenset({"GlobalMaxPool", "ReduceMax", "ReduceMin", "ArgMax", "ArgMin", "TopK"})
"""Ops that pick the extremes of a whole axis (the rare values clipping cuts): their inputs' ranges are
never clipped. A MaxPool window picks among a few neighbours, typical values: ppocr_det's stem MaxPool
input clipped is worth 0.004 IoU."""
_INTEGER_GRIDS: Final = frozenset({TensorProto.UINT8, TensorProto.INT8, TensorProto.UINT16, TensorProto.INT16})
MIN_GAIN: Final = 0.9
"""A factor is a candidate when its expected error is below this share of the full range's."""


@dataclass(frozen=True)
class RangeClip:
    tensor: str  # the FP32 tensor the quantizer reads
    factor: float  # the clipped grid's scale over the calibrated one (the range shrinks by it)


def clip_factor(counts: np.ndarray, qmin: int, zero_point: int) -> float:
    """The factor of ``FACTORS`` with the least expected error (tf_enhanced's: saturation weighted 3x,
    rounding noise step^2/12) for values at the levels ``qmin``, ``qmin + 1``, ... of the current grid
    with ``counts`` each (in steps of the current grid). 1.0 unless one beats it by ``1 - MIN_GAIN``."""
    total = float(counts.sum())
    if total == 0:
        return 1.0
    centers = np.arange(qmin, qmin + len(counts), dtype=np.float64) - zero_point
    offsets = np.full(len(FACTORS), float(qmin - zero_point))
    errors = grid_error(centers, counts / total, FACTORS.astype(np.float64), offsets, len(counts) - 1)
    best = int(np.argmin(errors))
    return float(FACTORS[best]) if errors[best] < MIN_GAIN * errors[0] else 1.0


def _single_samples(model: onnx.ModelProto, feeds: Sequence[Mapping[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    """The feeds one sample at a time (a feed that cannot be cut stays whole): what every activation
    costs in memory is one sample's, as in the parity check."""
    out: list[dict[str, np.ndarray]] = []
    for feed in feeds:
        rest: dict[str, np.ndarray] | None = dict(feed)
        while rest is not None:
            one, rest = split_first_sample(model, rest)
            out.append(one)
    return out


def clip_factors(model: onnx.ModelProto, feeds: Sequence[Mapping[str, np.ndarray]]) -> dict[str, float]:
    """Per activation quantizer with a per-tensor grid, the factor of its least expected error on
    ``feeds`` (exact semantics: the values the quantized model itself feeds it); factors below 1 only."""
    scales = {t.name: t for t in model.graph.initializer}
    outputs = {o.name for o in model.graph.output}
    readers: dict[str, set[str]] = {}
    for n in model.graph.node:
        for name in n.input:
            readers.setdefault(name, set()).add(n.op_type)
    grids: dict[str, tuple[str, int, int, int]] = {}  # tensor -> (Q output, qmin, levels, zero point)
    for node, dqs in activation_qdq_pairs(model):
        if len(node.input) < 3 or node.input[2] not in scales or node.input[1] not in scales:
            continue
        read = {dq.output[0] for dq in dqs}
        if read & outputs or any(readers.get(r, set()) & EXTREME_READERS for r in read):
            continue  # what the model returns, or what a max picks: its extremes are the point
        if scales[node.input[2]].data_type not in _INTEGER_GRIDS:
            continue  # 4-bit, 32-bit and float8 grids are not narrowed here
        zp = numpy_helper.to_array(scales[node.input[2]])
        if zp.ndim != 0 or numpy_helper.to_array(scales[node.input[1]]).ndim != 0:
            continue  # nor per-channel ones
        info = np.iinfo(zp.dtype)
        grids[node.input[0]] = (node.output[0], int(info.min), int(info.max) - int(info.min) + 1, int(zp))
    if not grids:
        return {}
    names = [g[0] for g in grids.values()]
    session = verification.exact_session(with_outputs(model, names))
    counts = {t: np.zeros(g[2], np.int64) for t, g in grids.items()}
    for one in _single_samples(model, feeds):
        for (tensor, (_, qmin, levels, _)), q in zip(grids.items(), session.run(names, one), strict=True):
            q = np.asarray(q).ravel()
            q = q if qmin == 0 else q.astype(np.int32) - qmin  # unsigned integers count as they are
            counts[tensor] += np.bincount(q, minlength=levels)[:levels]
    found = {t: clip_factor(counts[t], g[1], g[3]) for t, g in grids.items()}
    return {t: f for t, f in found.items() if f < 1.0}


def with_clips(model: onnx.ModelProto, clips: Mapping[str, float]) -> onnx.ModelProto:
    """A copy of the lowered ``model`` whose quantizers of ``clips`` use their narrowed grids."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    scales = {t.name: t for t in out.graph.initializer}
    for node, dqs in list(activation_qdq_pairs(out)):
        x = node.input[0]
        if x not in clips:
            continue
        name = f"{x}__clipped_scale"
        out.graph.initializer.append(narrowed_scale(scales[node.input[1]], clips[x], name))
        for user in (node, *dqs):
            user.input[1] = name
    return out


def choose_clips(
    model: onnx.ModelProto,
    reference: list[list[np.ndarray]],
    feeds: Sequence[Mapping[str, np.ndarray]],
    floor_db: float,
    need_db: float = 0.5,
    max_flips: int = 8,
    base: Sequence[float] | None = None,
) -> tuple[list[RangeClip], float | None]:
    """The clips (of ``clip_factors``' candidates) that lift the worst output SQNR vs ``reference`` on
    ``feeds``: all of them when that buys ``need_db`` over none, then, while still below ``floor_db``,
    single quantizers flipped, most helpful first (bisection), while one buys ``need_db``. A set that
    lowers any output below ``floor_db``, or one already below it further, is refused (clipping can cost
    an output that the worst one hides). When one quantizer breaks an output (a spike riding on a
    tensor), no clip moves it: the keep-float search after this one finds that quantizer. Returns
    (clips, worst SQNR with them; None when no quantizer has a candidate). ``base``: each float output's
    SQNR as the model is, when already measured on ``feeds`` (the parity check's), so it is not measured
    again."""
    factors = clip_factors(model, feeds)
    if not factors:
        return [], None
    switchable = SwitchableQDQ(model, factors)
    scorer = Scorer(reference)
    if base is None or len(base) != len(scorer.outputs):
        base = scorer.dbs(scorer.noise([switchable.run(f, []) for f in feeds]))
    keep = [min(b, floor_db) - 0.1 for b in base]  # what no output may fall below

    scores: dict[frozenset[str], float] = {}  # the bisection's last split scores the flip it ends on

    def score(on: Sequence[str]) -> float:
        key = frozenset(on)
        if key not in scores:
            dbs = scorer.dbs(scorer.noise([switchable.run(f, sorted(key)) for f in feeds]))
            ok = all(d >= k for d, k in zip(dbs, keep, strict=True))
            scores[key] = min(dbs, default=float("inf")) if ok else -np.inf
        return scores[key]

    candidates = list(switchable.tensors)
    before = min(base, default=float("inf"))
    everything = score(candidates)
    chosen, current = (set(candidates), everything) if everything >= before + need_db else (set(), before)
    for _ in range(max_flips):
        if current >= floor_db:
            break  # as the keep-float search, clipping acts until the outputs are above the floor

        def flip(group: Sequence[str], chosen: set[str] = chosen) -> float:
            return score(sorted(chosen ^ set(group)))

        flipped = most_harmful(candidates, flip, need=current + need_db)
        if flipped is None:
            break
        trial = score(sorted(chosen ^ {flipped}))
        if trial < current + need_db:
            break
        chosen, current = chosen ^ {flipped}, trial
    return [RangeClip(t, factors[t]) for t in candidates if t in chosen], current
