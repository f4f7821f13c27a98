"""Benchmark: QDQ graph rewriting alone (encodings given, no calibration), qpasses vs onnxruntime.

    python tools/bench/graph_passes.py [--sizes 1000 4000 40000] [--ort-timeout 600]

Both sides get the same generated Conv/BN/Relu chain and the same ranges for every
activation (calibration excluded). qpasses: load into the IR, fold-batchnorm,
encode-weights, quantize (QDQ lowering) and lower back to a ModelProto. onnxruntime:
``QDQQuantizer(...).quantize_model()`` on the same ModelProto, fed ``tensors_range``
directly, i.e. exactly the rewriting step of ``quantize_static``. ORT runs in a
subprocess so a size that exceeds ``--ort-timeout`` is reported instead of hanging.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "tools")]

from gen_graphs import conv_bn_relu_chain  # noqa: E402

RANGE = (-4.0, 4.0)


def time_qpasses(model: onnx.ModelProto) -> float:
    import graph_ir
    from qpasses.core.context import PassContext
    from qpasses.core.pass_manager import PassManager
    from qpasses.passes import default_registry
    from qpasses.quant.plan import QuantPlan
    from qpasses.quant.range_search import from_min_max

    reg = default_registry()
    start = time.perf_counter()
    graph = graph_ir.from_onnx(model)
    ctx = PassContext()
    PassManager([reg.create_pass("fold-batchnorm")]).run(graph, ctx)
    enc = from_min_max(RANGE[0], RANGE[1], 8)
    for name in ctx.get(QuantPlan, graph).plan.activations:
        graph.tensors[name].encoding = enc
    PassManager([reg.create_pass("encode-weights", per_channel=True), reg.create_pass("quantize")]).run(graph, ctx)
    out = graph.to_onnx()
    elapsed = time.perf_counter() - start
    assert sum(n.op_type == "QuantizeLinear" for n in out.graph.node) > 0
    return elapsed


def time_ort(path: str) -> float:
    """Runs inside the subprocess: ORT's QDQ rewriting with ranges given."""
    from onnxruntime.quantization import QuantType
    from onnxruntime.quantization.calibrate import CalibrationMethod, TensorData, TensorsData
    from onnxruntime.quantization.qdq_quantizer import QDQQuantizer
    from onnxruntime.quantization.quant_utils import load_model_with_shape_infer
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

    model = load_model_with_shape_infer(Path(path))  # as quantize_static does before rewriting
    op_types = sorted(set(QLinearOpsRegistry) | set(QDQRegistry))
    names = {i.name for i in model.graph.input} | {o for n in model.graph.node for o in n.output}
    ranges = TensorsData(
        CalibrationMethod.MinMax,
        {n: TensorData(lowest=np.float32(RANGE[0]), highest=np.float32(RANGE[1])) for n in names},
    )
    start = time.perf_counter()
    q = QDQQuantizer(model, True, False, QuantType.QInt8, QuantType.QUInt8, ranges, [], [], op_types, {})
    q.quantize_model()
    return time.perf_counter() - start


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--ort-child":
        print(json.dumps({"seconds": time_ort(sys.argv[2])}))
        return
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 4000, 40000])
    ap.add_argument("--ort-timeout", type=float, default=600)
    args = ap.parse_args()
    print(f"{'nodes':>7} {'qpasses s':>10} {'us/node':>8} {'onnxruntime s':>14} {'speedup':>8}")
    time_qpasses(conv_bn_relu_chain(30))  # warm-up: imports are not rewriting time
    with tempfile.TemporaryDirectory() as d:
        for size in args.sizes:
            model = conv_bn_relu_chain(size)
            path = str(Path(d) / f"chain_{size}.onnx")
            onnx.save(model, path)
            ours = time_qpasses(model)
            try:
                r = subprocess.run(
                    [sys.executable, __file__, "--ort-child", path],
                    capture_output=True,
                    text=True,
                    timeout=args.ort_timeout,
                    check=True,
                )
                theirs = json.loads(r.stdout.strip().splitlines()[-1])["seconds"]
                ort_txt, speed = f"{theirs:14.2f}", f"{theirs / ours:7.0f}x"
            except subprocess.TimeoutExpired:
                limit = int(args.ort_timeout)
                ort_txt, speed = f"{'>' + str(limit):>14}", f"{'>' + str(int(limit / ours)):>7}x"
            print(f"{size:>7} {ours:>10.3f} {ours / size * 1e6:>8.1f} {ort_txt} {speed}", flush=True)


if __name__ == "__main__":
    main()
