"""Streaming observers: constant memory, nothing dropped, same answers as one pass over all data."""

from __future__ import annotations

import numpy as np
import pytest

from qpasses.core.errors import CalibrationDataError
from qpasses.quant.range_statistics import Histogram, HistogramObserver, MinMaxObserver


def test_minmax_per_tensor_and_per_channel():
    obs = MinMaxObserver()
    obs.update([1.0, 2.0])
    obs.update(np.array([[-3.0], [0.5]]))
    obs.update(np.array([]))  # empty batches are no-ops
    assert obs.min.tolist() == [-3.0] and obs.max.tolist() == [2.0]

    per_channel = MinMaxObserver(axis=1)
    per_channel.update(np.array([[1.0, -1.0, 5.0], [2.0, -4.0, 0.0]]))
    per_channel.update(np.array([[9.0, 0.0, 1.0]]))
    assert per_channel.min.tolist() == [1.0, -4.0, 0.0]
    assert per_channel.max.tolist() == [9.0, 0.0, 5.0]
    with pytest.raises(CalibrationDataError, match="channels"):
        per_channel.update(np.ones((2, 4)))


def test_non_finite_batches_are_rejected():
    with pytest.raises(CalibrationDataError, match="NaN"):
        MinMaxObserver().update([1.0, np.inf])
    with pytest.raises(CalibrationDataError, match="NaN"):
        HistogramObserver().update([np.nan])


def test_histogram_from_values_counts_every_value():
    hist = Histogram.from_values([0.0, 1.0, 2.0, 3.0, 4.0], bins=4)
    assert hist.counts.tolist() == [1, 1, 1, 2]  # the max lands in the last bin
    assert (hist.lo, hist.width, hist.min, hist.max) == (0.0, 1.0, 0.0, 4.0)
    np.testing.assert_allclose(hist.centers, [0.5, 1.5, 2.5, 3.5])


def test_histogram_quantile_interpolates_within_bins():
    hist = Histogram.from_values(np.arange(1000) + 0.5, bins=10)  # 100 values per bin of width 99.9
    assert hist.quantile(0.5) == pytest.approx(0.5 + 999 * 0.5, abs=1e-9)
    assert hist.quantile(0.0) == 0.5 and hist.quantile(1.0) == 999.5


def test_streaming_growth_never_drops_values():
    obs = HistogramObserver(bins=64)
    sizes = 0
    for i in range(1, 30):
        batch = np.random.default_rng(i).uniform(-i, i, size=100)
        batch[0] = 10.0 * i**2  # an outlier far beyond everything seen so far
        obs.update(batch)
        sizes += batch.size
    hist = obs.histogram
    assert hist.total == sizes
    assert hist.counts.shape == (64,)
    assert hist.max == 10.0 * 29**2
    assert hist.lo <= hist.min and hist.lo + hist.width * 64 >= hist.max
    top = int((hist.max - hist.lo) // hist.width)
    assert hist.counts[top] >= 1 and hist.counts[top + 1 :].sum() == 0  # the last outlier is counted


def test_growth_merges_whole_bins_exactly():
    # Unit-width bins over [0, 4) then a value at 7.5: bins double to width 2, counts merge in pairs.
    obs = HistogramObserver(bins=4)
    obs.update([0.0, 1.5, 2.5, 3.5, 4.0])  # range [0, 4], width 1
    obs.update([7.5])
    hist = obs.histogram
    assert (hist.lo, hist.width) == (0.0, 2.0)
    assert hist.counts.tolist() == [2, 3, 0, 1]
    # Downwards: one old bin (width 2) added below, then pairs merge: [-2, 2), [2, 6), [6, 10), [10, 14).
    obs.update([-1.0])
    hist = obs.histogram
    assert (hist.lo, hist.width) == (-2.0, 4.0)
    assert hist.counts.tolist() == [3, 3, 1, 0]


def test_streaming_equals_one_shot_over_the_concatenation():
    rng = np.random.default_rng(7)
    # Batches drift outward so the range must grow many times.
    batches = [rng.normal(scale=1 + i / 5, size=5000) + (i % 3) for i in range(40)]
    everything = np.concatenate(batches)
    obs = HistogramObserver()
    for batch in batches:
        obs.update(batch)
    streamed, one_shot = obs.histogram, Histogram.from_values(everything)
    assert streamed.total == one_shot.total == everything.size
    assert (streamed.min, streamed.max) == (everything.min(), everything.max())
    tolerance = streamed.width + one_shot.width
    for q in (0.001, 0.01, 0.25, 0.5, 0.75, 0.99, 0.999):
        assert streamed.quantile(q) == pytest.approx(np.quantile(everything, q), abs=tolerance)
        assert streamed.quantile(q) == pytest.approx(one_shot.quantile(q), abs=tolerance)


def test_constant_batch_then_growth():
    obs = HistogramObserver(bins=16)
    obs.update(np.zeros(10))
    obs.update(np.array([5.0, -5.0]))
    hist = obs.histogram
    assert hist.total == 12 and (hist.min, hist.max) == (-5.0, 5.0)


def test_empty_observer_has_no_histogram():
    with pytest.raises(CalibrationDataError, match="not seen"):
        HistogramObserver().histogram  # noqa: B018
