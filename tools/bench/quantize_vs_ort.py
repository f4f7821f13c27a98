"""Benchmark: qpasses W8A8 vs onnxruntime.quantization.quantize_static, same model, same data.

    python tools/bench/quantize_vs_ort.py [--models digits_cnn digits_cnn_relu6 digits_cnn_residual]

For each shipped model: FP32, then per-tensor and per-channel rows for qpasses and for
onnxruntime (QDQ, MinMax, uint8 activations / int8 weights, after ORT's recommended
``quant_pre_process``). Metrics on the digits test split: top-1 accuracy and SQNR of the
logits vs FP32 (dB, higher is better). Calibration: the shipped calibration split.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from qpasses.data.evaluation import sqnr_db as sqnr  # noqa: E402
from qpasses.quant.config import QuantConfig  # noqa: E402
from qpasses.quantize import quantize_model  # noqa: E402

MODELS = ROOT / "models"


def _run(model: onnx.ModelProto | str, x: np.ndarray) -> np.ndarray:
    data = model if isinstance(model, str) else model.SerializeToString()
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]


def ort_quantize(model_path: Path, calib: np.ndarray, per_channel: bool, workdir: Path) -> str:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.calibrate import CalibrationMethod
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{"input": calib[i : i + 16]} for i in range(0, len(calib), 16)])

        def get_next(self):
            return next(self.batches, None)

    pre = workdir / f"{model_path.stem}.pre.onnx"
    quant_pre_process(str(model_path), str(pre))
    out = workdir / f"{model_path.stem}.ort.{'pc' if per_channel else 'pt'}.onnx"
    quantize_static(
        str(pre),
        str(out),
        Reader(),
        quant_format=QuantFormat.QDQ,
        per_channel=per_channel,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=CalibrationMethod.MinMax,
    )
    return str(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["digits_cnn", "digits_cnn_relu6", "digits_cnn_residual"])
    args = ap.parse_args()
    calib = np.load(MODELS / "digits_calib.npz")["input"]
    test = np.load(MODELS / "digits_test.npz")
    x, y = test["input"], test["labels"]
    print(f"{'model':<22} {'method':<26} {'top-1':>7} {'SQNR dB':>8} {'time s':>7}")
    with tempfile.TemporaryDirectory() as d:
        for name in args.models:
            path = MODELS / f"{name}.onnx"
            ref = _run(str(path), x)
            print(f"{name:<22} {'FP32':<26} {np.mean(ref.argmax(1) == y):>7.4f} {'-':>8} {'-':>7}")
            for per_channel in (False, True):
                layout = "per-channel" if per_channel else "per-tensor"
                rows = []
                t = time.perf_counter()
                res = quantize_model(
                    path, str(MODELS / "digits_calib.npz"), QuantConfig(per_channel=per_channel), progress=False
                )
                rows.append((f"qpasses {layout}", _run(res.model, x), time.perf_counter() - t))
                t = time.perf_counter()
                res = quantize_model(
                    path,
                    str(MODELS / "digits_calib.npz"),
                    QuantConfig(per_channel=per_channel),
                    cle=True,
                    progress=False,
                )
                rows.append((f"qpasses {layout} +CLE", _run(res.model, x), time.perf_counter() - t))
                t = time.perf_counter()
                ort_path = ort_quantize(path, calib, per_channel, Path(d))
                rows.append((f"onnxruntime {layout}", _run(ort_path, x), time.perf_counter() - t))
                for label, out, secs in rows:
                    print(
                        f"{name:<22} {label:<26} {np.mean(out.argmax(1) == y):>7.4f} {sqnr(ref, out):>8.2f} "
                        f"{secs:>7.2f}"
                    )


if __name__ == "__main__":
    main()
