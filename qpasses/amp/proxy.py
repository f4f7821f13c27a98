"""The phase-1 proxy: how far one group alone at one candidate moves the model's outputs.

Exhaustive phase 1 calls the user's metric once per (group, lower candidate): hundreds of calls on
a detector. The proxy instead runs the simulation on a few calibration samples and measures the
SQNR of every model output against the baseline assignment's outputs (the other groups stay at
the baseline, as in phase 1). Outputs weigh the same whatever their scale: the noise-to-signal
ratios are averaged, so a box output in pixels does not drown a score output in [0, 1].

``proxy_db(reference, outputs)`` is that number (dB, higher is less sensitive; inf: no change);
``OutputSqnr`` is the callback the scorers run for phase ``"proxy"``; ``sample_feeds`` picks the
samples. How ``choose_mixed_precision`` orders phase 1 by it and where it still calls the metric:
see ``qpasses.amp.mixed_precision`` (``phase1="proxy"``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

DEFAULT_SAMPLES = 2


def sample_feeds(
    feeds: Sequence[Mapping[str, np.ndarray]], count: int, batch_dims: Mapping[str, Any]
) -> list[dict[str, np.ndarray]]:
    """The first ``count`` samples of the calibration feeds (whole feeds where the batch axis is fixed)."""
    out: list[dict[str, np.ndarray]] = []
    left = count
    for feed in feeds:
        if left <= 0:
            break
        rows = min((len(v) for v in feed.values() if np.ndim(v) > 0), default=1)
        sliceable = all(not isinstance(batch_dims.get(k), int) and np.ndim(v) > 0 for k, v in feed.items())
        if sliceable and rows > left:
            out.append({k: np.ascontiguousarray(v[:left]) for k, v in feed.items()})
            left = 0
        else:
            out.append(dict(feed))
            left -= rows
    return out


def proxy_db(reference: Sequence[Sequence[np.ndarray]], outputs: Sequence[Sequence[np.ndarray]]) -> float:
    """-10 log10(mean over float outputs of noise / signal), noise and signal summed over every run."""
    signal: dict[int, float] = {}
    noise: dict[int, float] = {}
    for ref_run, out_run in zip(reference, outputs, strict=True):
        for i, (ref, out) in enumerate(zip(ref_run, out_run, strict=True)):
            ref = np.asarray(ref)
            if not np.issubdtype(ref.dtype, np.floating):
                continue
            r = ref.astype(np.float64)
            o = np.asarray(out, np.float64)
            if not np.isfinite(o).all():
                return -math.inf
            signal[i] = signal.get(i, 0.0) + float(np.sum(r * r))
            noise[i] = noise.get(i, 0.0) + float(np.sum((r - o) ** 2))
    if not signal:
        return math.inf
    ratios = []
    for i, s in signal.items():
        n = noise[i]
        ratios.append(0.0 if n == 0.0 else (n / s if s > 0.0 else math.inf))
    mean = sum(ratios) / len(ratios)
    if mean == 0.0:
        return math.inf
    return -10.0 * math.log10(mean) if math.isfinite(mean) else -math.inf


@dataclass
class OutputSqnr:
    """The proxy as an eval callback: runs a session on ``feeds`` and compares with ``reference``."""

    feeds: Sequence[Mapping[str, np.ndarray]]
    reference: list[list[np.ndarray]] = field(default_factory=list)

    def outputs(self, session: Any) -> list[list[np.ndarray]]:
        return [list(session.run(None, dict(feed))) for feed in self.feeds]

    def __call__(self, session: Any) -> float:
        return proxy_db(self.reference, self.outputs(session))
