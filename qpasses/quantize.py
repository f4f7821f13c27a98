"""``quantize_model``: the whole FP32 -> QDQ flow as one call (what ``qpasses quantize`` runs).

Pipeline: inline-functions -> [user passes] -> fold-batchnorm -> [cle] -> fold-matmul-bias -> apply-overrides
-> keep-nonfinite-float -> keep-data-independent-float -> [keep-mixed-ranges-float] -> annotate-precision
-> [check-target] -> int32-overrides -> [seq-mse] -> [adascale] -> [adaround] -> encode-weights -> calibrate
-> [bias-correction] -> quantize
-> insert-converts -> [runtime-parity, with calibration data]. Every step is a registered pass, so
the same flow can be written as a pipeline string instead.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

import graph_ir
from graph_ir import Graph
from qpasses.core import verification
from qpasses.core.context import PassContext
from qpasses.core.errors import CalibrationDataError, PipelineError, QPassesError
from qpasses.core.model_checks import check_quantizable
from qpasses.core.output_dir import staged_output_dir
from qpasses.core.pass_base import Pass
from qpasses.core.pass_manager import PassManager, PassRecord, PipelineReport, Verify
from qpasses.core.pipeline import PassSpec, build_passes, parse_pipeline
from qpasses.core.registry import Registry
from qpasses.core.remarks import Remark
from qpasses.core.statistics import StatisticsCarry, StatisticsStore
from qpasses.data.evaluation import SHAPE_MISMATCH_DB
from qpasses.data.sources import CalibrationData
from qpasses.passes import default_registry
from qpasses.passes.quantize.calibrate import calibration_feeds
from qpasses.passes.quantize.runtime_parity_check import Fp32Reference
from qpasses.quant import encodings_io
from qpasses.quant.config import QuantConfig
from qpasses.quant.encodings_io import EncodingsFile
from qpasses.quant.keep_float import kept_precision
from qpasses.quantize_pipeline import QuantizeOptions, build_quantize_pipeline, default_cle, run_structural_stage
from qpasses.runtime.logit_scoring import logit_views
from qpasses.runtime.parity import ParityReport, check_feeds, feed_samples, parity_batches
from qpasses.runtime.range_clipping import RangeClip, choose_clips, with_clips
from qpasses.runtime.tensor_sensitivity import (
    Scorer,
    Sensitivity,
    SwitchableQDQ,
    fallback_tensors,
    reference_outputs,
)
from qpasses.targets import resolve_target

_SCORABLE_BYTES = 1_800_000_000  # the fallback's sessions take the model serialized, as the parity check's


@dataclass
class QuantizeResult:
    graph: Graph
    encodings: EncodingsFile
    report: PipelineReport
    config: QuantConfig
    parity: ParityReport | None = None  # the runtime parity check (None: not run)
    fallback: list[Sensitivity] = field(default_factory=list)  # tensors the automatic fallback kept higher
    clipped: list[RangeClip] = field(default_factory=list)  # activation ranges the automatic fallback clipped
    reference: onnx.ModelProto | None = field(default=None, repr=False)  # the FP32 model as loaded
    calibration: CalibrationData | None = field(default=None, repr=False)  # the run's data, read once
    target: Any = field(default=None, repr=False)  # the resolved target descriptor (None: the default)

    @property
    def model(self) -> onnx.ModelProto:
        return self.graph.to_onnx()

    def summary(self) -> str:
        entries = [*self.encodings.activations.values(), *self.encodings.params.values()]
        n_float = sum(isinstance(e, encodings_io.PrecisionOverride) for e in entries)
        n_act = sum(not isinstance(e, encodings_io.PrecisionOverride) for e in self.encodings.activations.values())
        n_par = len(entries) - n_float - n_act
        missed = [r for r in self.report.remarks if r.kind == "missed"]
        floats = f"; {n_float} tensors kept float" if n_float else ""
        if self.clipped or self.fallback:
            floats += (
                f"; auto-fallback: {len(self.clipped)} activation ranges clipped, "
                f"{len(self.fallback)} quantizers kept in higher precision"
            )
        text = (
            f"quantized {n_act} activations and {n_par} weights/biases/params "
            f"(W{self.config.weight_bw}A{self.config.act_bw}, "
            f"{'per-channel' if self.config.per_channel else 'per-tensor'}){floats}; {len(missed)} missed remarks"
        )
        return text if self.parity is None else f"{text}\n{self.parity.format()}"

    def save(self, outdir: str | os.PathLike[str], *, encodings_version: encodings_io.Version = "0.6.1") -> Path:
        """Write ``model.qdq.onnx``, ``encodings.json`` and ``report.txt`` as one set: all three
        replace the previous ones together, or (on any failure) none does."""
        with staged_output_dir(outdir) as tmp:
            graph_ir.save(self.graph, tmp / "model.qdq.onnx")
            encodings_io.save(tmp / "encodings.json", self.encodings, encodings_version)
            (tmp / "report.txt").write_text(self.report.format() + "\n" + self.summary() + "\n", encoding="utf-8")
        return Path(outdir)


def _why_nothing_quantizable(graph: Graph) -> str:
    """The likely reason a model got no encodings, for the error message."""
    from onnx import TensorProto

    from qpasses.quant.plan import COMPUTE, DATA_MOVEMENT

    types = {t.dtype for t in graph.tensors.values() if t.dtype}
    if TensorProto.FLOAT not in types and types & {TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE}:
        kinds = ", ".join(
            sorted(
                TensorProto.DataType.Name(t).lower()
                for t in types & {TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE}
            )
        )
        return (
            f"the model computes in {kinds}, and quantization starts from float32 tensors; convert the "
            "model to float32 first (e.g. onnxconverter-common's convert_float16_to_float32 / a float32 export)"
        )
    if not any(op.op_type in COMPUTE or op.op_type in DATA_MOVEMENT for op in graph.ops):
        return "the model has no op with an integer form (Conv, Gemm, MatMul, Add, ...)"
    return "every tensor was kept float (overrides, float-only target, or no calibration data for activations)"


def quantize_model(
    model: str | os.PathLike[str] | onnx.ModelProto | Graph,
    calibration_data: Any = None,
    config: QuantConfig | dict[str, Any] | None = None,
    *,
    auto_fallback: bool = True,
    sqnr_floor_db: float = 20.0,
    max_fallback_tensors: int = 8,
    fallback_batches: int = 4,
    **options: Any,
) -> QuantizeResult:
    """Quantize a model to QDQ. ``calibration_data``: iterable/callable of feed dicts, ``.npz``
    path, or QNN input-list path. Without calibration data, activations without an override stay
    float (float fallback) and only weights are quantized. Keyword options: those of
    ``quantize_once`` (overrides, pipeline, fold_batchnorm, cle, seq_mse, target, runtime_check...).

    Automatic fallback (with calibration data, unless ``auto_fallback=False``): when an output's
    SQNR vs FP32 on the parity check's calibration batches is below ``sqnr_floor_db``, first the
    activation ranges whose clipping lifts the outputs are narrowed (``qpasses.runtime.range_clipping``:
    no integer compute lost; ``result.clipped``), then, still below the floor, the activation
    quantizers costing the most (found by bisection) are kept in higher precision, at most
    ``max_fallback_tensors`` (``result.fallback``), and the model is quantized again with both.
    """
    carry = StatisticsCarry()  # the fallback's run measures what this one did: read, not measured again
    # The caller's own float tensors and clipped ranges hold in both runs; the fallback adds to them.
    user_float = tuple(options.pop("keep_float_tensors", ()))
    user_clips = dict(options.pop("clip_ranges", None) or {})
    result = quantize_once(
        model,
        calibration_data,
        config,
        keep_float_tensors=user_float,
        clip_ranges=user_clips,
        statistics_carry=carry,
        **options,
    )
    if calibration_data is None or not auto_fallback or result.reference is None:
        return result
    search_start = time.perf_counter()
    data = result.calibration  # normalised once by the first run: the second reads the same feeds
    if data is None:
        return result
    try:
        # the samples the parity check measured
        feeds = check_feeds(result.model, data, fallback_batches * int(options.get("batch_size", 16)))
    except CalibrationDataError as exc:
        result.report.add_remark("missed", "auto-fallback", "not checked", reason=str(exc))
        return result
    lowered = result.model
    if lowered.ByteSize() > _SCORABLE_BYTES:
        result.report.add_remark(
            "missed", "auto-fallback", "not checked", reason="model over 1.8 GB: its scoring sessions are not built"
        )
        return result
    measured = _parity_worst_db(result.parity, feeds)  # when the parity check measured these very batches
    if measured is not None and result.parity is not None and result.parity.batches:
        feeds, reference = result.parity.batches, result.parity.reference_outputs  # its FP32 outputs too
        outputs_db: list[float] | None = [o.exact_db for o in result.parity.outputs]
    else:
        feeds, outputs_db = parity_batches(lowered, feeds), None
        reference = reference_outputs(result.reference, feeds)
    if measured is None:  # the parity check did not run on these batches: score them here, once
        exact, scorer = verification.exact_session(lowered), Scorer(reference)
        outputs_db = scorer.dbs(scorer.noise([exact.run(None, dict(f)) for f in feeds]))
        measured = min(outputs_db, default=float("inf"))
    if measured >= sqnr_floor_db:
        return result  # nothing to localize
    if measured <= SHAPE_MISMATCH_DB:
        checked = result.parity.outputs if result.parity is not None else []
        names = [o.name for o in checked if o.exact_db <= SHAPE_MISMATCH_DB]
        result.report.add_remark(
            "missed",
            "auto-fallback",
            "not localized",
            tuple(names),
            reason="these outputs' shapes differ from FP32's on the checked batches (a data-dependent length, "
            "e.g. a decoder loop stopping at another step): SQNR cannot rank the quantizers; judge the model "
            "by its task metric (--eval) or keep tensors float with --overrides",
        )
        return result
    # Softmax outputs are ranked on their logits (``logit_scoring``): the same lift above where they are.
    fp32, scored, scored_db, floor, logits = result.reference, lowered, measured, sqnr_floor_db, ""
    views = logit_views(lowered, result.reference)
    if views is not None:
        scored, fp32 = views
        reference = reference_outputs(fp32, feeds)
        scorer = Scorer(reference)
        outputs_db = scorer.dbs(scorer.noise([verification.exact_session(scored).run(None, dict(f)) for f in feeds]))
        scored_db = min(outputs_db, default=float("inf"))
        floor = scored_db + (sqnr_floor_db - measured)
        logits = f" (ranked on the softmax outputs' logits: {scored_db:.1f} dB, target {floor:.1f} dB)"
    clips, clipped = choose_clips(scored, reference, feeds, floor, base=outputs_db)
    clipped_db = scored_db if clipped is None else clipped
    chosen: list[Sensitivity] = []
    after = clipped_db
    # On a target with no activation precision above 8 bits (HTA) nothing can be kept higher.
    higher = kept_precision(result.target)
    if clipped_db < floor and higher is not None:
        chosen, _, after = fallback_tensors(
            with_clips(scored, {c.tensor: c.factor for c in clips}),
            fp32,
            feeds,
            floor,
            max_fallback_tensors,
            before=clipped_db,
            reference=reference,
        )
    if not chosen and not clips:
        weights_db = _weights_only_db(scored, reference, feeds)
        searched = "no quantizer kept higher bought 1 dB" if higher is not None else "nothing above 8 bits on target"
        where = (
            "the loss is in the weights (--cle, --seq-mse, --adaround; per-channel weights where the target has them)"
            if weights_db < floor
            else "it is spread over many activation quantizers (--amp, --act-mode enhanced, more calibration data)"
        )
        result.report.add_remark(
            "missed",
            "auto-fallback",
            "below the floor, nothing found to lift it",
            reason=f"worst output SQNR vs FP32 {measured:.1f} dB < floor {sqnr_floor_db:g} dB on the checked "
            f"batches{logits}; no narrowed range bought 0.5 dB, {searched}. With every activation float the weights "
            f"alone give {weights_db:.1f} dB{' (logits)' if logits else ''}: {where}",
        )
        return result
    outputs = {o.name for o in result.reference.graph.output}

    def named(tensor: str) -> str:  # a graph output's quantizer reads the producer's renamed result (<name>_fp)
        return tensor[:-3] if tensor.endswith("_fp") and tensor[:-3] in outputs else tensor

    names = [named(s.tensor) for s in chosen]
    again = quantize_once(
        model,
        data,
        config,
        keep_float_tensors=[*user_float, *names],
        clip_ranges={**{named(c.tensor): c.factor for c in clips}, **user_clips},
        statistics_carry=carry,
        structural_verified=True,
        **options,
    )
    again.fallback, again.clipped = chosen, clips
    remarks: list[Remark] = []
    if clips:
        remarks.append(
            Remark(
                "applied",
                "auto-fallback",
                f"clipped {len(clips)} activation ranges",
                tuple(named(c.tensor) for c in clips),
                reason=f"worst output SQNR vs FP32 {measured:.1f} dB < floor {sqnr_floor_db:g} dB{logits}; with these "
                f"ranges narrowed (each to its least expected error; factors {min(c.factor for c in clips):.2f}-"
                f"{max(c.factor for c in clips):.2f}) {clipped_db:.1f} dB predicted",
            )
        )
    if chosen:
        detail = ", ".join(f"{n} (alone {s.alone_db:.1f} dB)" for n, s in zip(names, chosen, strict=True))
        remarks.append(
            Remark(
                "applied",
                "auto-fallback",
                f"kept {len(names)} tensors in higher precision",
                tuple(names),
                reason=f"worst output SQNR vs FP32 {measured:.1f} dB < floor {sqnr_floor_db:g} dB{logits}; "
                f"{'with the ranges clipped ' if clips else ''}{clipped_db:.1f} -> {after:.1f} dB predicted: {detail}",
            )
        )
    # What the fallback cost on top of the first run: its scoring and the second run.
    again.report.records.append(PassRecord("auto-fallback", True, time.perf_counter() - search_start, remarks))
    return again


def _weights_only_db(
    model: onnx.ModelProto, reference: list[list[np.ndarray]], feeds: Sequence[Mapping[str, np.ndarray]]
) -> float:
    """The worst output's SQNR vs FP32 of ``model`` with every activation quantizer off (its weights' share)."""
    switchable, scorer = SwitchableQDQ(model), Scorer(reference)
    if not switchable.tensors:
        return scorer.db(scorer.noise([verification.exact_session(model).run(None, dict(f)) for f in feeds]))
    return scorer.db(scorer.noise([switchable.run(f, []) for f in feeds]))


def _parity_worst_db(parity: ParityReport | None, feeds: list[dict[str, np.ndarray]]) -> float | None:
    """The worst float output's SQNR vs FP32 (exact semantics) the parity check measured, when it ran
    on exactly ``feeds`` (the first calibration batches); None when it did not."""
    if parity is None or parity.reference != "FP32" or not parity.outputs:
        return None
    samples = sum(feed_samples(f) for f in feeds)
    return min(o.exact_db for o in parity.outputs) if samples == parity.samples else None


def _first_sample(model: onnx.ModelProto, data: Any) -> list[dict[str, np.ndarray]]:
    """The calibration data's first sample (its first feed whole when that cannot be cut; none when the
    data cannot give one)."""
    try:
        return check_feeds(model, data, 1)
    except CalibrationDataError:
        return []


def quantize_once(
    model: str | os.PathLike[str] | onnx.ModelProto | Graph,
    calibration_data: Any = None,
    config: QuantConfig | dict[str, Any] | None = None,
    *,
    overrides: str | os.PathLike[str] | None = None,
    pipeline: str | Sequence[PassSpec] | Sequence[Pass] | None = None,
    fold_batchnorm: bool = True,
    fold_matmul_bias: bool = True,
    cle: bool | None = None,
    seq_mse: bool = False,
    bias_correction: bool | None = None,
    seq_mse_options: dict[str, Any] | None = None,
    adaround: bool = False,
    adaround_options: dict[str, Any] | None = None,
    adascale: bool = False,
    adascale_options: dict[str, Any] | None = None,
    target: Any = None,
    batch_size: int = 16,
    progress: bool = True,
    verify: Verify = "numeric",
    registry: Registry | None = None,
    runtime_check: bool = True,
    keep_float_tensors: Sequence[str] = (),
    clip_ranges: Mapping[str, float] | None = None,
    extensions: dict[str, Sequence[PassSpec]] | None = None,
    seed: int = 0,
    statistics_carry: StatisticsCarry | None = None,
    structural_verified: bool = False,
    quantize_outputs: bool = False,
) -> QuantizeResult:
    """One pass of the quantization flow (``quantize_model`` adds the automatic fallback).
    ``seq_mse`` searches the weight encodings on the calibration data first (options of the
    ``seq-mse`` pass in ``seq_mse_options``). ``runtime_check`` (with calibration data) runs the
    final model in onnxruntime's default session and with exact QDQ semantics on a few calibration
    batches (``result.parity``). ``keep_float_tensors`` stay float (int16 on quantized-only targets).
    ``clip_ranges`` (tensor -> factor in (0, 1]): those activations' calibrated scales times the factor.
    ``extensions`` adds passes at a stage's extension point (``qpasses.quantize_pipeline.STAGES``).
    ``seed`` seeds what passes draw at random (AdaRound/AdaScale batch order).
    ``fold_matmul_bias=False`` keeps each MatMul and its bias Add apart (``fold-matmul-bias`` off: the
    exporter's tensor names, e.g. for encodings another tool matches by name).
    ``quantize_outputs``: quantize the model's outputs and the heads writing them too (by default they
    stay float: ``keep-output-heads-float``).
    ``cle``: cross-layer equalization; None: on where the target quantizes weights per tensor (``default_cle``).
    ``statistics_carry``: statistics an earlier run on the same calibration data measured, by graph
    state (``quantize_model``'s fallback run reads the first run's); this run's are added to it.
    ``structural_verified``: an earlier run verified this model's structural stage numerically (the same
    passes on the same model and data rebuild it identically): here it is checked with onnx.checker only.
    The flow itself is ``build_quantize_pipeline``'s.
    """
    if seq_mse and calibration_data is None:
        raise QPassesError("SeqMSE needs calibration data: pass calibration_data (or --calib), or drop seq_mse")
    for flag, on in (("adaround", adaround), ("adascale", adascale)):
        if on and calibration_data is None:
            raise QPassesError(f"{flag} learns on calibration data: pass calibration_data (or --calib), or drop {flag}")
    if isinstance(config, dict):
        config = QuantConfig.from_dict(config)
    config = config or QuantConfig()
    registry = registry or default_registry()
    target = resolve_target(target, registry)
    cle_by_default = cle is None and default_cle(target)
    cle = cle_by_default if cle is None else cle
    graph = model.copy() if isinstance(model, Graph) else graph_ir.load(model)
    check_quantizable(graph, str(model) if isinstance(model, (str, os.PathLike)) else None)

    user_specs: list[PassSpec] = []
    user_objects: list[Pass] = []
    if pipeline:
        if isinstance(pipeline, str):
            user_specs = parse_pipeline(pipeline)
        else:
            user_specs = [p for p in pipeline if isinstance(p, PassSpec)]
            user_objects = [p for p in pipeline if isinstance(p, Pass)]
            if len(user_specs) != len(pipeline) and len(user_objects) != len(pipeline):
                odd = next((p for p in pipeline if not isinstance(p, (PassSpec, Pass))), None)
                raise PipelineError(
                    "pipeline: a string, or a list of PassSpec or of Pass objects (not mixed)"
                    + ("" if odd is None else f"; got {type(odd).__name__} {odd!r}")
                )
    flow = build_quantize_pipeline(
        config,
        QuantizeOptions(
            calibrated=calibration_data is not None,
            overrides=str(overrides) if overrides is not None else None,
            fold_batchnorm=fold_batchnorm,
            fold_matmul_bias=fold_matmul_bias,
            cle=cle,
            seq_mse=seq_mse,
            seq_mse_options=seq_mse_options or {},
            adaround=adaround,
            adaround_options=adaround_options or {},
            adascale=adascale,
            adascale_options=adascale_options or {},
            bias_correction=bias_correction,
            target_given=target is not None,
            batch_size=batch_size,
            progress=progress,
            runtime_check=runtime_check,
            keep_float_tensors=tuple(keep_float_tensors),
            clip_ranges=dict(clip_ranges or {}),
            quantize_outputs=quantize_outputs,
        ),
        user_passes=user_specs,
        extensions=extensions,
    )
    if calibration_data is not None:  # validated and normalised once; every pass reads this object
        calibration_data = calibration_feeds(calibration_data, graph, batch_size)
    ctx = PassContext(target=target, calibration_data=calibration_data, seed=seed)
    if statistics_carry is not None and calibration_data is not None and statistics_carry.serves(calibration_data):
        ctx.statistics = StatisticsStore(statistics_carry)
    if calibration_data is not None:
        fp32 = graph.to_onnx()
        ctx.artifacts.put(Fp32Reference(fp32, ctx.statistics.results(graph)))
        # Passes are verified on a real sample first (real shapes, valid ids), random inputs when it cannot run.
        ctx.verification_source = lambda: _first_sample(fp32, calibration_data)
    # Pass objects given directly run right after inline-functions.
    report = run_structural_stage(
        graph,
        ctx,
        flow,
        registry,
        overrides=overrides,
        verify="checker" if structural_verified and verify == "numeric" else verify,
        user_objects=user_objects,
    )
    if cle_by_default:
        report.add_remark(
            "applied",
            "cle",
            "cross-layer equalization on by default",
            reason=f"target {target.name} quantizes weights per tensor: CLE evens out the channels' ranges "
            "(FP32-exact); --no-cle / cle=False turns it off",
        )
    passes = build_passes(flow.main, registry)
    report.records += PassManager(passes, verify=verify).run(graph, ctx).records
    encodings = ctx.artifacts.get(EncodingsFile)
    if encodings is None or not (encodings.activations or encodings.params):
        raise QPassesError(f"nothing was quantized: {_why_nothing_quantizable(graph)}")
    reference = ctx.artifacts.get(Fp32Reference)
    return QuantizeResult(
        graph,
        encodings,
        report,
        config,
        ctx.artifacts.get(ParityReport),
        reference=None if reference is None else reference.model,
        calibration=calibration_data,
        target=target,
    )
