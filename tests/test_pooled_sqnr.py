"""Pooled SQNR over batches (the parity check's and the fallback's score): the float32 fast path agrees
with a float64 computation written out here, non-finite positions are left out, overflow is handled."""

from __future__ import annotations

import math

import numpy as np
import pytest

from qpasses.data.evaluation import SHAPE_MISMATCH_DB, pooled_sqnr_db, squared_error


def _float64_db(reference: list[np.ndarray], test: list[np.ndarray]) -> float:
    r = np.concatenate([np.asarray(x, np.float64).ravel() for x in reference])
    t = np.concatenate([np.asarray(x, np.float64).ravel() for x in test])
    keep = np.isfinite(r) & np.isfinite(t)
    return 10 * math.log10(np.sum(r[keep] ** 2) / np.sum((r[keep] - t[keep]) ** 2))


def test_float32_batches_match_float64() -> None:
    rng = np.random.default_rng(0)
    reference = [rng.standard_normal((n, 6625)).astype(np.float32) for n in (1, 3, 4)]
    test = [(r + 0.05 * rng.standard_normal(r.shape)).astype(np.float32) for r in reference]
    assert pooled_sqnr_db(reference, test) == pytest.approx(_float64_db(reference, test), abs=1e-4)


def test_non_finite_positions_are_left_out() -> None:
    reference = np.array([1.0, -2.0, np.inf, 4.0, np.nan], np.float32)
    test = np.array([1.5, -2.0, np.inf, 3.0, 7.0], np.float32)
    noise, signal = squared_error(reference, test)
    assert (noise, signal) == (0.25 + 1.0, 1.0 + 4.0 + 16.0)
    assert pooled_sqnr_db([reference], [test]) == pytest.approx(10 * math.log10(21.0 / 1.25))


def test_float32_overflow_is_summed_in_float64() -> None:
    reference = np.array([3e20, 1.0], np.float32)  # squares overflow float32
    test = np.array([3e20, 2.0], np.float32)
    assert squared_error(reference, test) == (1.0, pytest.approx(9e40 + 1.0, rel=1e-6))


def test_mixed_dtypes_and_shape_mismatch() -> None:
    reference = [np.arange(6, dtype=np.float64).reshape(2, 3)]
    test = [np.arange(6, dtype=np.float32).reshape(2, 3) + 1]
    assert pooled_sqnr_db(reference, test) == pytest.approx(10 * math.log10(55.0 / 6.0))
    assert pooled_sqnr_db(reference, [np.zeros((3, 2))]) == SHAPE_MISMATCH_DB
    assert pooled_sqnr_db(reference, reference) == math.inf
