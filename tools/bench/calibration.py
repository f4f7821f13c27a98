"""Benchmark: calibration time against plain FP32 inference, and peak memory against onnxruntime's calibrators.

    python tools/bench/calibration.py [--repeat 3] [--chain-nodes 60] [--samples 16 64 256]
    python tools/bench/calibration.py --skip-time --skip-memory     # (c) only: the YOLO-like CNN

Models: the shipped digits CNN, and a generated Conv-BN-Relu chain (``tools/gen_graphs.py``,
32 channels, spatial dims widened to 32x32) — both BN-folded, as ``quantize_model`` calibrates
them; the tensors are the QuantPlan's activations.

(a) Time: ``collect_statistics`` over N samples in batches of 16, divided by a plain onnxruntime
session (default options) running the same batches; both include session creation. Best of
``--repeat`` interleaved runs (the host may be shared). ``serial`` is the same with the worker
thread off; ``encode`` is the time ``compute`` takes to turn the observers into encodings.
The calibration session turns onnxruntime's thread spinning off (its worker thread needs the CPU);
``nospin`` is plain inference with the same setting, to separate that effect from the overhead.

(b) Memory: each configuration runs in a fresh subprocess that streams generated batches of 16 and
reports its peak RSS (VmHWM) and the peak minus the RSS just before calibration started.
onnxruntime's calibrators (``create_calibrator``) run on the same model file and the same data.

(c) The cap per run, on a model large enough to matter: a generated YOLOv8n-like CNN (63 convs,
SiLU, C2f/SPPF/FPN; random weights; 640x640 by default: ~200 MB of activations per sample), 64
samples. Each configuration runs in a fresh subprocess (time and peak RSS of the whole process):
qpasses ``collect_statistics`` (tf, batches of 16) uncapped (one run per batch, the behaviour before
the cap) and at several ``max_bytes_per_run``, against onnxruntime's MinMax calibrator fed batches
of 16 and of 1 (what its examples do). ``same`` says whether the encodings equal those at the
default cap (capped runs cover one row each; uncapped, onnxruntime may round a few convolutions
differently by batch size).
Best time / highest peak of ``--yolo-repeat`` interleaved rounds (the host may be shared).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from gen_graphs import conv_bn_relu_chain  # noqa: E402

import graph_ir  # noqa: E402
from qpasses.core.context import PassContext  # noqa: E402
from qpasses.data.calibration import collect_statistics  # noqa: E402
from qpasses.data.tensor_tap import DEFAULT_MAX_BYTES_PER_RUN  # noqa: E402
from qpasses.passes.equalize.fold_batchnorm import FoldBatchNorm  # noqa: E402
from qpasses.quant.plan import QuantPlan  # noqa: E402
from qpasses.quant.range_search import compute  # noqa: E402

BATCH = 16
DIGITS = ROOT / "models" / "digits_cnn.onnx"
ORT_METHODS = ("MinMax", "Entropy", "Percentile", "Distribution")
MB = 1 << 20


# --- models and data -------------------------------------------------------------------------------------


def _chain(num_nodes: int, spatial: int) -> onnx.ModelProto:
    """The generator's chain with symbolic spatial dims, so it can run at ``spatial`` x ``spatial``."""
    model = conv_bn_relu_chain(num_nodes, channels=32)
    for vi in (*model.graph.input, *model.graph.output):
        for axis, name in ((2, "H"), (3, "W")):
            dim = vi.type.tensor_type.shape.dim[axis]
            dim.Clear()
            dim.dim_param = name
    return model


def yolo_like(size: int = 640, width: float = 0.25, seed: int = 0) -> onnx.ModelProto:
    """A YOLOv8n-shaped CNN with random weights: Conv+SiLU (Sigmoid, Mul), C2f blocks (Split,
    bottlenecks with residual Adds, Concat), SPPF (MaxPools), an FPN/PAN neck (Resize, Concat) and
    three detection heads; 63 convolutions, input ``[N, 3, size, size]`` (BN already folded)."""
    rng = np.random.default_rng(seed)
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []
    count = iter(range(1_000_000))

    def fresh(prefix: str) -> str:
        return f"{prefix}{next(count)}"

    def const(prefix: str, value: np.ndarray) -> str:
        name = fresh(prefix)
        inits.append(onnx.numpy_helper.from_array(value, name))
        return name

    def node(op: str, inputs: list[str], prefix: str, outputs: int = 1, **attrs: object) -> list[str]:
        names = [fresh(prefix) for _ in range(outputs)]
        nodes.append(onnx.helper.make_node(op, inputs, names, **attrs))
        return names

    def conv(x: str, cin: int, cout: int, k: int = 1, s: int = 1, act: bool = True) -> str:
        w = const("w", (rng.standard_normal((cout, cin, k, k)) * np.sqrt(2.0 / (cin * k * k))).astype(np.float32))
        b = const("b", (rng.standard_normal(cout) * 0.1).astype(np.float32))
        (y,) = node("Conv", [x, w, b], "conv", kernel_shape=[k, k], strides=[s, s], pads=[k // 2] * 4)
        if not act:
            return y
        (sig,) = node("Sigmoid", [y], "sigmoid")
        return node("Mul", [y, sig], "silu")[0]

    def c2f(x: str, cin: int, cout: int, n: int, shortcut: bool = True) -> str:
        c = cout // 2
        parts = node("Split", [conv(x, cin, 2 * c), const("split", np.array([c, c], np.int64))], "part", 2, axis=1)
        cur = parts[1]
        for _ in range(n):
            h = conv(conv(cur, c, c, 3), c, c, 3)
            cur = node("Add", [cur, h], "add")[0] if shortcut else h
            parts.append(cur)
        return conv(node("Concat", parts, "cat", axis=1)[0], (2 + n) * c, cout)

    def sppf(x: str, cin: int, cout: int) -> str:
        pools = [conv(x, cin, cin // 2)]
        for _ in range(3):
            pools += node("MaxPool", [pools[-1]], "pool", kernel_shape=[5, 5], pads=[2] * 4)
        return conv(node("Concat", pools, "cat", axis=1)[0], 2 * cin, cout)

    def up(x: str) -> str:
        return node("Resize", [x, "", const("scales", np.array([1, 1, 2, 2], np.float32))], "up", mode="nearest")[0]

    def cat(xs: list[str]) -> str:
        return node("Concat", xs, "cat", axis=1)[0]

    c1, c2, c3, c4, c5 = (int(c * width) for c in (64, 128, 256, 512, 1024))
    x = c2f(conv(conv("images", 3, c1, 3, 2), c1, c2, 3, 2), c2, c2, 1)
    p3 = c2f(conv(x, c2, c3, 3, 2), c3, c3, 2)
    p4 = c2f(conv(p3, c3, c4, 3, 2), c4, c4, 2)
    p5 = sppf(c2f(conv(p4, c4, c5, 3, 2), c5, c5, 1), c5, c5)
    h4 = c2f(cat([up(p5), p4]), c5 + c4, c4, 1, False)
    n3 = c2f(cat([up(h4), p3]), c4 + c3, c3, 1, False)
    n4 = c2f(cat([conv(n3, c3, c3, 3, 2), h4]), c3 + c4, c4, 1, False)
    n5 = c2f(cat([conv(n4, c4, c4, 3, 2), p5]), c4 + c5, c5, 1, False)
    heads = []
    for f, c in ((n3, c3), (n4, c4), (n5, c5)):
        box = conv(conv(conv(f, c, 64, 3), 64, 64, 3), 64, 64, 1, act=False)
        cls = conv(conv(conv(f, c, 80, 3), 80, 80, 3), 80, 80, 1, act=False)
        heads += node("Reshape", [cat([box, cls]), const("shape", np.array([0, 144, -1], np.int64))], "flat")
    nodes.append(onnx.helper.make_node("Concat", heads, ["output0"], axis=2))
    images = onnx.helper.make_tensor_value_info("images", onnx.TensorProto.FLOAT, ["N", 3, size, size])
    output = onnx.helper.make_tensor_value_info("output0", onnx.TensorProto.FLOAT, ["N", 144, None])
    graph = onnx.helper.make_graph(nodes, "yolo_like", [images], [output], inits)
    return onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)], ir_version=8)


def prepare(workdir: Path, chain_nodes: int, spatial: int) -> dict[str, dict[str, object]]:
    """BN-folded model files and the tensors calibration observes, per benchmark model."""
    sources = {"digits": onnx.load(DIGITS), f"chain{chain_nodes}": _chain(chain_nodes, spatial)}
    out: dict[str, dict[str, object]] = {}
    for name, model in sources.items():
        graph = graph_ir.from_onnx(model)
        ctx = PassContext()
        FoldBatchNorm()(graph, ctx)
        path = workdir / f"{name}.onnx"
        onnx.save(graph.to_onnx(), str(path))
        input_shape = (1, 16, 16) if name == "digits" else (32, spatial, spatial)
        out[name] = {
            "path": str(path),
            "tensors": ctx.get(QuantPlan, graph).plan.activations,
            "input_shape": input_shape,
        }
    return out


def batches(
    name: str, input_shape: tuple[int, ...], samples: int, batch: int = BATCH, input_name: str = "input"
) -> Iterator[dict[str, np.ndarray]]:
    """Batches of ``batch``, generated one at a time (real digits data for the digits model)."""
    if name == "digits":
        with np.load(ROOT / "models" / "digits_calib.npz") as data:
            x = data["input"]
        x = np.concatenate([x] * -(-samples // len(x)))[:samples]
        for i in range(0, samples, batch):
            yield {input_name: x[i : i + batch]}
        return
    rng = np.random.default_rng(0)
    for i in range(0, samples, batch):
        rows = min(batch, samples - i)
        if name == "yolo":  # images in [0, 1]
            yield {input_name: rng.random((rows, *input_shape), dtype=np.float32)}
        else:
            yield {input_name: rng.standard_normal((rows, *input_shape), dtype=np.float32)}


# --- (a) time ---------------------------------------------------------------------------------------------


def _plain(path: str, feeds: list[dict[str, np.ndarray]], spinning: bool = True) -> float:
    start = time.perf_counter()
    options = ort.SessionOptions()
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    for feed in feeds:
        session.run(None, feed)
    return time.perf_counter() - start


def _calibrate(
    model: onnx.ModelProto, tensors: list[str], feeds: list[dict[str, np.ndarray]], histogram: bool, overlap: bool
) -> tuple[float, dict]:
    start = time.perf_counter()
    observers = collect_statistics(model, tensors, feeds, histogram=histogram, progress=False, overlap=overlap)
    return time.perf_counter() - start, observers


def time_row(name: str, spec: dict[str, object], mode: str, samples: int, repeat: int) -> dict[str, float]:
    path, tensors = str(spec["path"]), list(spec["tensors"])  # type: ignore[call-overload]
    model = onnx.load(path)
    feeds = list(batches(name, spec["input_shape"], samples))  # type: ignore[arg-type]
    histogram = mode in ("enhanced", "percentile")
    best = {"plain": np.inf, "nospin": np.inf, "calib": np.inf, "serial": np.inf}
    observers: dict = {}
    _plain(path, feeds)  # warm-up
    for _ in range(repeat):
        best["plain"] = min(best["plain"], _plain(path, feeds))
        best["nospin"] = min(best["nospin"], _plain(path, feeds, spinning=False))
        seconds, observers = _calibrate(model, tensors, feeds, histogram, overlap=True)
        best["calib"] = min(best["calib"], seconds)
        best["serial"] = min(best["serial"], _calibrate(model, tensors, feeds, histogram, overlap=False)[0])
    start = time.perf_counter()
    for obs in observers.values():
        compute(obs, 8, mode)
    best["encode"] = time.perf_counter() - start
    best["tensors"] = len(tensors)
    return best


# --- (b) memory -------------------------------------------------------------------------------------------


def _status_mb(field: str) -> float:
    """VmRSS / VmHWM of this process. VmHWM (peak RSS) is per address space, so unlike ``ru_maxrss``
    it does not inherit the parent's peak across fork + exec."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) / 1024  # not Linux: best effort


def child(args: argparse.Namespace) -> None:
    """One configuration in this fresh process: print peak RSS and growth during calibration as JSON."""
    spec = json.loads(args.child)
    name, tool, method, samples = spec["name"], spec["tool"], spec["method"], spec["samples"]
    data = batches(name, tuple(spec["input_shape"]), samples, spec.get("batch", BATCH), spec.get("input", "input"))
    tensors_file = spec.get("tensors_file")
    if tensors_file:
        spec["tensors"] = json.loads(Path(tensors_file).read_text())
    model = onnx.load(spec["path"])
    before = _status_mb("VmRSS")
    start = time.perf_counter()
    digest = ""
    if tool == "qpasses":
        cap = spec.get("cap", DEFAULT_MAX_BYTES_PER_RUN)
        observers = collect_statistics(
            model, spec["tensors"], data, histogram=method == "enhanced", progress=False, max_bytes_per_run=cap
        )
        encodings = sorted((n, compute(obs, 8, method)) for n, obs in observers.items())
        digest = hashlib.sha1(repr([(n, e.scale, e.offset) for n, e in encodings]).encode()).hexdigest()[:12]
        tensors = len(observers)
    else:
        from onnxruntime.quantization.calibrate import CalibrationDataReader, CalibrationMethod, create_calibrator

        class Reader(CalibrationDataReader):
            def get_next(self) -> dict[str, np.ndarray] | None:
                return next(data, None)

        with tempfile.TemporaryDirectory() as d:
            calibrator = create_calibrator(
                spec["path"],
                augmented_model_path=os.path.join(d, "aug.onnx"),
                calibrate_method=CalibrationMethod[method],
            )
            calibrator.collect_data(Reader())
            tensors = len(calibrator.compute_data().data)
    seconds = time.perf_counter() - start
    peak = _status_mb("VmHWM")
    print(json.dumps({"peak": peak, "growth": peak - before, "seconds": seconds, "tensors": tensors, "digest": digest}))


def memory_row(name: str, spec: dict[str, object], tool: str, method: str, samples: int) -> dict:
    payload = json.dumps({**spec, "name": name, "tool": tool, "method": method, "samples": samples})
    proc = subprocess.run([sys.executable, __file__, "--child", payload], capture_output=True, text=True)
    if proc.returncode:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"rc {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --- (c) the cap per run on a YOLO-like CNN -------------------------------------------------------------------


def yolo_rows(workdir: Path, size: int, samples: int, caps: list[int], repeat: int) -> None:
    model = yolo_like(size)
    path = workdir / "yolo.onnx"
    onnx.save(model, str(path))
    graph = graph_ir.from_onnx(model)
    tensors = PassContext().get(QuantPlan, graph).plan.activations
    tensors_file = workdir / "yolo_tensors.json"
    tensors_file.write_text(json.dumps(tensors))
    shapes = {vi.name: vi for vi in onnx.shape_inference.infer_shapes(model).graph.value_info}
    per_sample = sum(
        int(np.prod([d.dim_value or 1 for d in shapes[t].type.tensor_type.shape.dim])) * 4
        for t in tensors
        if t in shapes
    )
    convs = sum(n.op_type == "Conv" for n in model.graph.node)
    print(
        f"\n(c) YOLO-like CNN: {convs} convs, {len(model.graph.node)} nodes, input 3x{size}x{size}, "
        f"{len(tensors)} activations = {per_sample / MB:.0f} MB per sample; {samples} samples; "
        f"time s / peak RSS MB of a fresh process (best / highest of {repeat})"
    )
    base = {
        "name": "yolo",
        "path": str(path),
        "tensors_file": str(tensors_file),
        "input_shape": [3, size, size],
        "input": "images",
        "samples": samples,
        "tensors": [],
    }
    configs: list[tuple[str, dict[str, object]]] = [
        ("qpasses uncapped (before), batch 16", {"tool": "qpasses", "method": "tf", "cap": None}),
        ("qpasses uncapped, batch 1", {"tool": "qpasses", "method": "tf", "cap": None, "batch": 1}),
        *[
            (
                f"qpasses cap {cap // MB} MB{' (default)' if cap == DEFAULT_MAX_BYTES_PER_RUN else ''}, batch 16",
                {"tool": "qpasses", "method": "tf", "cap": cap},
            )
            for cap in caps
        ],
        ("onnxruntime MinMax, batch 16", {"tool": "onnxruntime", "method": "MinMax"}),
        ("onnxruntime MinMax, batch 1", {"tool": "onnxruntime", "method": "MinMax", "batch": 1}),
    ]
    results: dict[str, list[dict]] = {label: [] for label, _ in configs}
    for _ in range(repeat):
        for label, extra in configs:
            results[label].append(
                memory_row("yolo", {**base, **extra}, str(extra["tool"]), str(extra["method"]), samples)
            )
    default = next(label for label, extra in configs if extra.get("cap") == DEFAULT_MAX_BYTES_PER_RUN)
    reference = next((r["digest"] for r in results[default] if "error" not in r), None)
    print(f"{'calibrator':<40} {'tensors':>7} {'time s':>8} {'peak MB':>8} {'same':>5}")
    for label, rows in results.items():
        ok = [r for r in rows if "error" not in r]
        if not ok:
            print(f"{label:<40} error: {rows[0]['error']}")
            continue
        same = "" if not ok[0]["digest"] else ("yes" if ok[0]["digest"] == reference else "NO")
        print(
            f"{label:<40} {ok[0]['tensors']:>7} {min(r['seconds'] for r in ok):>8.2f} "
            f"{max(r['peak'] for r in ok):>8.0f} {same:>5}",
            flush=True,
        )


# --- main ---------------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--chain-nodes", type=int, default=60)
    ap.add_argument("--spatial", type=int, default=32)
    ap.add_argument("--time-samples", type=int, default=256)
    ap.add_argument("--samples", type=int, nargs="+", default=[16, 64, 256])
    ap.add_argument("--skip-time", action="store_true")
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--skip-yolo", action="store_true")
    ap.add_argument("--yolo-size", type=int, default=640)
    ap.add_argument("--yolo-samples", type=int, default=64)
    ap.add_argument("--yolo-repeat", type=int, default=2)
    ap.add_argument("--caps-mb", type=int, nargs="+", default=[256, DEFAULT_MAX_BYTES_PER_RUN // MB, 16])
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    print(f"host: {os.cpu_count()} CPUs, onnxruntime {ort.__version__}, numpy {np.__version__}, batch {BATCH}")
    with tempfile.TemporaryDirectory() as d:
        specs = prepare(Path(d), args.chain_nodes, args.spatial)
        if not args.skip_time:
            print(
                f"\n(a) time, {args.time_samples} samples (best of {args.repeat}; "
                "ratio = calibration / plain FP32 inference incl. session creation)"
            )
            print(
                f"{'model':<10} {'mode':<9} {'tensors':>7} {'plain s':>8} {'nospin s':>9} {'calib s':>8} "
                f"{'ratio':>6} {'ratio*':>7} {'serial s':>9} {'ratio':>6} {'encode s':>9}"
            )
            for name, spec in specs.items():
                for mode in ("tf", "enhanced"):
                    r = time_row(name, spec, mode, args.time_samples, args.repeat)
                    print(
                        f"{name:<10} {mode:<9} {r['tensors']:>7} {r['plain']:>8.3f} {r['nospin']:>9.3f} "
                        f"{r['calib']:>8.3f} {r['calib'] / r['plain']:>6.2f} {r['calib'] / r['nospin']:>7.2f} "
                        f"{r['serial']:>9.3f} {r['serial'] / r['plain']:>6.2f} {r['encode']:>9.3f}",
                        flush=True,
                    )
            print(
                "ratio = calib / plain (default session); ratio* = calib / plain with spinning off, "
                "as the calibration session runs"
            )
        if not args.skip_memory:
            print("\n(b) peak RSS MB (growth during calibration MB) by number of samples, fresh process each")
            header = "".join(f"{n:>22}" for n in args.samples)
            print(f"{'model':<10} {'calibrator':<26} {'tensors':>7}{header}")
            configs = [("qpasses", "tf"), ("qpasses", "enhanced")] + [("onnxruntime", m) for m in ORT_METHODS]
            for name, spec in specs.items():
                for tool, method in configs:
                    cells, tensors = [], ""
                    for n in args.samples:
                        r = memory_row(name, spec, tool, method, n)
                        if "error" in r:
                            cells.append(f"{'error':>22}")
                            print(f"  {tool} {method} {n}: {r['error']}", file=sys.stderr)
                            continue
                        tensors = str(r["tensors"])
                        cells.append(f"{r['peak']:>9.0f} ({r['growth']:>6.0f}) {r['seconds']:>4.1f}s")
                    print(f"{name:<10} {tool + ' ' + method:<26} {tensors:>7}{''.join(cells)}", flush=True)
        if not args.skip_yolo:
            yolo_rows(Path(d), args.yolo_size, args.yolo_samples, [c * MB for c in args.caps_mb], args.yolo_repeat)


if __name__ == "__main__":
    main()
