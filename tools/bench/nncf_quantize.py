"""NNCF's default post-training quantization of an ONNX model, for tools/bench/real_models.py.

    /tmp/nncf-venv/bin/python tools/bench/nncf_quantize.py MODEL.onnx ITEMS.npz OUT.onnx [--json INFO.json]

Run with a throwaway venv's Python, never qpasses' own (NNCF is no dependency of qpasses; its ONNX
backend needs no OpenVINO):

    python -m venv /tmp/nncf-venv && /tmp/nncf-venv/bin/pip install nncf==3.4.0 onnx onnxruntime numpy

ITEMS.npz holds the calibration items as ``{index}::{input name}`` arrays; each item is one feed
dict, and real_models.py gives one sample per item (NNCF's statistics, e.g. its mean-of-per-item
minima for activations, depend on how samples are batched). ``nncf.quantize(model,
nncf.Dataset(items))`` with every default (preset PERFORMANCE, subset_size 300, fast bias correction).
The JSON gets the quantize wall time and this process' peak RSS.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def peak_rss_mb() -> float:
    """This process image's peak RSS (VmHWM: reset by exec, unlike ru_maxrss, which keeps the forking
    parent's size)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def load_items(path: str) -> list[dict]:
    import numpy as np

    data = np.load(path)
    items: dict[int, dict] = {}
    for key in data.files:
        index, name = key.split("::", 1)
        items.setdefault(int(index), {})[name] = data[key]
    return [items[i] for i in sorted(items)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("items")
    ap.add_argument("output")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    import nncf
    import onnx

    model = onnx.load(args.model)
    items = load_items(args.items)
    start = time.perf_counter()
    quantized = nncf.quantize(model, nncf.Dataset(items))
    seconds = time.perf_counter() - start
    large = quantized.ByteSize() > 1_900_000_000
    onnx.save(quantized, args.output, save_as_external_data=large)
    info = {"seconds": seconds, "peak_rss_mb": peak_rss_mb(), "nncf": nncf.__version__, "items": len(items)}
    if args.json:
        Path(args.json).write_text(json.dumps(info))
    print(json.dumps(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
