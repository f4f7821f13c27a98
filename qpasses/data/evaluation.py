"""Quick quality report of a quantized model: top-1 (when labels exist) and SQNR vs FP32."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from numpy.typing import ArrayLike

from qpasses.core import verification
from qpasses.core.errors import CalibrationDataError


@dataclass(frozen=True)
class QualityReport:
    """Figures in both onnxruntime modes: exact QDQ semantics and the default (fused) session."""

    samples: int
    sqnr_db: list[float]  # per graph output, exact QDQ semantics
    top1_fp32: float | None = None
    top1_quantized: float | None = None
    runtime_sqnr_db: list[float] | None = None  # the default session, as users run it
    runtime_top1: float | None = None

    def format(self) -> str:
        def pair(exact: str, runtime: str | None) -> str:
            return exact if runtime is None else f"{exact} exact QDQ / {runtime} onnxruntime default session"

        runtime = None if self.runtime_sqnr_db is None else ", ".join(f"{s:.2f} dB" for s in self.runtime_sqnr_db)
        parts = [
            f"evaluated on {self.samples} samples: SQNR vs FP32 "
            + pair(", ".join(f"{s:.2f} dB" for s in self.sqnr_db), runtime)
        ]
        if self.top1_fp32 is not None:
            top1 = None if self.runtime_top1 is None else f"{self.runtime_top1:.4f}"
            parts.append(f"top-1 FP32 {self.top1_fp32:.4f} -> quantized {pair(f'{self.top1_quantized:.4f}', top1)}")
        return "; ".join(parts)


def sqnr_db(reference: np.ndarray, test: np.ndarray) -> float:
    noise = np.sum((reference.astype(np.float64) - test) ** 2)
    signal = np.sum(reference.astype(np.float64) ** 2)
    return float("inf") if noise == 0 else float(10 * np.log10(signal / noise))


# What an output whose shape differs from the reference's scores (a decoder Loop that stopped at
# another step): far below any real SQNR, yet finite so searches can still compare.
SHAPE_MISMATCH_DB = -100.0


def squared_error(reference: ArrayLike, test: ArrayLike) -> tuple[float, float]:
    """(sum of squared differences, sum of squared reference values) where both are finite. In one
    float32 pass when both are float32 and no sum overflows (PP-OCR rec's 6625-class outputs: a float64
    copy, a concatenation and a mask cost more than the session run), else in float64."""
    r, t = np.asarray(reference).ravel(), np.asarray(test).ravel()
    if r.dtype == t.dtype == np.float32:
        with np.errstate(over="ignore", invalid="ignore"):  # a NaN, inf or overflow shows in the sums
            d = t - r
            noise, signal = float(d @ d), float(r @ r)
        if math.isfinite(noise) and math.isfinite(signal):
            return noise, signal
    r64, t64 = r.astype(np.float64), t.astype(np.float64)
    finite = np.isfinite(r64) & np.isfinite(t64)
    d64, kept = r64[finite] - t64[finite], r64[finite]
    return float(d64 @ d64), float(kept @ kept)


def pooled_sqnr_db(reference: list[np.ndarray], test: list[np.ndarray]) -> float:
    """SQNR over batches pooled, finite values only; ``SHAPE_MISMATCH_DB`` when shapes differ."""
    if len(reference) != len(test) or any(np.shape(r) != np.shape(t) for r, t in zip(reference, test, strict=True)):
        return SHAPE_MISMATCH_DB
    noise = signal = 0.0
    for r, t in zip(reference, test, strict=True):
        n, s = squared_error(r, t)
        noise, signal = noise + n, signal + s
    return float("inf") if noise == 0 else float(10 * np.log10(signal / noise))


def evaluate_npz(fp32: onnx.ModelProto, quantized: onnx.ModelProto, path: str | Path) -> QualityReport:
    """Run both models on an .npz (arrays keyed by input name, optional ``labels``)."""
    from qpasses.data.input_specs import input_specs, validate_feed

    try:
        data = np.load(path, allow_pickle=False)
        arrays = {k: data[k] for k in data.files}
    except (OSError, ValueError, EOFError) as exc:
        raise CalibrationDataError(f"cannot read evaluation data {path}: {exc}") from None
    specs = input_specs(fp32)
    names = [s.name for s in specs]
    missing = [n for n in names if n not in arrays]
    if missing:
        raise CalibrationDataError(
            f"evaluation data {path} has no array for input(s) {missing} (arrays: {sorted(arrays)})"
        )
    feeds = dict(validate_feed({n: arrays[n] for n in names}, specs, f"evaluation data {path}"))
    samples = len(next(iter(feeds.values()))) if feeds and np.ndim(next(iter(feeds.values()))) else 0
    if samples == 0:
        raise CalibrationDataError(f"evaluation data {path} holds no samples")
    labels = arrays.get("labels")
    if labels is not None and (
        labels.ndim != 1 or len(labels) != samples or not np.issubdtype(labels.dtype, np.integer)
    ):
        raise CalibrationDataError(
            f"evaluation data {path}: 'labels' must be {samples} integers (one per sample), "
            f"got {labels.dtype} {list(labels.shape)}"
        )
    ref = verification.session(fp32).run(None, feeds)
    exact = verification.exact_session(quantized).run(None, feeds)
    runtime = verification.runtime_session(quantized).run(None, feeds)
    sqnr = [sqnr_db(r, g) for r, g in zip(ref, exact, strict=True)]
    runtime_sqnr = [sqnr_db(r, g) for r, g in zip(ref, runtime, strict=True)]
    if labels is not None and ref[0].ndim == 2:

        def top1(logits: np.ndarray) -> float:
            return float(np.mean(logits.argmax(1) == labels))

        return QualityReport(samples, sqnr, top1(ref[0]), top1(exact[0]), runtime_sqnr, top1(runtime[0]))
    return QualityReport(samples, sqnr, runtime_sqnr_db=runtime_sqnr)
