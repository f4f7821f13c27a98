"""Benchmark: file -> IR -> ONNX -> file, beside plain onnx.load + onnx.save of the same file.

    python tools/bench/ir_roundtrip.py [--sizes 1000 10000 100000] [--repeat 3]

Prints one row per size: seconds for plain onnx, for the IR round trip (split into
load / lower / save), the ratio, and microseconds per node (to show linear growth).
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time
from pathlib import Path

import onnx

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from gen_graphs import conv_bn_relu_chain  # noqa: E402

import graph_ir  # noqa: E402


def _best(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        gc.collect()  # start each repetition (of either side) from the same heap state
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def bench(size: int, repeat: int, workdir: Path) -> dict[str, float]:
    src = workdir / f"chain_{size}.onnx"
    onnx.save(conv_bn_relu_chain(size), str(src))
    out_plain = workdir / f"plain_{size}.onnx"
    out_ir = workdir / f"ir_{size}.onnx"

    def plain() -> None:
        onnx.save(onnx.load(str(src)), str(out_plain))

    phases = {"load": 0.0, "lower": 0.0, "save": 0.0}

    def via_ir() -> None:
        t0 = time.perf_counter()
        g = graph_ir.load(src)
        t1 = time.perf_counter()
        model = g.to_onnx()
        t2 = time.perf_counter()
        graph_ir.save(model, out_ir)
        t3 = time.perf_counter()
        phases.update(load=t1 - t0, lower=t2 - t1, save=t3 - t2)

    t_plain = _best(plain, repeat)
    t_ir = _best(via_ir, repeat)
    assert out_ir.read_bytes() == out_plain.read_bytes(), "IR round trip must reproduce the file"
    return {"nodes": size, "plain": t_plain, "ir": t_ir, **phases}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 100000])
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    print(f"{'nodes':>8} {'onnx s':>8} {'IR s':>8} {'ratio':>6} {'IR us/node':>10}  (IR: load / lower / save s)")
    with tempfile.TemporaryDirectory() as d:
        for size in args.sizes:
            r = bench(size, args.repeat, Path(d))
            print(
                f"{r['nodes']:>8} {r['plain']:>8.3f} {r['ir']:>8.3f} {r['ir'] / r['plain']:>6.2f} "
                f"{r['ir'] / r['nodes'] * 1e6:>10.1f}  ({r['load']:.3f} / {r['lower']:.3f} / {r['save']:.3f})"
            )


if __name__ == "__main__":
    main()
