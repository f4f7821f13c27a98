"""Benchmark: per-channel min-max weight encodings vs SeqMSE, W4A8 and W8A8, one run.

    python tools/bench/seq_mse.py [--quick]

Models (digits test split, 360 images):
- ``digits_cnn`` (shipped): test top-1 against the labels, SQNR of the logits vs FP32;
- ``digits_cnn_relu6`` / ``digits_cnn_residual`` (shipped variants, same metrics) for context: how
  much of a single small model's end-to-end figure is luck (error cancellation across layers);
- ``deep_digits`` (generated here): 10 weighted layers (dense, strided, depthwise, 1x1 convs with
  BN, two Gemms) on the digits input, heavy-tailed (Student-t) weights like trained nets have, BN
  statistics set from the data so activations stay normalised. No labels: "accuracy" is top-1
  agreement with the FP32 model.
SeqMSE rows: each input symmetry (symqt is AIMET's default), 20 candidates, 4 batches of 16,
mse loss. "time s" is the whole ``quantize_model`` call (fold BN, search, calibrate on all 256
calibration images, lower); "search s" the seq-mse pass alone.
If aimet-onnx is importable its ``apply_seq_mse`` runs on the same model and data.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from qpasses.data.evaluation import sqnr_db as sqnr  # noqa: E402
from qpasses.quant.config import QuantConfig  # noqa: E402
from qpasses.quantize import quantize_model  # noqa: E402

MODELS = ROOT / "models"
CALIB = str(MODELS / "digits_calib.npz")
SYMMETRIES = ("symqt", "symfp", "asym")


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def _run(model: onnx.ModelProto, x: np.ndarray, outputs: list[str] | None = None) -> list[np.ndarray]:
    return _session(model).run(outputs, {"input": x})


def deep_digits(seed: int = 0) -> onnx.ModelProto:
    """A deeper CNN on the digits input with heavy-tailed random weights and data-set BN statistics."""
    rng = np.random.default_rng(seed)
    inits: list[onnx.TensorProto] = []
    nodes: list[onnx.NodeProto] = []
    bns: list[tuple[str, str, int]] = []  # (BN input, prefix, channels)

    def weight(name: str, shape: tuple[int, ...], fan_in: int) -> str:
        t = rng.standard_t(4, size=shape)
        inits.append(numpy_helper.from_array((t / t.std() * np.sqrt(2.0 / fan_in)).astype(np.float32), name))
        return name

    x = "input"
    # (out channels, in channels, kernel, stride, group)
    convs = [
        (16, 1, 3, 1, 1),
        (32, 16, 3, 2, 1),
        (32, 32, 3, 1, 32),
        (48, 32, 1, 1, 1),
        (48, 48, 3, 2, 48),
        (64, 48, 1, 1, 1),
        (64, 64, 3, 1, 1),
        (64, 64, 1, 1, 1),
    ]
    for i, (cout, cin, k, s, g) in enumerate(convs):
        p = f"conv{i}"
        w = weight(f"{p}.w", (cout, cin // g, k, k), cin // g * k * k)
        nodes.append(
            helper.make_node(
                "Conv", [x, w], [f"{p}.out"], name=p, kernel_shape=[k, k], strides=[s, s], pads=[k // 2] * 4, group=g
            )
        )
        for suffix, value in (
            ("scale", rng.uniform(0.5, 1.5, cout)),
            ("bias", rng.normal(0.2, 0.3, cout)),
            ("mean", np.zeros(cout)),
            ("var", np.ones(cout)),
        ):
            inits.append(numpy_helper.from_array(value.astype(np.float32), f"{p}.bn.{suffix}"))
        nodes.append(
            helper.make_node(
                "BatchNormalization",
                [f"{p}.out"] + [f"{p}.bn.{s}" for s in ("scale", "bias", "mean", "var")],
                [f"{p}.bn_out"],
                name=f"{p}.bn",
            )
        )
        nodes.append(helper.make_node("Relu", [f"{p}.bn_out"], [f"{p}.act"], name=f"{p}.relu"))
        bns.append((f"{p}.out", p, cout))
        x = f"{p}.act"
    nodes.append(helper.make_node("GlobalAveragePool", [x], ["gap"], name="gap"))
    nodes.append(helper.make_node("Flatten", ["gap"], ["flat"], name="flatten", axis=1))
    w = weight("fc1.w", (32, 64), 64)
    inits.append(numpy_helper.from_array(rng.normal(0, 0.1, 32).astype(np.float32), "fc1.b"))
    nodes.append(helper.make_node("Gemm", ["flat", w, "fc1.b"], ["fc1.out"], name="fc1", transB=1))
    nodes.append(helper.make_node("Relu", ["fc1.out"], ["fc1.act"], name="fc1.relu"))
    w = weight("fc2.w", (32, 10), 32)
    inits.append(numpy_helper.from_array(np.zeros(10, np.float32), "fc2.b"))
    nodes.append(helper.make_node("Gemm", ["fc1.act", w, "fc2.b"], ["logits"], name="fc2"))
    graph = helper.make_graph(
        nodes,
        "deep_digits",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, 16, 16])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)

    # BN statistics from the data, layer by layer, so each BN normalises what it really sees.
    calib = np.load(CALIB)["input"]
    by_name = {t.name: t for t in model.graph.initializer}
    for out, p, _ in bns:
        with_out = onnx.ModelProto()
        with_out.CopyFrom(model)
        with_out.graph.output.append(helper.make_tensor_value_info(out, TensorProto.FLOAT, None))
        y = _run(with_out, calib, [out])[0]
        by_name[f"{p}.bn.mean"].CopyFrom(numpy_helper.from_array(y.mean(axis=(0, 2, 3)), f"{p}.bn.mean"))
        by_name[f"{p}.bn.var"].CopyFrom(numpy_helper.from_array(y.var(axis=(0, 2, 3)) + 1e-5, f"{p}.bn.var"))
    onnx.checker.check_model(model)
    return model


def _aimet_row(model: onnx.ModelProto, weight_bw: int, x: np.ndarray, reference: np.ndarray) -> str:
    """AIMET-ONNX's own flow on the same model and data: BN fold, per-channel QuantSim, apply_seq_mse."""
    try:
        import copy

        from aimet_onnx import QuantizationSimModel, apply_seq_mse
        from aimet_onnx.batch_norm_fold import fold_all_batch_norms_to_weight
        from aimet_onnx.common.quantsim_config.utils import get_path_for_per_channel_config
    except ImportError:
        return "skipped (aimet_onnx not installed)"
    folded = copy.deepcopy(model)
    fold_all_batch_norms_to_weight(folded)
    calib = np.load(CALIB)["input"]
    feeds = [{"input": calib[i : i + 16]} for i in range(0, len(calib), 16)]
    fp = _run(model, x)[0]
    cells = []
    for seq in (False, True):
        sim = QuantizationSimModel(
            copy.deepcopy(folded),
            param_type=f"int{weight_bw}",
            activation_type="int8",
            config_file=get_path_for_per_channel_config(),
        )
        start = time.perf_counter()
        if seq:
            apply_seq_mse(sim, feeds[:4], num_candidates=20)
        sim.compute_encodings(feeds)
        seconds = time.perf_counter() - start
        out = sim.session.run(None, {"input": x})[0]
        cells.append(
            f"{'seq-mse' if seq else 'min-max'} top-1 {np.mean(out.argmax(1) == reference):.4f} "
            f"SQNR {sqnr(fp, out):.2f} dB in {seconds:.2f} s"
        )
    return "; ".join(cells)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="digits model, W4A8 only")
    args = parser.parse_args(argv)
    test = np.load(MODELS / "digits_test.npz")
    x, labels = test["input"], test["labels"]
    models = {"digits_cnn": onnx.load(MODELS / "digits_cnn.onnx")}
    if not args.quick:
        for variant in ("digits_cnn_relu6", "digits_cnn_residual"):
            models[variant] = onnx.load(MODELS / f"{variant}.onnx")
        models["deep_digits"] = deep_digits()
    variants: list[tuple[str, dict | None]] = [("min-max", None)] + [
        (f"seq-mse {s}", {"inp_symmetry": s}) for s in SYMMETRIES
    ]
    print(
        f"{'model':<20} {'config':<6} {'BC':<3} {'weights':<16} {'accuracy':>9} {'SQNR dB':>8} {'vs min-max':>10} "
        f"{'time s':>7} {'search s':>8}"
    )
    for name, model in models.items():
        fp = _run(model, x)[0]
        reference = fp.argmax(axis=1) if name == "deep_digits" else labels
        print(f"{name:<20} {'FP32':<6} {'':<16} {np.mean(fp.argmax(1) == reference):9.4f} {'':>8}")
        for bits, bc in itertools.product((4,) if args.quick else (4, 8), (False, True)):
            base = None
            for label, options in variants:
                config = QuantConfig(weight_bw=bits, act_bw=8, per_channel=True)
                start = time.perf_counter()
                result = quantize_model(
                    model,
                    CALIB,
                    config,
                    seq_mse=options is not None,
                    seq_mse_options=options,
                    bias_correction=bc,
                    progress=False,
                    quantize_outputs=True,  # every tensor, the heads too: as AIMET's QuantSim
                )
                seconds = time.perf_counter() - start
                q = _run(result.model, x)[0]
                db = sqnr(fp, q)
                base = db if base is None else base
                gain = f"{db - base:+.2f}" if options is not None else ""
                search = sum(r.seconds for r in result.report.records if r.name == "seq-mse")
                print(
                    f"{name:<20} W{bits}A8{'':<2} {'on' if bc else 'off':<3} {label:<16} "
                    f"{np.mean(q.argmax(1) == reference):9.4f} "
                    f"{db:8.2f} {gain:>10} {seconds:7.2f} {search:8.2f}"
                )
            if not bc:
                print(f"{name:<20} W{bits}A8{'':<2} {'':<3} {'aimet-onnx':<16} {_aimet_row(model, bits, x, reference)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
