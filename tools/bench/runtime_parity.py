"""Benchmark: what onnxruntime's default session computes vs exact QDQ semantics, per CPU kind.

    python tools/bench/runtime_parity.py [--models digits_cnn ... vgg22 resnet26] [--runs 200]

onnxruntime fuses QDQ Conv/Gemm/MatMul into integer kernels. On x86 without VNNI its u8s8
kernel (uint8 activations x int8 weights) adds pairs of products in int16 with saturation, so
the default session can be far worse than the QDQ graph says. This script compares, on the same
models and data:

- methods: qpasses portable storage (target ``ort``: 8-bit tensors stored as uint8, u8u8
  kernels), qpasses VNNI storage (target ``ort-vnni``: int8 weights, u8s8 kernels), and
  onnxruntime ``quantize_static`` (QDQ, per-tensor MinMax, QUInt8 activations / QInt8 weights,
  after ``quant_pre_process`` without symbolic shapes) with and without ``reduce_range`` (7-bit weights);
- SQNR of the logits vs FP32 (dB, higher is better) with (a) exact QDQ semantics (graph
  optimizations off), (b) the default session on this CPU, (c) the default session on an
  emulated AVX2-only CPU (``qemu-x86_64 -cpu Haswell``, Haswell has no VNNI): the script saves
  the quantized models and re-runs itself under qemu with ``--eval-only DIR``;
- single-thread batch-1 median latency of the default session on this CPU: FP32, int8 weights
  (``ort-vnni``), portable uint8 weights (``ort``).

Models: the three shipped digits CNNs (calibration: 64 samples of the calibration split;
evaluation: 128 samples of the test split) and two generated deeper nets on 3x32x32 structured
images (64 calibration / 128 evaluation images, seeded): ``vgg22`` (22 Conv+Relu, max-pools,
GAP, Gemm) and ``resnet26`` (26 convs: basic residual blocks with BatchNormalization + Relu,
stride-2 convs with 1x1 projections, GAP, Gemm). Their weights are He-normal, then rescaled on
a separate batch of images (LSUV-style for vgg22, BatchNormalization statistics for resnet26) so
activations stay in a sane range at every depth.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from qpasses.core import verification  # noqa: E402
from qpasses.data.evaluation import sqnr_db  # noqa: E402

MODELS = ROOT / "models"
DIGITS = ["digits_cnn", "digits_cnn_relu6", "digits_cnn_residual"]
GENERATED = ["vgg22", "resnet26"]
METHODS = {
    "qpasses-ort": "qpasses portable (`ort`)",
    "qpasses-ort-vnni": "qpasses VNNI storage (`ort-vnni`)",
    "ort-default": "onnxruntime quantize_static",
    "ort-reduce-range": "onnxruntime quantize_static reduce_range",
}
N_CALIB, N_EVAL = 64, 128
QEMU = ["qemu-x86_64", "-cpu", "Haswell"]


# --- generated models ----------------------------------------------------------------------------


def structured_images(n: int, seed: int) -> np.ndarray:
    """``n`` 3x32x32 images: a colour gradient, rectangles and discs of random colours, a little
    noise; values in [0, 1], then normalized per channel (mean 0.5, std 0.25) as image nets expect."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:32, 0:32].astype(np.float32) / 31.0
    out = np.empty((n, 3, 32, 32), np.float32)
    for i in range(n):
        a, b, c = rng.uniform(-0.5, 0.5, (3, 3, 1, 1))
        img = np.clip(rng.uniform(0.2, 0.8, (3, 1, 1)) + a * xx + b * yy + c * xx * yy, 0, 1)
        for _ in range(rng.integers(2, 6)):
            colour = rng.uniform(0, 1, (3, 1, 1))
            if rng.random() < 0.5:
                x0, y0 = rng.integers(0, 28, 2)
                w, h = rng.integers(4, 16, 2)
                mask = (xx * 31 >= x0) & (xx * 31 < x0 + w) & (yy * 31 >= y0) & (yy * 31 < y0 + h)
            else:
                cx, cy = rng.uniform(0, 1, 2)
                mask = (xx - cx) ** 2 + (yy - cy) ** 2 < rng.uniform(0.02, 0.1) ** 2 * 4
            img = np.where(mask[None], colour, img)
        out[i] = np.clip(img + rng.normal(0, 0.02, img.shape), 0, 1)
    return (out - 0.5) / 0.25


class _Builder:
    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: dict[str, np.ndarray] = {}
        self.n = 0
        self.rescale: list[tuple[str, str]] = []  # (tensor to measure, what to adjust: conv or bn name)

    def _name(self, kind: str) -> str:
        self.n += 1
        return f"{kind}{self.n}"

    def conv(self, x: str, cin: int, cout: int, k: int = 3, stride: int = 1, bias: bool = True) -> str:
        name = self._name("conv")
        w = self.rng.normal(0, np.sqrt(2.0 / (cin * k * k)), (cout, cin, k, k)).astype(np.float32)
        self.inits[f"{name}.w"] = w
        inputs = [x, f"{name}.w"]
        if bias:
            self.inits[f"{name}.b"] = self.rng.normal(0, 0.05, cout).astype(np.float32)
            inputs.append(f"{name}.b")
        self.nodes.append(
            helper.make_node(
                "Conv", inputs, [name], name=name, kernel_shape=[k, k], strides=[stride, stride], pads=[k // 2] * 4
            )
        )
        return name

    def bn(self, x: str, c: int, gamma: tuple[float, float] = (0.7, 1.3)) -> str:
        name = self._name("bn")
        self.inits[f"{name}.scale"] = self.rng.uniform(*gamma, c).astype(np.float32)
        self.inits[f"{name}.bias"] = self.rng.normal(0, 0.1, c).astype(np.float32)
        self.inits[f"{name}.mean"] = np.zeros(c, np.float32)  # set from data (calibrate_init)
        self.inits[f"{name}.var"] = np.ones(c, np.float32)
        self.nodes.append(
            helper.make_node(
                "BatchNormalization",
                [x] + [f"{name}.{p}" for p in ("scale", "bias", "mean", "var")],
                [name],
                name=name,
                epsilon=1e-5,
            )
        )
        self.rescale.append((x, name))
        return name

    def op(self, op_type: str, inputs: list[str], **attrs) -> str:
        name = self._name(op_type.lower())
        self.nodes.append(helper.make_node(op_type, inputs, [name], name=name, **attrs))
        return name

    def head(self, x: str, c: int, classes: int = 10) -> str:
        x = self.op("Flatten", [self.op("GlobalAveragePool", [x])])
        self.inits["fc.w"] = self.rng.normal(0, np.sqrt(1.0 / c), (classes, c)).astype(np.float32)
        self.inits["fc.b"] = np.zeros(classes, np.float32)
        self.nodes.append(helper.make_node("Gemm", [x, "fc.w", "fc.b"], ["logits"], name="fc", transB=1))
        return "logits"

    def model(self, name: str) -> onnx.ModelProto:
        graph = helper.make_graph(
            self.nodes,
            name,
            [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, 32, 32])],
            [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
            [numpy_helper.from_array(v, k) for k, v in self.inits.items()],
        )
        m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        m.ir_version = 8
        return m


def _calibrate_init(model: onnx.ModelProto, rescale: list[tuple[str, str]], x: np.ndarray) -> onnx.ModelProto:
    """In graph order: set each BatchNormalization's statistics from the data it sees (then its
    output is gamma * normalized + beta), or scale each conv's weights so its output has unit RMS."""
    for tensor, target in rescale:
        probe = onnx.ModelProto()
        probe.CopyFrom(model)
        del probe.graph.output[:]
        probe.graph.output.append(helper.make_empty_tensor_value_info(tensor))
        v = verification.session(probe).run(None, {"input": x})[0].astype(np.float64)
        inits = {t.name: t for t in model.graph.initializer}
        if target.startswith("bn"):
            for p, val in (("mean", v.mean(axis=(0, 2, 3))), ("var", v.var(axis=(0, 2, 3)))):
                inits[f"{target}.{p}"].CopyFrom(numpy_helper.from_array(val.astype(np.float32), f"{target}.{p}"))
        else:
            s = float(np.sqrt(np.mean(v**2)))
            for p in ("w", "b"):
                t = inits[f"{target}.{p}"]
                t.CopyFrom(numpy_helper.from_array((numpy_helper.to_array(t) / s).astype(np.float32), t.name))
    return model


def vgg22(seed: int = 1) -> onnx.ModelProto:
    """22 x (Conv 3x3 + Relu): 6 @32x32x16, 6 @16x16x32, 6 @8x8x64, 4 @4x4x64; GAP, Gemm."""
    b = _Builder(seed)
    x, cin = "input", 3
    for stage, (cout, n) in enumerate([(16, 6), (32, 6), (64, 6), (64, 4)]):
        if stage:
            x = b.op("MaxPool", [x], kernel_shape=[2, 2], strides=[2, 2])
        for _ in range(n):
            x = b.conv(x, cin, cout)
            b.rescale.append((x, x))
            x, cin = b.op("Relu", [x]), cout
    b.head(x, cin)
    return _calibrate_init(b.model("vgg22"), b.rescale, structured_images(64, seed + 1000))


def resnet26(seed: int = 2) -> onnx.ModelProto:
    """Stem conv 3->16, then basic blocks (conv-BN-Relu-conv-BN + identity or strided 1x1 conv-BN
    projection, Add, Relu): 3 @16ch 32x32, 3 @32ch 16x16, 3 @64ch 8x8, 2 @128ch 4x4 = 26 convs."""
    b = _Builder(seed)
    x = b.op("Relu", [b.bn(b.conv("input", 3, 16, bias=False), 16)])
    cin = 16
    for stage, (cout, blocks) in enumerate([(16, 3), (32, 3), (64, 3), (128, 2)]):
        for i in range(blocks):
            stride = 2 if stage and i == 0 else 1
            y = b.op("Relu", [b.bn(b.conv(x, cin, cout, stride=stride, bias=False), cout)])
            y = b.bn(b.conv(y, cout, cout, bias=False), cout, gamma=(0.3, 0.7))
            skip = (
                x if stride == 1 and cin == cout else b.bn(b.conv(x, cin, cout, k=1, stride=stride, bias=False), cout)
            )
            x, cin = b.op("Relu", [b.op("Add", [y, skip])]), cout
    b.head(x, cin)
    return _calibrate_init(b.model("resnet26"), b.rescale, structured_images(64, seed + 1000))


def load_model(name: str) -> tuple[onnx.ModelProto, np.ndarray, np.ndarray]:
    """(FP32 model, calibration inputs, evaluation inputs)."""
    if name in DIGITS:
        calib = np.load(MODELS / "digits_calib.npz")["input"][:N_CALIB]
        test = np.load(MODELS / "digits_test.npz")["input"][:N_EVAL]
        return onnx.load(MODELS / f"{name}.onnx"), calib, test
    model = {"vgg22": vgg22, "resnet26": resnet26}[name]()
    images = structured_images(N_CALIB + N_EVAL, seed=7)
    return model, images[:N_CALIB], images[N_CALIB:]


# --- quantization --------------------------------------------------------------------------------


def qpasses_quantize(model: onnx.ModelProto, calib: np.ndarray, target: str) -> onnx.ModelProto:
    from qpasses.quant.config import QuantConfig
    from qpasses.quantize import quantize_model

    feeds = [{"input": calib[i : i + 16]} for i in range(0, len(calib), 16)]
    return quantize_model(model, feeds, QuantConfig(per_channel=True), target=target, progress=False).model


def ort_quantize(model_path: Path, calib: np.ndarray, reduce_range: bool, out: Path) -> onnx.ModelProto:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{"input": calib[i : i + 16]} for i in range(0, len(calib), 16)])

        def get_next(self):
            return next(self.batches, None)

    pre = out.with_suffix(".pre.onnx")
    quant_pre_process(str(model_path), str(pre), skip_symbolic_shape=True)  # ONNX shape inference suffices
    quantize_static(
        str(pre),
        str(out),
        Reader(),
        quant_format=QuantFormat.QDQ,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        reduce_range=reduce_range,
    )
    return onnx.load(out)


def storage(model: onnx.ModelProto) -> str:
    """Stored integer types of the activations and weights, e.g. 'u8/s8' (as the fused kernel sees them)."""
    constants = {t.name: t for t in model.graph.initializer}
    names = {TensorProto.UINT8: "u8", TensorProto.INT8: "s8", TensorProto.UINT16: "u16", TensorProto.INT16: "s16"}
    acts, weights = set(), set()
    for n in model.graph.node:
        if n.op_type == "QuantizeLinear" and len(n.input) > 2 and n.input[2] in constants:
            acts.add(names.get(constants[n.input[2]].data_type, "?"))
        elif n.op_type == "DequantizeLinear" and n.input[0] in constants:
            if constants[n.input[0]].data_type != TensorProto.INT32:  # biases
                weights.add(names.get(constants[n.input[0]].data_type, "?"))
    return f"{'+'.join(sorted(acts)) or '-'}/{'+'.join(sorted(weights)) or '-'}"


# --- evaluation ----------------------------------------------------------------------------------


def _logits(sess, x: np.ndarray) -> np.ndarray:
    return np.concatenate([sess.run(None, {"input": x[i : i + 32]})[0] for i in range(0, len(x), 32)])


def eval_only(workdir: Path) -> None:
    """Child mode (run under qemu): default-session SQNR of every saved model; JSON on stdout."""
    from qpasses.runtime.kernel_emulation import runtime_saturates

    manifest = json.loads((workdir / "manifest.json").read_text())
    result: dict[str, object] = {"saturates": runtime_saturates(), "sqnr": {}}
    for key, entry in manifest.items():
        data = np.load(workdir / entry["data"])
        out = _logits(verification.runtime_session(str(workdir / entry["model"])), data["x"])
        result["sqnr"][key] = sqnr_db(data["ref"], out)
    print(json.dumps(result))


def run_emulated(workdir: Path) -> tuple[dict[str, float] | None, str]:
    """SQNR per saved model in the default session on an emulated AVX2-only CPU (None: skipped)."""
    if shutil.which(QEMU[0]) is None:
        return None, "skipped (no qemu-x86_64)"
    t = time.perf_counter()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [*QEMU, sys.executable, str(Path(__file__).resolve()), "--eval-only", str(workdir)],
        capture_output=True,
        text=True,
        env=env,
    )
    noise = [ln for ln in proc.stderr.splitlines() if ln.strip() and "TCG doesn't support requested feature" not in ln]
    if proc.returncode != 0:
        return None, f"failed (exit {proc.returncode}): " + " | ".join(noise[-5:])
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    verdict = "u8s8 kernels saturate" if result["saturates"] else "u8s8 kernels exact (emulation did NOT saturate!)"
    return (
        result["sqnr"],
        f"qemu-x86_64 -cpu Haswell (AVX2, no VNNI): onnxruntime {verdict} (probed under qemu), "
        f"{time.perf_counter() - t:.0f} s",
    )


def latency_ms(models: dict[str, onnx.ModelProto], x: np.ndarray, runs: int, warmup: int = 20) -> dict[str, float]:
    """Median single-thread batch-1 latency of the default session; runs interleaved across models."""
    sessions = {k: verification.runtime_session(m, intra_op_threads=1) for k, m in models.items()}
    feed = {"input": x[:1]}
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for i in range(warmup + runs):
        for k, sess in sessions.items():
            t = time.perf_counter()
            sess.run(None, feed)
            if i >= warmup:
                times[k].append(time.perf_counter() - t)
    return {k: 1000 * float(np.median(v)) for k, v in times.items()}


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=DIGITS + GENERATED)
    ap.add_argument("--runs", type=int, default=200, help="timed runs per model for latency")
    ap.add_argument("--eval-only", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.eval_only:
        eval_only(args.eval_only)
        return

    from qpasses.runtime.parity import cpu_description, cpu_flags

    t0 = time.perf_counter()
    print(f"this CPU: {cpu_description()}")
    print(f"cpu_flags(): {cpu_flags() or '(none)'}")
    print(f"calibration {N_CALIB} samples, evaluation {N_EVAL} other samples; SQNR of logits vs FP32 in dB")
    rows: list[dict[str, object]] = []
    latency: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        manifest: dict[str, dict[str, str]] = {}
        for name in args.models:
            t = time.perf_counter()
            fp32, calib, x = load_model(name)
            fp32_path = workdir / f"{name}.fp32.onnx"
            onnx.save(fp32, fp32_path)
            ref = _logits(verification.runtime_session(fp32), x)
            np.savez(workdir / f"{name}.data.npz", x=x, ref=ref)
            quantized = {
                "qpasses-ort": qpasses_quantize(fp32, calib, "ort"),
                "qpasses-ort-vnni": qpasses_quantize(fp32, calib, "ort-vnni"),
                "ort-default": ort_quantize(fp32_path, calib, False, workdir / f"{name}.ort-default.onnx"),
                "ort-reduce-range": ort_quantize(fp32_path, calib, True, workdir / f"{name}.ort-reduce-range.onnx"),
            }
            n_conv = sum(n.op_type == "Conv" for n in fp32.graph.node)
            for method, q in quantized.items():
                path = workdir / f"{name}.{method}.q.onnx"
                onnx.save(q, path)
                key = f"{name}/{method}"
                manifest[key] = {"model": path.name, "data": f"{name}.data.npz"}
                rows.append(
                    {
                        "key": key,
                        "model": f"{name} ({n_conv} conv)",
                        "method": METHODS[method],
                        "storage": storage(q),
                        "exact": sqnr_db(ref, _logits(verification.exact_session(q), x)),
                        "native": sqnr_db(ref, _logits(verification.runtime_session(q), x)),
                    }
                )
            latency[name] = latency_ms(
                {"FP32": fp32, "ort-vnni": quantized["qpasses-ort-vnni"], "ort": quantized["qpasses-ort"]}, x, args.runs
            )
            print(f"  {name}: quantized 4 ways, evaluated, timed in {time.perf_counter() - t:.1f} s", flush=True)
        (workdir / "manifest.json").write_text(json.dumps(manifest))
        emulated, emu_note = run_emulated(workdir)

    print(f"\nemulated CPU: {emu_note}\n")
    print(
        "| model | method | storage act/w | exact QDQ | default session, this CPU (VNNI) "
        "| default session, AVX2-only (qemu) | AVX2 loss vs exact |"
    )
    print("|---|---|---|---:|---:|---:|---:|")
    for r in rows:
        if emulated is None:
            emu, loss = emu_note.split(":")[0], "-"
        else:
            emu, loss = _fmt(emulated[r["key"]]), _fmt(r["exact"] - emulated[r["key"]])
        print(
            f"| {r['model']} | {r['method']} | {r['storage']} | {_fmt(r['exact'])} | {_fmt(r['native'])} "
            f"| {emu} | {loss} |"
        )

    print(
        f"\nsingle-thread batch-1 median latency, default session, this CPU ({args.runs} runs after 20 warm-up, "
        "interleaved), ms (ratio vs FP32)\n"
    )
    print(
        "| model | FP32 | qpasses int8 weights (`ort-vnni`) | qpasses portable uint8 weights (`ort`) "
        "| portable / int8 |"
    )
    print("|---|---:|---:|---:|---:|")
    for name, lat in latency.items():
        f = lat["FP32"]
        print(
            f"| {name} | {f:.3f} | {lat['ort-vnni']:.3f} ({lat['ort-vnni'] / f:.2f}x) "
            f"| {lat['ort']:.3f} ({lat['ort'] / f:.2f}x) | {lat['ort'] / lat['ort-vnni']:.2f}x |"
        )
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
