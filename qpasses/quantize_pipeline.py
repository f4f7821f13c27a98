"""The default quantization pipeline as data: named stages of pass specs, with extension points.

``quantize_model``, the CLI and ``--print-pipeline`` all take it from ``build_quantize_pipeline``,
so the flow is written once. Stages run in order; a user's passes go into any stage's extension
point (after that stage's own passes). The ``structural`` stage runs as its own pass manager first:
an overrides file may name tensors its passes create (the biases batch-norm folding adds).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from graph_ir import Graph
from qpasses.core.context import PassContext
from qpasses.core.pass_base import Pass
from qpasses.core.pass_manager import PassManager, PipelineReport, Verify
from qpasses.core.pipeline import PassSpec, build_passes
from qpasses.core.registry import Registry
from qpasses.passes.quantize.apply_overrides import Overrides, tensor_specs
from qpasses.quant import encodings_io
from qpasses.quant.config import QuantConfig

STAGES = ("structural", "annotate", "encode", "calibrate", "lower", "check")


@dataclass(frozen=True)
class QuantizeOptions:
    """Everything besides the bitwidths/modes (``QuantConfig``) that shapes the pipeline."""

    calibrated: bool = True
    overrides: str | None = None  # an overrides/encodings file applied after the structural stage
    fold_batchnorm: bool = True
    fold_matmul_bias: bool = True  # MatMul + bias Add -> Gemm (off: keep the exporter's MatMul/Add tensor names)
    cle: bool = False
    seq_mse: bool = False
    seq_mse_options: Mapping[str, Any] = field(default_factory=dict)
    adaround: bool = False
    adaround_options: Mapping[str, Any] = field(default_factory=dict)
    adascale: bool = False
    adascale_options: Mapping[str, Any] = field(default_factory=dict)
    bias_correction: bool | None = None  # None: on with calibration data unless seq_mse/adaround/adascale
    target_given: bool = False
    batch_size: int = 16
    progress: bool = True
    runtime_check: bool = True
    keep_float_tensors: Sequence[str] = ()
    clip_ranges: Mapping[str, float] = field(default_factory=dict)  # tensor -> factor on its calibrated scale
    quantize_outputs: bool = False  # True: outputs and their heads are quantized too (keep-output-heads-float off)


def default_cle(target: Any) -> bool:
    """CLE by default where the target quantizes weights per tensor (hta): one grid per weight tensor
    leaves a layer's small output channels a few levels, which CLE evens out (FP32-exact). On hta:
    open_nsfw P(nsfw) MAE 0.0044 -> 0.0026, dnsmos_p808 MOS MAE 0.0196 -> 0.0123, ppocr_det IoU 0.963 ->
    0.969, ppocr_rec 0.848 -> 0.858; slanet_plus 0.695 -> 0.669 (its depthwise layers cannot be rescaled
    across their HardSwish)."""
    return bool(target is not None and getattr(target, "runs_integer", False) and not target.per_channel_weights)


@dataclass(frozen=True)
class QuantizePipeline:
    stages: dict[str, list[PassSpec]]

    @property
    def structural(self) -> list[PassSpec]:
        return self.stages["structural"]

    @property
    def main(self) -> list[PassSpec]:
        return [spec for stage in STAGES[1:] for spec in self.stages[stage]]

    def text(self) -> str:
        """The pipeline as one ``qpasses run --pipeline`` string."""
        return format_pipeline([*self.structural, *self.main])


def build_quantize_pipeline(
    config: QuantConfig,
    options: QuantizeOptions = QuantizeOptions(),
    *,
    user_passes: Sequence[PassSpec] = (),
    extensions: Mapping[str, Sequence[PassSpec]] | None = None,
) -> QuantizePipeline:
    """The default flow for ``config``; ``user_passes`` run right after ``inline-functions``;
    ``extensions`` maps a stage name to passes appended to it."""
    o = options
    c = config
    stages: dict[str, list[PassSpec]] = {s: [] for s in STAGES}
    # Ops inside model-local functions are invisible to every pass: inline them first.
    stages["structural"] += [PassSpec("inline-functions"), *user_passes]
    # Identity ops and no-op Casts would each get a quantizer, and hide shared weights from their readers.
    stages["structural"].append(PassSpec("remove-identity"))
    # Layout Transposes between a Conv and its per-channel constants move below them (FP32-exact),
    stages["structural"].append(PassSpec("sink-transposes"))
    # so a bias / batch norm the exporter writes as Add/Sub/Mul/Div joins the Conv (int32 bias, one
    # output encoding); before BN folding.
    stages["structural"].append(PassSpec("fold-channel-affine"))
    if o.fold_batchnorm:
        stages["structural"].append(PassSpec("fold-batchnorm"))
    if o.cle:
        stages["structural"].append(PassSpec("cle"))
    if o.fold_matmul_bias:
        # A MatMul's bias Add joins it as a Gemm: one output rounding, an int32 bias (after CLE, which pairs MatMuls).
        stages["structural"].append(PassSpec("fold-matmul-bias"))
    annotate = stages["annotate"]
    if o.overrides is not None:
        annotate.append(PassSpec("apply-overrides", {"path": str(o.overrides)}))
    # Tensors 8 bits cannot carry stay float (int16 on quantized-only targets); user overrides win.
    annotate += [
        PassSpec("keep-nonfinite-float"),
        PassSpec("keep-log-domain-inputs-float"),
        PassSpec("keep-data-independent-float"),
        PassSpec("keep-decomposed-blocks-float"),
        PassSpec("keep-normalization-inputs-float"),
        PassSpec("keep-softmax-inputs-float"),
    ]
    if o.calibrated:
        if not o.quantize_outputs:
            # What the model returns: not clipped to the calibration range, probabilities not rounded.
            annotate.append(PassSpec("keep-output-heads-float"))
        annotate.append(PassSpec("keep-mixed-ranges-float", {"act_bw": c.act_bw, "batch_size": o.batch_size}))
        annotate.append(PassSpec("keep-depthwise-inputs-float", {"act_bw": c.act_bw, "batch_size": o.batch_size}))
        # Targets whose integer kernels are Conv/Gemm/MatMul alone: quantizers only where those read or write.
        annotate.append(PassSpec("keep-non-mac-activations-float", {"keep_outputs": o.quantize_outputs}))
    if o.keep_float_tensors:
        annotate.append(
            PassSpec(
                "keep-float",
                {
                    "tensors": "|".join(o.keep_float_tensors),
                    "reason": "automatic fallback: this quantizer cost an output most",
                },
            )
        )
    annotate.append(
        PassSpec(
            "annotate-precision",
            {
                "act_bw": c.act_bw,
                "weight_bw": c.weight_bw,
                "bias_bw": c.bias_bw,
                "float_bw": c.float_bw,
                "float_bias_bw": c.float_bias_bw,
                "calibrated": o.calibrated,
            },
        )
    )
    if o.target_given:
        annotate.append(PassSpec("check-target"))
    annotate.append(PassSpec("int32-overrides"))
    encode = stages["encode"]
    if o.seq_mse:
        # Before encode-weights, which keeps the searched encodings; weight layout/bitwidth from the config.
        encode.append(
            PassSpec(
                "seq-mse",
                {
                    "weight_bw": c.weight_bw,
                    "per_channel": c.per_channel,
                    "batch_size": o.batch_size,
                    "progress": o.progress,
                    **dict(o.seq_mse_options),
                },
            )
        )
    # AdaScale / AdaRound learn on SeqMSE's grid (or the mode's) and freeze weights on their learned grids,
    # which encode-weights keeps; a layer one of them learned is left alone by the other.
    for name, on, extra in (("adascale", o.adascale, o.adascale_options), ("adaround", o.adaround, o.adaround_options)):
        if on:
            encode.append(
                PassSpec(
                    name,
                    {
                        "weight_bw": c.weight_bw,
                        "per_channel": c.per_channel,
                        "mode": c.weight_mode,
                        "batch_size": o.batch_size,
                        "progress": o.progress,
                        **dict(extra),
                    },
                )
            )
    encode.append(
        PassSpec("encode-weights", {"weight_bw": c.weight_bw, "per_channel": c.per_channel, "mode": c.weight_mode})
    )
    learned = o.seq_mse or o.adaround or o.adascale  # learned weights lie on their grids: nothing to correct
    bias_correction = (not learned) if o.bias_correction is None else o.bias_correction
    if o.calibrated:
        stages["calibrate"].append(
            PassSpec(
                "calibrate",
                {
                    "act_bw": c.act_bw,
                    "mode": c.act_mode,
                    "percentile": c.percentile,
                    "batch_size": o.batch_size,
                    "progress": o.progress,
                    **({"clip": tuple(f"{t}={f!r}" for t, f in o.clip_ranges.items())} if o.clip_ranges else {}),
                },
            )
        )
        # SeqMSE's asym search already absorbs the mean error into its choice of ranges; a second,
        # FP32-mean based correction on top measured worse (digits W4A8: 16.4 -> 12.7 dB).
        if bias_correction:
            stages["calibrate"].append(PassSpec("bias-correction", {"batch_size": o.batch_size}))
    stages["lower"] += [PassSpec("quantize", {"bias_bw": c.bias_bw}), PassSpec("insert-converts")]
    if o.runtime_check and o.calibrated:
        stages["check"].append(PassSpec("runtime-parity", {"batch_size": o.batch_size}))
    for stage, appended in (extensions or {}).items():
        if stage not in stages:
            raise ValueError(f"unknown pipeline stage {stage!r} (stages: {', '.join(STAGES)})")
        stages[stage] += list(appended)
    return QuantizePipeline(stages)


def run_structural_stage(
    graph: Graph,
    ctx: PassContext,
    flow: QuantizePipeline,
    registry: Registry,
    *,
    overrides: str | os.PathLike[str] | None = None,
    verify: Verify = "numeric",
    user_objects: Sequence[Pass] = (),
) -> PipelineReport:
    """The structural stage on ``graph`` (``user_objects`` right after inline-functions), then the
    overrides file loaded into ``ctx`` against the tensors before and after it: a file may name
    tensors the stage creates (the biases batch-norm folding adds, as in an encodings.json qpasses
    exported). What ``quantize``, ``check --target`` and AMP run before annotating."""
    structural = build_passes(flow.structural, registry)
    structural[1:1] = list(user_objects)
    original = tensor_specs(graph) if overrides is not None else {}
    report = PassManager(structural, verify=verify).run(graph, ctx)
    if overrides is not None:
        specs = {**original, **tensor_specs(graph)}
        ctx.artifacts.put(Overrides(encodings_io.load(overrides, tensors=specs), str(overrides)))
    return report


def _option_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "none"
    if isinstance(value, (list, tuple)):
        return ";".join(_option_text(v) for v in value)
    text = str(value)
    if any(ch in text for ch in ",{}"):
        raise ValueError(f"option value {text!r} cannot be written in a text pipeline (',', '{{' or '}}')")
    return text


def format_pipeline(specs: Sequence[PassSpec]) -> str:
    """``name{key=value,...}`` steps joined by commas (what ``parse_pipeline`` reads)."""
    steps = []
    for spec in specs:
        opts = ",".join(f"{k}={_option_text(v)}" for k, v in spec.options.items())
        steps.append(f"{spec.name}{{{opts}}}" if opts else spec.name)
    return ",".join(steps)
