"""Calibrate activation encodings: run the FP32 model on the calibration data and encode each range.

Only the annotation changes (``tensor.encoding``): the graph structure and every analysis stay
valid. Encodings from a user's overrides file are kept; tensors the user pinned to float
(a float precision override) are not calibrated; an integer precision override sets the bitwidth.

``max_bytes_per_run`` caps the bytes of the activations one onnxruntime run returns (default 64 MiB;
0: no cap, one run per batch); the encodings do not depend on it (see ``qpasses.data.calibration``).

Statistics: the pass declares what it reads (``statistics``): the ranges (histograms) of the activations
the plan quantizes and the per-sample extremes of those and of the weighted layers' inputs. Asked ahead
of ``annotate-precision`` (``statistics_ahead``), when the plan is not final, it declares every float
activation the plan could quantize (``calibration_candidates``). The pass manager measures them in the
read it makes for the passes around on the same values (keep-mixed-ranges-float, seq-mse,
bias-correction), and ``run`` picks the tensors the plan quantizes from the store.

Outliers: the same pass over the data tracks each tensor's per-sample extremes (``SampleExtremes``).
When a few samples set a range more than ``OUTLIER_RATIO`` times the other samples' range beyond it
(one corrupt 1e30 in one image), a ``CalibrationOutlierWarning`` and a ``missed`` remark name the
tensors and the samples. tf/symmetric keep the true min/max (that is what they mean); percentile and
enhanced leave those samples out: a second pass, for the affected tensors only, collects their
histogram on the other samples' range (``FixedHistogramObserver``), so one value cannot stretch the
bins until every other value shares the first one, and the input channel means measured on these values
(for bias correction) are replaced by means without those samples.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Final, cast

import onnx
from numpy.typing import ArrayLike

from graph_ir import Graph
from qpasses.core.analyses import ConstantData, Shapes, TopologicalOrder
from qpasses.core.context import PassContext
from qpasses.core.errors import EncodingError, PassError
from qpasses.core.pass_base import Pass, PassResult
from qpasses.data.calibration import collect_statistics
from qpasses.data.feeds import calibration_feeds, context_feeds
from qpasses.data.sessions import unavailable_tensors
from qpasses.data.statistics import (
    ChannelMeanRequest,
    HistogramRequest,
    Measured,
    RangeRequest,
    SampleExtremesRequest,
    TensorStatistic,
    measure,
    minmax_observer,
    reject_nonfinite,
)
from qpasses.data.tensor_tap import DEFAULT_MAX_BYTES_PER_RUN
from qpasses.quant.encodings import validate_bitwidth
from qpasses.quant.encodings_file import PrecisionOverride
from qpasses.quant.live_range import clamp_range, live_interval
from qpasses.quant.plan import QuantPlan, fused_intermediates, weighted_layer_inputs
from qpasses.quant.precision_type import encoding_bitwidth
from qpasses.quant.range_search import compute
from qpasses.quant.range_statistics import (
    OUTLIER_RATIO,
    CalibrationOutlierWarning,
    ChannelMeans,
    FixedHistogramObserver,
    Outliers,
    SkipSamples,
)

__all__ = ["MODES", "Calibrate", "CalibrationOutliers", "calibration_candidates", "calibration_feeds"]

MODES: Final = ("tf", "enhanced", "percentile", "symmetric")
FEW_SAMPLES_RISK: Final = 0.01  # a quantized output's chance of clipping a new input's result, above which it is said
_HISTOGRAM_MODES: Final = ("enhanced", "percentile")


def calibration_candidates(graph: Graph, ctx: PassContext) -> list[str]:
    """Every tensor ``calibrate`` could encode, whatever the precision annotations say: the float activations
    ``build_plan`` considers (not constant, not fused into the op before, not next to Q/DQ), precisions aside."""
    shapes = ctx.get(Shapes, graph)
    fused = fused_intermediates(graph)
    qdq = {
        n
        for op in graph.ops
        if op.op_type in ("QuantizeLinear", "DequantizeLinear")
        for n in (*op.inputs, *op.outputs)
        if n
    }
    out = []
    for name, t in graph.tensors.items():
        if not name or t.is_constant or name in fused or name in qdq:
            continue
        produced = name in graph.inputs or graph.producer(name) is not None
        if produced and (t.dtype or shapes.dtype(name)) == onnx.TensorProto.FLOAT:
            out.append(name)
    return out


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
        # "tensor=factor": that tensor's grid gets its scale times the factor (0 < factor <= 1, zero
        # point kept): a range clipped around zero, as the automatic fallback chose it.
        clip: tuple[str, ...] = ()

    def _check_options(self) -> None:
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
        self._clips()

    def _clips(self) -> dict[str, float]:
        clips: dict[str, float] = {}
        for item in self.options.clip:
            name, _, value = item.rpartition("=")
            try:
                factor = float(value)
            except ValueError:
                factor = float("nan")
            if not name or not 0.0 < factor <= 1.0:
                raise PassError(f"pass 'calibrate': clip {item!r} is not tensor=factor with 0 < factor <= 1")
            clips[name] = factor
        return clips

    def _requests(self, ranged: Sequence[str], watched: Sequence[str]) -> list[TensorStatistic[Any]]:
        """Ranges (histograms in histogram modes) of ``ranged``; per-sample extremes of ``watched``."""
        o = self.options
        common: dict[str, Any] = {
            "batch_size": o.batch_size,
            "max_bytes_per_run": o.max_bytes_per_run or None,
            "progress": o.progress,
        }
        requests: list[TensorStatistic[Any]] = [
            RangeRequest(tuple(ranged), **common),
            SampleExtremesRequest(tuple(watched), **common),
        ]
        if o.mode in _HISTOGRAM_MODES:
            requests.append(HistogramRequest(tuple(ranged), **common))
        return requests

    def _bitwidths(self, graph: Graph, ctx: PassContext) -> tuple[dict[str, int], int, list[str]]:
        """Per activation to calibrate, its bitwidth; how many keep an overridden encoding; which a float
        precision override keeps float."""
        bitwidths: dict[str, int] = {}
        kept, pinned = 0, []
        for name in ctx.get(QuantPlan, graph).plan.activations:
            t = graph.tensors[name]
            if t.meta.get("encoding_source") == "override":
                kept += 1
            elif t.meta.get("encoding_bw") is not None:  # chosen by annotate-precision (qpasses.targets.precision)
                bitwidths[name] = validate_bitwidth(encoding_bitwidth(t, self.options.act_bw), "activation")
            elif isinstance(t.precision, PrecisionOverride) and t.precision.dtype == "float":
                pinned.append(name)
            else:
                bw = t.precision.bitwidth if isinstance(t.precision, PrecisionOverride) else self.options.act_bw
                bitwidths[name] = validate_bitwidth(bw, "activation")
        return bitwidths, kept, pinned

    def statistics(self, graph: Graph, ctx: PassContext) -> Sequence[TensorStatistic[Any]]:
        if ctx.calibration_data is None:
            return ()
        self._check_options()
        bitwidths = self._bitwidths(graph, ctx)[0]
        return self._requests(list(bitwidths), [*bitwidths, *weighted_layer_inputs(graph)]) if bitwidths else ()

    def statistics_ahead(self, graph: Graph, ctx: PassContext) -> Sequence[TensorStatistic[Any]]:
        # Before annotate-precision the plan is not final: every float activation it could quantize.
        if ctx.calibration_data is None:
            return ()
        self._check_options()
        candidates = calibration_candidates(graph, ctx)
        return self._requests(candidates, [*candidates, *weighted_layer_inputs(graph)])

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        o = self.options
        self._check_options()
        bitwidths, kept, pinned = self._bitwidths(graph, ctx)
        for name in pinned:
            self.remarks.analysis("not calibrated", [name], reason="precision override keeps it float")
        if not bitwidths:
            self.remarks.analysis("nothing to calibrate" + (f" (kept {kept} overridden encodings)" if kept else ""))
            return self.result(False)

        data = context_feeds(ctx, graph, o.batch_size)
        ranged, extremes, *hist = self._requests(list(bitwidths), [*bitwidths, *weighted_layer_inputs(graph)])
        stats = measure(graph, ctx, [ranged, extremes, *hist])  # measured ahead by the pass manager, or now
        ranges = dict(reject_nonfinite(stats[ranged]))  # a copy: narrowed below, the stored ranges stay
        narrowed: list[str] = []
        if not hist:  # min-max modes: ranges cut to what their readers tell apart (qpasses.quant.live_range)
            for name, r in ranges.items():
                live = live_interval(graph, name)
                cut = None if live is None else clamp_range(r.min, r.max, live)
                if cut is not None and cut != (r.min, r.max):
                    ranges[name] = r._replace(min=cut[0], max=cut[1])
                    narrowed.append(name)
        observers: dict[str, Any] = dict(stats[hist[0]]) if hist else {n: minmax_observer(r) for n, r in ranges.items()}

        found = stats[extremes]
        outliers = {n: out for n in extremes.tensors if (e := found.get(n)) and (out := e.outliers()) is not None}
        # For later steps that score on calibration batches (parity, fallback): which samples are corrupt.
        ctx.artifacts.put(CalibrationOutliers(outliers))
        model: onnx.ModelProto | None = None
        if outliers:
            self._report_outliers(graph, {n: v for n, v in outliers.items() if n in bitwidths}, o.mode)
            if o.mode in _HISTOGRAM_MODES:
                model = graph.to_onnx()
                observers.update(self._without_outliers(graph, model, data, stats, outliers, observers))

        reasons: dict[str, str] = {}
        if any(name not in observers for name in bitwidths):
            reasons = unavailable_tensors(graph.to_onnx() if model is None else model, bitwidths)
        calibrated: list[str] = []
        clips, clipped = self._clips(), []
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
            if name in clips and encoding.axis is None:
                encoding = replace(encoding, scale=tuple(s * clips[name] for s in encoding.scale))
                clipped.append(name)
            t = graph.tensors[name]
            t.encoding = encoding
            t.meta["encoding_source"] = "calibration"
            calibrated.append(name)
        if narrowed:
            self.remarks.applied(
                f"narrowed {len(narrowed)} ranges to what their readers tell apart",
                narrowed[:10],
                reason="read only by Relu/HardSwish/Clip, which give the same output beyond their constant "
                "region: the grid spends no levels there (qpasses.quant.live_range)",
            )
        if clipped:
            self.remarks.applied(
                f"clipped {len(clipped)} ranges",
                clipped[:10],
                reason="their scales times the given factors (zero points kept): finer steps for the bulk, "
                "the rarest values clipped",
            )
        self.remarks.applied(
            f"calibrated {len(calibrated)} activations ({o.mode}, {o.act_bw}-bit) on {data.num_samples} samples "
            f"in {data.num_batches} batches" + (f"; kept {kept} overridden encodings" if kept else "")
        )
        self._report_output_coverage(graph, calibrated, data.num_samples)
        # Encodings are annotations: the graph version is untouched, so the analyses stay valid.
        return self.result(bool(calibrated))

    def _report_output_coverage(self, graph: Graph, calibrated: Sequence[str], samples: int | None) -> None:
        """What the model returns, quantized to the range ``samples`` calibration samples reached: by
        exchangeability a new input's value lies beyond the largest (smallest) of n samples' with probability
        1/(n+1), and there the result itself is clipped. Said when that is over 1%."""
        outputs = [n for n in calibrated if graph.is_graph_output(n)]
        if not outputs or samples is None or samples + 1 > 1 / FEW_SAMPLES_RISK:
            return
        self.remarks.missed(
            f"outputs quantized to the range of {samples} calibration samples",
            outputs[:10],
            reason=f"about 1 in {samples + 1} new inputs gives an output beyond the largest the calibration "
            "samples gave (and as many below the smallest): it is clipped to the grid's end (dnsmos on htp, 8 "
            "clips: MOS MAE 0.73). Calibrate on more samples spanning the inputs, or give those outputs wider "
            "ranges in --overrides",
        )

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
        self,
        graph: Graph,
        model: onnx.ModelProto,
        data: Any,
        stats: Measured,
        outliers: dict[str, Outliers],
        observers: Mapping[str, Any],
    ) -> dict[str, Any]:
        """Histograms on the other samples' range, without the outlier samples (a second pass); the input
        channel means measured on these values (bias correction's) are replaced by means without them too."""
        ranged = {n: v for n, v in outliers.items() if n in observers}
        inputs = set(weighted_layer_inputs(graph))
        averaged = ChannelMeanRequest(tuple(n for n in outliers if n in inputs), batch_size=self.options.batch_size)
        stored = stats[averaged]  # only those measured already: nothing is read for them here
        fixed = {
            name: FixedHistogramObserver(found.rest_min, found.rest_max, frozenset(found.samples))
            for name, found in ranged.items()
        }
        means = {name: ChannelMeans() for name in stored}
        skipping = {name: SkipSamples(means[name], frozenset(outliers[name].samples)) for name in stored}
        collect_statistics(
            model,
            [],
            data,
            progress=self.options.progress,
            channel_means=_taps(fixed, skipping),
            max_bytes_per_run=self.options.max_bytes_per_run or None,
        )
        stats.replace(averaged, {n: m for n, m in means.items() if m.sums is not None})
        changed = sorted(name for name, obs in fixed.items() if obs.dropped)
        if changed:
            self.remarks.analysis(
                "calibration data changed between reads",
                changed,
                reason="values outside the range measured in the first read were left out",
            )
        return {name: obs.histogram for name, obs in fixed.items()}
