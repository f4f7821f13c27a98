"""Benchmark: per-tensor W8A8 with and without cross-layer equalization, vs per-channel.

    python tools/bench/cle.py

Models (digits test split for accuracy, SQNR of logits vs FP32):
- ``digits_cnn`` (shipped; depthwise conv, unfused BN);
- ``digits_cnn_skewed``: the same network, BN folded, then each equalizable pair
  re-scaled per channel by factors spanning 100x (conv_i channel c times f_c, the next
  layer's input channel c divided by f_c). ReLU is positively homogeneous, so FP32 outputs
  are unchanged but per-channel weight ranges differ by 100x, as in MobileNet-style nets.
If aimet-onnx is installed its ``equalize_model`` runs on the same models in the same run.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import graph_ir  # noqa: E402
from qpasses.data.evaluation import sqnr_db as sqnr  # noqa: E402
from qpasses.passes import default_registry  # noqa: E402
from qpasses.quant.config import QuantConfig  # noqa: E402
from qpasses.quantize import quantize_model  # noqa: E402

MODELS = ROOT / "models"
CALIB = str(MODELS / "digits_calib.npz")


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"]).run(
        None, {"input": x}
    )[0]


def skewed_digits(spread: float = 100.0, seed: int = 0) -> onnx.ModelProto:
    """digits_cnn with BN folded and per-channel ranges spread by ``spread`` (FP32 outputs unchanged)."""
    g = graph_ir.load(MODELS / "digits_cnn.onnx")
    default_registry().create_pass("fold-batchnorm")(g)
    convs = [op for op in g.ops if op.op_type == "Conv"]
    rng = np.random.default_rng(seed)
    for first, second in zip(convs, convs[1:], strict=False):
        if second.attr("group", 1) != 1:
            continue  # keep each layer's spread at ~100x: skew pairs into dense convs only
        w1, b1 = g.tensors[first.inputs[1]], g.tensors[first.inputs[2]]
        w2 = g.tensors[second.inputs[1]]
        cout = w1.data.shape[0]
        f = np.exp(rng.uniform(np.log(1 / np.sqrt(spread)), np.log(np.sqrt(spread)), cout)).astype(np.float32)
        f[np.argmin(f)], f[np.argmax(f)] = 1 / np.sqrt(spread), np.sqrt(spread)
        w1.set_data(w1.data * f[:, None, None, None])
        b1.set_data(b1.data * f)
        w2.set_data(w2.data / f[None, :, None, None])
    return g.to_onnx()


def aimet_rows(model: onnx.ModelProto, x: np.ndarray, y: np.ndarray, ref: np.ndarray) -> list[str]:
    try:
        from aimet_onnx.cross_layer_equalization import equalize_model  # type: ignore[import-not-found]
    except ImportError:
        return ["  aimet-onnx not installed: AIMET comparison skipped"]
    m = onnx.ModelProto()
    m.CopyFrom(model)
    equalize_model(m)
    res = quantize_model(
        m, CALIB, QuantConfig(per_channel=False), fold_batchnorm=True, progress=False, quantize_outputs=True
    )
    out = _run(res.model, x)
    return [f"  {'AIMET equalize_model + W8A8 PT':<34} {np.mean(out.argmax(1) == y):>7.4f} {sqnr(ref, out):>8.2f}"]


def main() -> None:
    test = np.load(MODELS / "digits_test.npz")
    x, y = test["input"], test["labels"]
    models = {"digits_cnn": onnx.load(str(MODELS / "digits_cnn.onnx")), "digits_cnn_skewed": skewed_digits()}
    for name, model in models.items():
        ref = _run(model, x)
        print(f"{name}: FP32 top-1 {np.mean(ref.argmax(1) == y):.4f}")
        print(f"  {'configuration':<34} {'top-1':>7} {'SQNR dB':>8}")
        for label, per_channel, cle in [
            ("W8A8 per-tensor", False, False),
            ("W8A8 per-tensor + CLE", False, True),
            ("W8A8 per-channel", True, False),
            ("W8A8 per-channel + CLE", True, True),
        ]:
            res = quantize_model(
                model, CALIB, QuantConfig(per_channel=per_channel), cle=cle, progress=False, quantize_outputs=True
            )
            out = _run(res.model, x)
            print(f"  {label:<34} {np.mean(out.argmax(1) == y):>7.4f} {sqnr(ref, out):>8.2f}")
        for line in aimet_rows(model, x, y, ref):
            print(line)


if __name__ == "__main__":
    main()
