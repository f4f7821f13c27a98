"""Calibration: run the FP32 model over the data once and stream the tensors to observe into observers.

The tensors to observe become extra graph outputs; onnxruntime keeps requested outputs intact
through its graph optimizations, so the sessions run with all of them enabled (onnxruntime's own
calibrator switches them off and runs ~2x slower). Only the observers survive a run, so memory does
not grow with the number of samples. The statistics of one run are computed in a worker thread
while onnxruntime runs the next: both release the GIL, so the two overlap.

A run keeps every requested output alive until it ends, so its memory grows with rows x observed
tensors (a YOLOv8n at 640x640 exposes ~200 MB per sample). ``max_bytes_per_run`` caps the bytes
one run may return. When the batch axis is dynamic every run covers one row (one sample): the
values then do not depend on the batch size (onnxruntime picks some kernels by batch size, and
they round differently), and a run returns the least there is to return. Each tensor's bytes per
row are estimated by shape inference at the feed's shapes (onnxruntime measures, through ``Shape``
outputs, what inference cannot tell); when one row is over the budget, the model is cut into
consecutive segments, each its own session fed with the values the earlier ones produced, so
every node still runs once per row. Cuts fall only between requested tensors and the sessions
leave out the NCHWc layout, so a segment computes bit for bit what the whole model computes. The
statistics do not depend on how the values arrive (min/max trivially; histograms sit on a grid
of power-of-two bins that depends only on the overall range, see ``GridHistogram``): the
encodings are the same for any cap and any calibration batch size.

Modules: ``sessions`` (sessions with extra outputs), ``run_segments`` (cutting a run under the byte
cap), ``tensor_tap`` (``TensorTap``: the sessions and the capped runs), ``grid_histogram`` (the
canonical histogram), ``collector`` (one read serving every statistic request), ``statistics`` (the
typed requests passes declare, and ``measure``); this module: ``collect_statistics``, the observers of
a list of tensors on a model.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import onnx

from qpasses.data.collector import collect
from qpasses.data.statistics import HistogramRequest, RangeRequest, TensorStatistic, minmax_observer, reject_nonfinite
from qpasses.data.tensor_tap import DEFAULT_MAX_BYTES_PER_RUN, Feed
from qpasses.quant.range_statistics import DEFAULT_BINS, HistogramObserver, MinMaxObserver

Observer = MinMaxObserver | HistogramObserver


def collect_statistics(
    model: onnx.ModelProto,
    tensors: Sequence[str],
    feeds: Iterable[Feed],
    *,
    histogram: bool = False,
    progress: bool = True,
    num_batches: int | None = None,
    bins: int = DEFAULT_BINS,
    overlap: bool = True,
    channel_means: Mapping[str, Any] | None = None,
    max_bytes_per_run: int | None = DEFAULT_MAX_BYTES_PER_RUN,
) -> dict[str, Observer]:
    """Per-tensor observers over all batches of ``feeds`` (dicts of input name -> batch array).

    ``histogram`` selects HistogramObserver (for enhanced / percentile modes) over MinMaxObserver;
    its grid is canonical (``GridHistogram``): more than ``bins / 2`` and at most ``bins`` bins span
    the range. ``num_batches`` caps how many batches are read (and sizes the progress bar, on stderr).
    ``overlap`` computes statistics in a worker thread while onnxruntime runs the next piece.
    ``max_bytes_per_run`` caps the bytes of the tensors one onnxruntime run returns (one row per run,
    and consecutive segments of the model when a row is over it); the observers depend neither on it
    nor on the batch size. None: one run per batch, as before the cap (memory grows with the batch,
    and the values may depend on the batch size in the last bit). Tensors that never showed a value (unknown, constant,
    always empty) are absent from the result; ``unavailable_tensors`` tells why for the first two.
    ``channel_means`` (tensor -> anything with ``update(values)``, e.g. ChannelMeans) are updated in
    place in the same pass over the data. A NaN or infinity in a tensor is a CalibrationDataError.
    """
    common: dict[str, Any] = {"batches": num_batches, "max_bytes_per_run": max_bytes_per_run, "progress": progress}
    ranges = RangeRequest(tuple(tensors), **common)
    requests: list[TensorStatistic[Any]] = [ranges]
    hist = HistogramRequest(tuple(tensors), bins=bins, **common) if histogram else None
    if hist is not None:
        requests.append(hist)
    entries = collect(
        model, feeds, requests, taps=channel_means, taps_max_bytes_per_run=max_bytes_per_run, overlap=overlap
    )
    ranged = {name: entry.value for name in ranges.tensors if (entry := entries[ranges.key(name)]).value is not None}
    found = reject_nonfinite(ranged)
    if hist is not None:
        return {name: entries[hist.key(name)].value for name in found}
    return {name: minmax_observer(r) for name, r in found.items()}
