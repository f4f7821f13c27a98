"""``quantize_model``: the whole FP32 -> QDQ flow as one call (what ``qpasses quantize`` runs).

Pipeline: inline-functions -> [user passes] -> fold-batchnorm -> [cle] -> apply-overrides
-> keep-nonfinite-float -> keep-data-independent-float -> [keep-mixed-ranges-float] -> annotate-precision
-> [check-target] -> int32-overrides -> [seq-mse] -> encode-weights -> calibrate
-> [bias-correction] -> quantize
-> insert-converts -> [runtime-parity, with calibration data]. Every step is a registered pass, so
the same flow can be written as a pipeline string instead.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx

import graph_ir
from graph_ir import Graph
from qpasses import encodings_io
from qpasses.context import PassContext
from qpasses.encodings_io import EncodingsFile
from qpasses.errors import QPassesError
from qpasses.pass_base import Pass
from qpasses.pass_manager import PassManager, PipelineReport, Verify
from qpasses.passes.apply_overrides import tensor_specs
from qpasses.pipeline import PassSpec, build_passes, parse_pipeline
from qpasses.quant_config import QuantConfig
from qpasses.registry import Registry, default_registry
from qpasses.runtime_parity import ParityReport
from targets import resolve_target


@dataclass
class QuantizeResult:
    graph: Graph
    encodings: EncodingsFile
    report: PipelineReport
    config: QuantConfig
    parity: ParityReport | None = None  # the runtime parity check (None: not run)

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
        text = (f"quantized {n_act} activations and {n_par} weights/biases/params "
                f"(W{self.config.weight_bw}A{self.config.act_bw}, "
                f"{'per-channel' if self.config.per_channel else 'per-tensor'}){floats}; {len(missed)} missed remarks")
        return text if self.parity is None else f"{text}\n{self.parity.format()}"

    def save(self, outdir: str | os.PathLike[str], *, encodings_version: encodings_io.Version = "0.6.1") -> Path:
        """Write ``model.qdq.onnx``, ``encodings.json`` and ``report.txt`` (each atomically)."""
        out = Path(outdir)
        out.mkdir(parents=True, exist_ok=True)
        graph_ir.save(self.graph, out / "model.qdq.onnx")
        encodings_io.save(out / "encodings.json", self.encodings, encodings_version)
        _atomic_write_text(out / "report.txt", self.report.format() + "\n" + self.summary() + "\n")
        return out


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def quantize_model(
    model: str | os.PathLike[str] | onnx.ModelProto | Graph,
    calibration_data: Any = None,
    config: QuantConfig | dict[str, Any] | None = None,
    *,
    overrides: str | os.PathLike[str] | None = None,
    pipeline: str | Sequence[PassSpec] | Sequence[Pass] | None = None,
    fold_batchnorm: bool = True,
    cle: bool = False,
    seq_mse: bool = False,
    bias_correction: bool | None = None,
    seq_mse_options: dict[str, Any] | None = None,
    target: Any = None,
    batch_size: int = 16,
    progress: bool = True,
    verify: Verify = "checker",
    registry: Registry | None = None,
    runtime_check: bool = True,
) -> QuantizeResult:
    """Quantize a model to QDQ. ``calibration_data``: iterable/callable of feed dicts, ``.npz``
    path, or QNN input-list path. Without calibration data, activations without an override stay
    float (float fallback) and only weights are quantized. ``seq_mse`` searches the weight
    encodings on the calibration data first (options of the ``seq-mse`` pass in ``seq_mse_options``).
    """
    if seq_mse and calibration_data is None:
        raise QPassesError("SeqMSE needs calibration data: pass calibration_data (or --calib), or drop seq_mse")
    if isinstance(config, dict):
        config = QuantConfig.from_dict(config)
    config = config or QuantConfig()
    registry = registry or default_registry()
    target = resolve_target(target, registry)
    graph = model.copy() if isinstance(model, Graph) else graph_ir.load(model)

    # Ops inside model-local functions are invisible to every pass: inline them first.
    passes: list[Pass] = [registry.create_pass("inline-functions")]
    if pipeline:
        if isinstance(pipeline, str):
            passes += build_passes(parse_pipeline(pipeline), registry)
        elif all(isinstance(p, PassSpec) for p in pipeline):
            passes += build_passes(list(pipeline), registry)  # type: ignore[arg-type]
        else:
            passes += list(pipeline)  # type: ignore[arg-type]
    if fold_batchnorm:
        passes.append(registry.create_pass("fold-batchnorm"))
    if cle:
        passes.append(registry.create_pass("cle"))
    ctx = PassContext(target=target, calibration_data=calibration_data)
    if runtime_check and calibration_data is not None:
        ctx.state["fp32_reference"] = graph.to_onnx()
    original_specs = tensor_specs(graph) if overrides is not None else {}
    # Structural passes first: an overrides file may name tensors they create (e.g. the
    # biases that batch-norm folding adds, as in an encodings.json this tool exported).
    report = PassManager(passes, verify=verify).run(graph, ctx)
    passes = []
    if overrides is not None:
        specs = {**original_specs, **tensor_specs(graph)}
        ctx.state["overrides"] = encodings_io.load(overrides, tensors=specs)
        passes.append(registry.create_pass("apply-overrides"))
    # Tensors 8 bits cannot carry stay float (int16 on quantized-only targets); user overrides win.
    passes += [registry.create_pass("keep-nonfinite-float"), registry.create_pass("keep-data-independent-float")]
    if calibration_data is not None:
        passes.append(registry.create_pass("keep-mixed-ranges-float", act_bw=config.act_bw, batch_size=batch_size))
    passes.append(registry.create_pass(
        "annotate-precision", act_bw=config.act_bw, weight_bw=config.weight_bw, bias_bw=config.bias_bw,
        float_bw=config.float_bw, float_bias_bw=config.float_bias_bw, calibrated=calibration_data is not None))
    if target is not None:
        passes.append(registry.create_pass("check-target"))
    passes.append(registry.create_pass("int32-overrides"))
    if seq_mse:
        # Before encode-weights, which keeps the searched encodings; weight layout/bitwidth from the config.
        seq_options = {"weight_bw": config.weight_bw, "per_channel": config.per_channel, "batch_size": batch_size,
                       "progress": progress, **(seq_mse_options or {})}
        passes.append(registry.create_pass("seq-mse", **seq_options))
    passes.append(registry.create_pass("encode-weights", weight_bw=config.weight_bw, per_channel=config.per_channel,
                                       mode=config.weight_mode))
    if calibration_data is not None:
        passes.append(registry.create_pass("calibrate", act_bw=config.act_bw, mode=config.act_mode,
                                           percentile=config.percentile, batch_size=batch_size, progress=progress))
    if bias_correction is None:
        # SeqMSE's asym search already absorbs the mean error into its choice of ranges; a second,
        # FP32-mean based correction on top measured worse (digits W4A8: 16.4 -> 12.7 dB).
        bias_correction = not seq_mse
    if calibration_data is not None and bias_correction:
        passes.append(registry.create_pass("bias-correction", batch_size=batch_size))
    passes.append(registry.create_pass("quantize", bias_bw=config.bias_bw))
    passes.append(registry.create_pass("insert-converts"))
    if runtime_check and calibration_data is not None:
        passes.append(registry.create_pass("runtime-parity", batch_size=batch_size))
    report.records += PassManager(passes, verify=verify).run(graph, ctx).records
    encodings = ctx.state.get("encodings")
    if encodings is None or not (encodings.activations or encodings.params):
        raise QPassesError("quantization produced no encodings (nothing quantizable in the model?)")
    return QuantizeResult(graph, encodings, report, config, ctx.state.get("runtime_parity"))
