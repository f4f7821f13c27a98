"""Calibrate activation encodings: run the FP32 model on the calibration data and encode each range.

Only the annotation changes (``tensor.encoding``): the graph structure and every analysis stay
valid. Encodings from a user's overrides file are kept; tensors the user pinned to float
(a float precision override) are not calibrated; an integer precision override sets the bitwidth.

``max_bytes_per_run`` caps the bytes of the activations one onnxruntime run returns (default 64 MiB;
0: no cap, one run per batch); the encodings do not depend on it (see ``qpasses.data.calibration``).

Outliers: the same pass over the data tracks each tensor's per-sample extremes (``SampleExtremes``).
When a few samples set a range more than ``OUTLIER_RATIO`` times the other samples' range beyond it
(one corrupt 1e30 in one image), a ``CalibrationOutlierWarning`` and a ``missed`` remark name the
tensors and the samples. tf/symmetric keep the true min/max (that is what they mean); percentile and
enhanced leave those samples out: a second pass, for the affected tensors only, collects their
histogram on the other samples' range (``FixedHistogramObserver``), so one value cannot stretch the
bins until every other value shares the first one, and their input means for bias correction.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final, cast

import numpy as np
from numpy.typing import ArrayLike

from graph_ir import Graph
from qpasses.core.analyses import ConstantData, Shapes, TopologicalOrder
from qpasses.core.context import PassContext
from qpasses.core.errors import CalibrationDataError, EncodingError, PassError
from qpasses.core.pass_base import Pass, PassResult
from qpasses.data.calibration import collect_statistics
from qpasses.data.sessions import unavailable_tensors
from qpasses.data.sources import CalibrationData
from qpasses.data.tensor_tap import DEFAULT_MAX_BYTES_PER_RUN
from qpasses.quant.encodings import validate_bitwidth
from qpasses.quant.encodings_io import PrecisionOverride
from qpasses.quant.plan import QuantPlan, weighted_layer_inputs
from qpasses.quant.precision_type import encoding_bitwidth
from qpasses.quant.range_search import compute
from qpasses.quant.range_statistics import (
    OUTLIER_RATIO,
    CalibrationOutlierWarning,
    ChannelMeans,
    FixedHistogramObserver,
    Outliers,
    SampleExtremes,
    SkipSamples,
)

MODES: Final = ("tf", "enhanced", "percentile", "symmetric")
_HISTOGRAM_MODES: Final = ("enhanced", "percentile")


def calibration_feeds(source: Any, graph: Graph, batch_size: int) -> CalibrationData:
    """The context's calibration data as validated feeds, or a clear error when there is none."""
    if source is None:
        raise CalibrationDataError(
            "no calibration data: set PassContext.calibration_data (an iterable or callable of "
            "{input name: array} feeds, an .npz file or a QNN input list), or use --calib on the command line"
        )
    return CalibrationData.from_source(source, graph, batch_size=batch_size)


class _Taps:
    """Several observers fed every value of one tensor, through ``collect_statistics``' ``channel_means`` hook."""

    def __init__(self, *observers: Any) -> None:
        self.observers = observers

    def update(self, values: ArrayLike) -> None:
        for observer in self.observers:
            observer.update(values)


def _taps(*groups: Mapping[str, Any]) -> dict[str, ChannelMeans]:
    names = dict.fromkeys(name for group in groups for name in group)
    taps = {name: _Taps(*(group[name] for group in groups if name in group)) for name in names}
    return cast(dict[str, ChannelMeans], taps)  # anything with update(values) serves the hook


class CalibrationOutliers(dict[str, Any]):
    """Artifact: per tensor, the samples that set its range far beyond the rest (steps that score on
    calibration batches, parity and fallback, skip them)."""


@dataclass
class LayerInputMeans:
    """Artifact: per-channel means of weighted layers' inputs, measured on the graph of ``graph_version``
    (bias correction reuses them instead of reading the data again)."""

    graph_version: int
    means: dict[str, np.ndarray]


class Calibrate(Pass):
    name = "calibrate"
    description = "calibrate activation encodings on data (streaming min/max or histograms)"
    uses = (QuantPlan,)
    preserves = (TopologicalOrder, Shapes, ConstantData, QuantPlan)

    @dataclass
    class Options:
        act_bw: int = 8
        mode: str = "tf"
        percentile: float = 99.99
        batch_size: int = 16
        progress: bool = True
        max_bytes_per_run: int = DEFAULT_MAX_BYTES_PER_RUN

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        o = self.options
        if o.mode not in MODES:
            raise PassError(f"pass 'calibrate': unknown mode {o.mode!r} (expected one of {', '.join(MODES)})")
        if o.batch_size < 1:
            raise PassError(f"pass 'calibrate': batch_size must be >= 1, got {o.batch_size}")
        if not isinstance(o.max_bytes_per_run, int) or o.max_bytes_per_run < 0:
            raise PassError(f"pass 'calibrate': max_bytes_per_run must be >= 0 (0: no cap), got {o.max_bytes_per_run}")
        if o.mode == "percentile" and not 50.0 < o.percentile <= 100.0:
            raise PassError(f"pass 'calibrate': percentile must be in (50, 100], got {o.percentile}")
        validate_bitwidth(o.act_bw, "activation")
        plan = ctx.get(QuantPlan, graph).plan

        bitwidths: dict[str, int] = {}
        kept = 0
        for name in plan.activations:
            t = graph.tensors[name]
            if t.meta.get("encoding_source") == "override":
                kept += 1
            elif t.meta.get("encoding_bw") is not None:  # chosen by annotate-precision (qpasses.targets.precision)
                bitwidths[name] = validate_bitwidth(encoding_bitwidth(t, o.act_bw), "activation")
            elif isinstance(t.precision, PrecisionOverride) and t.precision.dtype == "float":
                self.remarks.analysis("not calibrated", [name], reason="precision override keeps it float")
            else:
                bw = t.precision.bitwidth if isinstance(t.precision, PrecisionOverride) else o.act_bw
                bitwidths[name] = validate_bitwidth(bw, "activation")
        if not bitwidths:
            self.remarks.analysis("nothing to calibrate" + (f" (kept {kept} overridden encodings)" if kept else ""))
            return self.result(False)

        data = calibration_feeds(ctx.calibration_data, graph, o.batch_size)
        model = graph.to_onnx()
        # Input means of weighted layers ride along for bias correction (one pass over the data:
        # a generator of feeds can only be read once).
        means = {name: ChannelMeans() for name in weighted_layer_inputs(graph)}
        extremes = {name: SampleExtremes() for name in dict.fromkeys([*bitwidths, *means])}
        observers: dict[str, Any] = collect_statistics(
            model,
            list(bitwidths),
            data,
            histogram=o.mode in _HISTOGRAM_MODES,
            progress=o.progress,
            channel_means=_taps(means, extremes),
            max_bytes_per_run=o.max_bytes_per_run or None,
        )

        outliers = {name: found for name, e in extremes.items() if (found := e.outliers()) is not None}
        # For later steps that score on calibration batches (parity, fallback): which samples are corrupt.
        ctx.artifacts.put(CalibrationOutliers(outliers))
        if outliers:
            self._report_outliers(graph, {n: v for n, v in outliers.items() if n in bitwidths}, o.mode)
            if o.mode in _HISTOGRAM_MODES:
                histograms, clean_means = self._without_outliers(
                    model,
                    data,
                    {n: v for n, v in outliers.items() if n in observers},
                    {n: v for n, v in outliers.items() if n in means},
                )
                observers.update(histograms)
                means.update(clean_means)

        ctx.artifacts.put(LayerInputMeans(graph.version, {n: m.mean for n, m in means.items() if m.mean is not None}))
        reasons = unavailable_tensors(model, bitwidths)
        calibrated: list[str] = []
        for name, bw in bitwidths.items():
            obs = observers.get(name)
            if obs is None:
                reason = reasons.get(name, "never produced a value on the calibration data (empty tensor)")
                self.remarks.missed("not calibrated", [name], reason=reason)
                continue
            try:
                encoding = compute(obs, bw, o.mode, percentile=o.percentile)
            except EncodingError as exc:
                raise EncodingError(f"activation {name}: {exc}") from None
            t = graph.tensors[name]
            t.encoding = encoding
            t.meta["encoding_source"] = "calibration"
            calibrated.append(name)
        self.remarks.applied(
            f"calibrated {len(calibrated)} activations ({o.mode}, {o.act_bw}-bit) on {data.num_samples} samples "
            f"in {data.num_batches} batches" + (f"; kept {kept} overridden encodings" if kept else "")
        )
        # Encodings are annotations: the graph version is untouched, so the analyses stay valid.
        return self.result(bool(calibrated))

    def _report_outliers(self, graph: Graph, outliers: dict[str, Outliers], mode: str) -> None:
        """One warning and one remark per set of outlier samples, naming the tensors (graph inputs first)."""
        groups: dict[tuple[int, ...], list[str]] = {}
        for name in sorted(outliers, key=lambda n: n not in graph.inputs):
            groups.setdefault(outliers[name].samples, []).append(name)
        robust = mode in _HISTOGRAM_MODES
        for samples, names in groups.items():
            shown = "; ".join(
                f"{'input ' if n in graph.inputs else ''}'{n}': {outliers[n].describe()}" for n in names[:4]
            )
            more = f"; and {len(names) - 4} more tensors" if len(names) > 4 else ""
            which = f"sample{'s' if len(samples) > 1 else ''} {', '.join(map(str, samples))}"
            effect = (
                f"{mode} leaves {'them' if len(samples) > 1 else 'it'} out of these tensors' statistics"
                if robust
                else f"{mode} keeps the full range, so every other value gets few levels: fix the "
                "data, or calibrate with mode percentile or enhanced, which leave such samples out"
            )
            reason = (
                f"{which} of the calibration data (counting from 0 in reading order) reach"
                f"{'' if len(samples) > 1 else 'es'} more than {OUTLIER_RATIO:g}x the other samples' range "
                f"beyond it: {shown}{more}; {effect}"
            )
            self.remarks.missed(
                f"calibration outlier: {which} set{'' if len(samples) > 1 else 's'} the range of {len(names)} tensors",
                names,
                reason=reason,
            )
            warnings.warn(f"calibrate: {reason}", CalibrationOutlierWarning, stacklevel=2)

    def _without_outliers(
        self, model: Any, data: CalibrationData, ranged: dict[str, Outliers], averaged: dict[str, Outliers]
    ) -> tuple[dict[str, Any], dict[str, ChannelMeans]]:
        """Histograms on the other samples' range and input means, without the outlier samples (a second pass)."""
        fixed = {
            name: FixedHistogramObserver(found.rest_min, found.rest_max, frozenset(found.samples))
            for name, found in ranged.items()
        }
        means = {name: ChannelMeans() for name in averaged}
        skipping = {name: SkipSamples(means[name], frozenset(found.samples)) for name, found in averaged.items()}
        collect_statistics(
            model,
            [],
            data,
            progress=self.options.progress,
            channel_means=_taps(fixed, skipping),
            max_bytes_per_run=self.options.max_bytes_per_run or None,
        )
        changed = sorted(name for name, obs in fixed.items() if obs.dropped)
        if changed:
            self.remarks.analysis(
                "calibration data changed between reads",
                changed,
                reason="values outside the range measured in the first read were left out",
            )
        return {name: obs.histogram for name, obs in fixed.items()}, means
