"""Benchmark: learned weight quantization (AdaRound, AdaScale) vs min-max and SeqMSE, W4A8 per-channel.

    python tools/bench/learned_rounding.py [--quick] [--models digits_cnn,...]

Per shipped digits model (digits test split, 360 images): top-1 against the labels and SQNR of the
logits vs FP32 for each weight flow, with the whole ``quantize_model`` wall time and the learned
pass alone. AdaRound / AdaScale run with their defaults (needs ``pip install "qpasses[learn]"``),
after fold-batchnorm and before encode-weights, as ``quantize --adaround/--adascale`` runs them;
"+ seq-mse" rows learn on SeqMSE's grids. If ``aimet_onnx`` imports, its AdaRound runs on the same
folded model and calibration data (otherwise "skipped").
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from qpasses.core.verification import exact_session  # noqa: E402
from qpasses.data.evaluation import sqnr_db  # noqa: E402
from qpasses.passes import default_registry  # noqa: E402
from qpasses.quant.config import QuantConfig  # noqa: E402
from qpasses.quantize import quantize_model  # noqa: E402

MODELS = ROOT / "models"
CALIB = str(MODELS / "digits_calib.npz")
REGISTRY = default_registry()


def _flows(bits: int, quick: bool) -> list[tuple[str, dict[str, Any]]]:
    """(label, quantize_model keyword arguments) per weight flow."""
    def learned(*names: str, **options: Any) -> list:
        return [REGISTRY.create_pass("fold-batchnorm")] + [
            REGISTRY.create_pass(name, weight_bw=bits, per_channel=True, progress=False, **options) for name in names]

    flows: list[tuple[str, dict[str, Any]]] = [
        ("min-max", {}),
        ("seq-mse", {"seq_mse": True}),
        ("adaround", {"pipeline": learned("adaround")}),
        ("adascale", {"pipeline": learned("adascale")}),
    ]
    if not quick:
        flows += [("seq-mse + adaround", {"pipeline": learned("seq-mse", "adaround")}),
                  ("adaround AIMET's 10k", {"pipeline": learned("adaround", iterations=10000, lr=1e-3)})]
    return flows


def _aimet_adaround(model: onnx.ModelProto, bits: int, x: np.ndarray, labels: np.ndarray,
                    fp32: np.ndarray) -> str:
    """AIMET-ONNX's own flow on the same model and data: BN fold, per-channel QuantSim, apply_adaround."""
    try:
        from aimet_onnx import QuantizationSimModel, apply_adaround
        from aimet_onnx.batch_norm_fold import fold_all_batch_norms_to_weight
        from aimet_onnx.common.quantsim_config.utils import get_path_for_per_channel_config
    except ImportError as exc:
        return f"skipped (aimet_onnx not importable: {exc})"
    folded = copy.deepcopy(model)
    fold_all_batch_norms_to_weight(folded)
    calib = np.load(CALIB)["input"]
    feeds = [{"input": calib[i:i + 16]} for i in range(0, len(calib), 16)]
    try:
        sim = QuantizationSimModel(folded, param_type=f"int{bits}", activation_type="int8",
                                   config_file=get_path_for_per_channel_config())
        start = time.perf_counter()
        apply_adaround(sim, feeds, num_iterations=1000)
        sim.compute_encodings(feeds)
        seconds = time.perf_counter() - start
        out = sim.session.run(None, {"input": x})[0]
    except Exception as exc:  # noqa: BLE001 - an API mismatch in another tool must not stop the benchmark
        return f"failed ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})"
    return (f"top-1 {np.mean(out.argmax(1) == labels):.4f}  SQNR {sqnr_db(fp32, out):.2f} dB  "
            f"{seconds:.1f} s (1000 iterations)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="digits_cnn only, the four main flows")
    parser.add_argument("--models", default="digits_cnn,digits_cnn_relu6,digits_cnn_residual")
    parser.add_argument("--bits", type=int, default=4, help="weight bitwidth (4)")
    args = parser.parse_args(argv)
    try:
        import torch

        torch_version = torch.__version__
    except ImportError:
        print('AdaRound/AdaScale need torch: pip install "qpasses[learn]"')
        return 1
    test = np.load(MODELS / "digits_test.npz")
    x, labels = test["input"], test["labels"]
    names = ["digits_cnn"] if args.quick else args.models.split(",")
    print(f"W{args.bits}A8 per-channel, digits test split ({len(x)} images), torch {torch_version}")
    print(f"{'model':<20} {'weights':<20} {'top-1':>7} {'SQNR dB':>8} {'vs min-max':>10} {'time s':>7} "
          f"{'learn s':>8}")
    for name in names:
        model = onnx.load(MODELS / f"{name}.onnx")
        fp32 = exact_session(model).run(None, {"input": x})[0]
        print(f"{name:<20} {'FP32':<20} {np.mean(fp32.argmax(1) == labels):7.4f}")
        base = None
        for label, kwargs in _flows(args.bits, args.quick):
            config = QuantConfig(weight_bw=args.bits, act_bw=8, per_channel=True)
            start = time.perf_counter()
            result = quantize_model(model, CALIB, config, progress=False, **kwargs)
            seconds = time.perf_counter() - start
            out = exact_session(result.model).run(None, {"input": x})[0]
            db = sqnr_db(fp32, out)
            base = db if base is None else base
            learn = sum(r.seconds for r in result.report.records if r.name in ("adaround", "adascale", "seq-mse"))
            gain = f"{db - base:+.2f}" if label != "min-max" else ""
            print(f"{name:<20} {label:<20} {np.mean(out.argmax(1) == labels):7.4f} {db:8.2f} {gain:>10} "
                  f"{seconds:7.2f} {learn:8.2f}", flush=True)
        print(f"{name:<20} {'aimet-onnx adaround':<20} {_aimet_adaround(model, args.bits, x, labels, fp32)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
