"""Clipped activation ranges where the outputs say so: the automatic fallback's first remedy.

A min-max range spends its levels on the rarest values: one long tail and the bulk of a tensor
shares a handful of steps. Narrowing the grid (its scale times a factor, the zero point kept, so the
range shrinks around zero and zero stays a level) trades clipping the tail for finer steps. Which
factor is best for the tensor is a local question (``clip_factors``: the least squared error over the
histogram of its integers, exact semantics, every checked sample); whether clipping helps the model is
not (a max-pooling or a detection head lives on the extremes), so the outputs decide
(``choose_clips``): all candidates clipped against none, then single quantizers flipped while one
buys at least ``need_db``, each answer one forward pass of a switchable model
(``qpasses.runtime.tensor_sensitivity``). Clipping costs no integer compute, unlike keeping a tensor
float; on ppocr_det and ppocr_rec it is what the keep-float search could not find (their loss is
spread over many quantizers, none buying 1 dB alone).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final

import numpy as np
import onnx
from onnx import numpy_helper

from qpasses.core import verification
from qpasses.data.sessions import with_outputs
from qpasses.runtime.parity import split_first_sample
from qpasses.runtime.tensor_sensitivity import (
    Scorer,
    SwitchableQDQ,
    activation_quantizers,
    most_harmful,
    narrowed_scale,
)

FACTORS: Final = np.round(np.arange(1.0, 0.2499, -0.05), 2)
"""The narrower grids tried per tensor: scale times 1.0, 0.95, ..., 0.25."""
MIN_GAIN: Final = 0.9
"""A factor is a candidate when its squared error is below this share of the full range's."""


@dataclass(frozen=True)
class RangeClip:
    tensor: str  # the FP32 tensor the quantizer reads
    factor: float  # the clipped grid's scale over the calibrated one (the range shrinks by it)


def clip_factor(counts: np.ndarray, qmin: int, zero_point: int) -> float:
    """The factor of ``FACTORS`` with the least squared error for values whose integers on the current
    grid (levels ``qmin``, ``qmin + 1``, ... with ``counts`` each) are spread uniformly over their step
    (the step itself is 1 here: errors scale with it). 1.0 unless one beats it by ``1 - MIN_GAIN``."""
    levels = np.arange(qmin, qmin + len(counts), dtype=np.float64) - zero_point  # values in steps
    lo, hi = levels[0], levels[-1]
    total = float(counts.sum())
    if total == 0:
        return 1.0
    errors = []
    for f in FACTORS:
        outside = np.clip(levels, f * lo, f * hi) - levels
        # inside: re-rounded onto the finer step f (variance f^2/12); outside: the clip, plus the
        # spread within the old step (1/12)
        inside = outside == 0
        err = np.where(inside, f * f / 12.0, outside * outside + 1.0 / 12.0)
        errors.append(float(counts @ err) / total)
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
    """Per activation quantizer with a per-tensor grid, the factor of its least squared error on
    ``feeds`` (exact semantics: the values the quantized model itself feeds it); factors below 1 only."""
    scales = {t.name: t for t in model.graph.initializer}
    grids: dict[str, tuple[str, int, int, int]] = {}  # tensor -> (Q output, qmin, levels, zero point)
    for node, _ in activation_quantizers(model):
        if len(node.input) < 3 or node.input[2] not in scales or node.input[1] not in scales:
            continue
        zp = numpy_helper.to_array(scales[node.input[2]])
        if zp.ndim != 0 or numpy_helper.to_array(scales[node.input[1]]).ndim != 0 or zp.dtype.itemsize > 2:
            continue  # per-channel grids and 32-bit ones are not narrowed here
        info = np.iinfo(zp.dtype)
        grids[node.input[0]] = (node.output[0], int(info.min), int(info.max) - int(info.min) + 1, int(zp))
    if not grids:
        return {}
    names = [g[0] for g in grids.values()]
    session = verification.exact_session(with_outputs(model, names))
    counts = {t: np.zeros(g[2], np.int64) for t, g in grids.items()}
    for one in _single_samples(model, feeds):
        for (tensor, (_, qmin, levels, _)), q in zip(grids.items(), session.run(names, one), strict=True):
            counts[tensor] += np.bincount(np.asarray(q, np.int64).ravel() - qmin, minlength=levels)[:levels]
    found = {t: clip_factor(counts[t], g[1], g[3]) for t, g in grids.items()}
    return {t: f for t, f in found.items() if f < 1.0}


def with_clips(model: onnx.ModelProto, clips: Mapping[str, float]) -> onnx.ModelProto:
    """A copy of the lowered ``model`` whose quantizers of ``clips`` use their narrowed grids."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    scales = {t.name: t for t in out.graph.initializer}
    for node, dqs in list(activation_quantizers(out)):
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
    before: float,
    need_db: float = 0.5,
    max_flips: int = 8,
) -> tuple[list[RangeClip], float]:
    """The clips (of ``clip_factors``' candidates) that lift the worst output SQNR vs ``reference`` on
    ``feeds`` (``before``: the model's as it is): all of them when that buys ``need_db`` over none,
    then single quantizers flipped, most helpful first (bisection), while one buys ``need_db``. When
    one quantizer breaks an output (a spike riding on a tensor), no clip moves it: the keep-float
    search after this one finds that quantizer. Returns (clips, worst SQNR with them)."""
    factors = clip_factors(model, feeds)
    if not factors:
        return [], before
    switchable = SwitchableQDQ(model, factors)
    scorer = Scorer(reference)

    def score(on: Sequence[str]) -> float:
        return scorer.db(scorer.noise([switchable.run(f, on) for f in feeds]))

    candidates = list(switchable.tensors)
    everything = score(candidates)
    chosen, current = (set(candidates), everything) if everything >= before + need_db else (set(), before)
    for _ in range(max_flips):

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
