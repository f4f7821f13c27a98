"""AIMET-ONNX's AdaRound on a model and data that ``learned_rounding.py`` hands over (run in AIMET's own venv).

    /tmp/aimet-venv/bin/python tools/bench/aimet_adaround.py MODEL.onnx DATA.npz OUT.npz \\
        --bits 4 --act-bits 8 --iterations 1000

AIMET pins its own torch/onnxruntime, so it never shares the qpasses environment: the benchmark
calls this script in a subprocess. ``DATA.npz`` holds the calibration and test feeds as
``calib/<i>/<input>`` and ``test/<i>/<input>``; AIMET's flow is its documented one: BN fold,
per-channel QuantizationSimModel (its default per-channel config), ``apply_adaround`` on the
calibration feeds (skipped with ``--iterations 0``: AIMET's own min-max baseline, which tells AdaRound's
gain apart from the rest of AIMET's quantization), ``compute_encodings`` on them, then the sim session
on the test feeds.
``OUT.npz`` gets ``<i>/<k>`` (output ``k`` of test feed ``i``); the last stdout line is a JSON
object with the AdaRound + encodings seconds. This file imports nothing from qpasses.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import onnx


def _feeds(data: np.lib.npyio.NpzFile, split: str) -> list[dict[str, np.ndarray]]:
    feeds: dict[int, dict[str, np.ndarray]] = {}
    for key in data.files:
        which, index, name = key.split("/", 2)
        if which == split:
            feeds.setdefault(int(index), {})[name] = data[key]
    return [feeds[i] for i in sorted(feeds)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("data")
    parser.add_argument("out")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--act-bits", type=int, default=8)
    parser.add_argument("--iterations", type=int, default=1000, help="AdaRound steps per layer (0: no AdaRound)")
    args = parser.parse_args(argv)

    from aimet_onnx import QuantizationSimModel, apply_adaround
    from aimet_onnx.batch_norm_fold import fold_all_batch_norms_to_weight
    from aimet_onnx.common.quantsim_config.utils import get_path_for_per_channel_config

    data = np.load(args.data)
    calib, test = _feeds(data, "calib"), _feeds(data, "test")
    model = onnx.load(args.model)
    start = time.perf_counter()
    fold_all_batch_norms_to_weight(model)
    sim = QuantizationSimModel(
        model,
        param_type=f"int{args.bits}",
        activation_type=f"int{args.act_bits}",
        config_file=get_path_for_per_channel_config(),
    )
    if args.iterations > 0:
        apply_adaround(sim, calib, num_iterations=args.iterations)
    sim.compute_encodings(calib)
    seconds = time.perf_counter() - start
    outputs = {}
    for i, feed in enumerate(test):
        for k, value in enumerate(sim.session.run(None, feed)):
            outputs[f"{i}/{k}"] = value
    np.savez(args.out, **outputs)
    print(json.dumps({"seconds": seconds, "iterations": args.iterations}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
