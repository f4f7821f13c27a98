"""Benchmark: learned weight quantization (AdaRound, AdaScale) vs min-max and SeqMSE, side by side.

    python tools/bench/learned_rounding.py [--quick] [--models digits_cnn,...] [--corpus ppocr_cls,dnsmos_p808]
        [--transformer unidic_tagger] [--aimet-python /tmp/aimet-venv/bin/python]

Sections (each skipped when its list is empty):
- W4A8 per-channel on the shipped digits models (digits test split, 360 images): top-1 against the
  labels and SQNR of the logits vs FP32;
- W4A8 per-channel on CNNs of the real-model corpus (``tools/real_models.py``: each model's
  calibration split, its test split and its metric vs FP32), SQNR on the logits (the input of a final
  Softmax/ArgMax, added as an output) or the output;
- W4A16 on the corpus's small transformer (ALBERT tagger: the logits before its ArgMax).

Every flow runs as ``quantize --seq-mse/--adaround/--adascale`` does (encode stage, BN folded,
no automatic fallback and the outputs quantized too (``--quantize-outputs``, as AIMET does), so every
flow quantizes the same tensors; "adaround holdout 0" learns on every
calibration batch instead of holding a fifth out to choose learned or nearest rounding); AdaRound/AdaScale need
``pip install "qpasses[learn]"``. Figures with exact QDQ semantics and, after "|", in onnxruntime's
default session (fused integer kernels on this CPU). AIMET-ONNX's AdaRound runs in its own venv
(``tools/bench/aimet_adaround.py`` in a subprocess: same FP32 model, calibration data and iteration
budget; its QuantSim session is its exact semantics), after AIMET's own min-max (the same flow without
AdaRound) so its AdaRound gain reads apart from its baseline; "skipped (reason)" when that Python or
aimet_onnx is missing.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from qpasses.core.verification import exact_session, runtime_session  # noqa: E402
from qpasses.data.evaluation import sqnr_db  # noqa: E402
from qpasses.quant.config import QuantConfig  # noqa: E402
from qpasses.quantize import quantize_model  # noqa: E402

MODELS = ROOT / "models"
AIMET_SCRIPT = Path(__file__).resolve().parent / "aimet_adaround.py"
Feed = dict[str, np.ndarray]
Outputs = list[list[np.ndarray]]


@dataclass
class Case:
    """A model, its data and how a quantized version is scored against FP32."""

    name: str
    model: onnx.ModelProto  # FP32; the SQNR output is the last one
    calib: list[Feed]
    test: list[Feed]
    metric_name: str
    metric: Callable[[Outputs, Outputs], float]  # (FP32 outputs, quantized outputs) per test feed
    act_bw: int
    iterations: int  # AdaRound steps per layer (ours and AIMET's)
    epochs: int  # AdaScale epochs per block
    adascale: dict[str, Any] = field(default_factory=dict)  # further AdaScale options (learning rates)


def _with_logits(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with the input of a final Softmax/ArgMax (the logits) appended as an output."""
    out = model.graph.output[0].name
    producer = next((n for n in model.graph.node if out in n.output), None)
    if producer is None or producer.op_type not in ("Softmax", "ArgMax"):
        return model
    extended = onnx.ModelProto()
    extended.CopyFrom(model)
    extended.graph.output.append(onnx.helper.make_empty_tensor_value_info(producer.input[0]))
    return extended


def _run(session: Any, feeds: list[Feed]) -> Outputs:
    return [session.run(None, feed) for feed in feeds]


def _sqnr(fp32: Outputs, q: Outputs) -> float:
    return sqnr_db(np.concatenate([o[-1].ravel() for o in fp32]), np.concatenate([o[-1].ravel() for o in q]))


def digits_case(name: str, iterations: int, epochs: int) -> Case:
    calib = np.load(MODELS / "digits_calib.npz")["input"]
    test = np.load(MODELS / "digits_test.npz")
    labels = test["labels"]

    def top1(fp32: Outputs, q: Outputs) -> float:
        return float(np.mean(np.concatenate([o[0] for o in q]).argmax(1) == labels))

    feeds = [{"input": calib[i : i + 16]} for i in range(0, len(calib), 16)]
    return Case(
        name,
        onnx.load(MODELS / f"{name}.onnx"),
        feeds,
        [{"input": test["input"]}],
        "top-1",
        top1,
        8,
        iterations,
        epochs,
    )


def _rebatch(feeds: list[Feed], batch: int) -> list[Feed]:
    """The same samples in feeds of ``batch`` rows (0: as given): smaller steps for slow layers."""
    if batch <= 0:
        return feeds
    rows = {k: np.concatenate([f[k] for f in feeds]) for k in feeds[0]}
    count = len(next(iter(rows.values())))
    return [{k: v[i : i + batch] for k, v in rows.items()} for i in range(0, count, batch)]


def corpus_case(name: str, act_bw: int, iterations: int, epochs: int, batch: int, test: int = 0) -> Case:
    from real_models import get_model

    m = get_model(name)
    return Case(
        name,
        _with_logits(onnx.load(m.path)),
        _rebatch(m.calib_feeds(), batch),
        m.test_feeds(test or None),
        m.metric_name,
        m.metric,
        act_bw,
        iterations,
        epochs,
    )


def _flows(case: Case, extra: bool) -> list[tuple[str, dict[str, Any]]]:
    """(label, quantize_model keyword arguments) per weight flow, as the CLI's --seq-mse/--adaround/--adascale."""
    ada = {"adaround_options": {"iterations": case.iterations}}
    flows: list[tuple[str, dict[str, Any]]] = [
        ("min-max", {}),
        ("seq-mse", {"seq_mse": True}),
        ("adaround", {"adaround": True, **ada}),
        ("adaround holdout 0", {"adaround": True, "adaround_options": {"iterations": case.iterations, "holdout": 0}}),
        ("adascale", {"adascale": True, "adascale_options": {"num_epochs": case.epochs, **case.adascale}}),
    ]
    if extra:
        flows += [
            ("seq-mse + adaround", {"seq_mse": True, "adaround": True, **ada}),
            ("adaround AIMET's 10k", {"adaround": True, "adaround_options": {"iterations": 10000, "lr": 1e-3}}),
        ]
    return flows


def aimet_adaround(case: Case, bits: int, python: str, fp32: Outputs, timeout: float, iterations: int) -> str:
    """AIMET-ONNX's AdaRound in its own interpreter (``aimet_adaround.py``) on the same model, data and budget
    (``iterations`` 0: AIMET's min-max, its baseline)."""
    if not Path(python).exists():
        return (
            f"skipped (no AIMET interpreter at {python}: python -m venv /tmp/aimet-venv && "
            "/tmp/aimet-venv/bin/pip install aimet-onnx)"
        )
    with tempfile.TemporaryDirectory() as tmp:
        model, data, out = Path(tmp, "model.onnx"), Path(tmp, "data.npz"), Path(tmp, "out.npz")
        onnx.save(case.model, model)
        np.savez(
            data,
            **{
                f"{split}/{i}/{k}": v
                for split, feeds in (("calib", case.calib), ("test", case.test))
                for i, feed in enumerate(feeds)
                for k, v in feed.items()
            },
        )
        cmd = [
            python,
            str(AIMET_SCRIPT),
            str(model),
            str(data),
            str(out),
            "--bits",
            str(bits),
            "--act-bits",
            str(case.act_bw),
            "--iterations",
            str(iterations),
        ]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            return f"skipped (still running after {timeout:.0f} s)"
        if done.returncode != 0:
            lines = [ln for ln in done.stderr.strip().splitlines() if ln.strip()]
            if any("No module named 'aimet_onnx'" in ln for ln in lines):
                return "skipped (aimet_onnx is not installed in that interpreter)"
            return f"failed ({lines[-1][:160] if lines else f'exit {done.returncode}'})"
        seconds = json.loads(done.stdout.strip().splitlines()[-1])["seconds"]
        saved = np.load(out)
        q = [[saved[f"{i}/{k}"] for k in range(len(fp32[i]))] for i in range(len(case.test))]
    return (
        f"{case.metric(fp32, q):9.4f} {_sqnr(fp32, q):8.2f} {'':>8} {'':>8} {'':>8} {seconds:8.1f} "
        f"({iterations} iterations)"
    )


def bench(case: Case, bits: int, extra: bool, aimet_python: str | None, aimet_timeout: float, seeds: int = 1) -> None:
    """One table block: FP32, each flow (exact | default session; learned flows: the mean over ``seeds``
    seeds of their batch order), AIMET's AdaRound."""
    fp32 = _run(exact_session(case.model), case.test)
    print(
        f"{case.name} (W{bits}A{case.act_bw} per-channel; {sum(len(next(iter(f.values()))) for f in case.calib)} "
        f"calibration samples in {len(case.calib)} batches / {sum(len(next(iter(f.values()))) for f in case.test)} "
        f"test samples; AdaRound "
        f"{case.iterations} iterations/layer, AdaScale {case.epochs} epochs/block"
        f"{''.join(f', {k} {v}' for k, v in case.adascale.items())})"
    )
    print(
        f"  {'weights':<22} {case.metric_name[:9]:>9} {'SQNR dB':>8} {'vs m-m':>8} | {'metric':>8} "
        f"{'SQNR dB':>8} {'time s':>8} {'learn s':>8}"
    )
    print(f"  {'FP32':<22} {case.metric(fp32, fp32):9.4f}")
    base = None
    config = QuantConfig(weight_bw=bits, act_bw=case.act_bw, per_channel=True)
    for label, kwargs in _flows(case, extra):
        draws = range(seeds if "adaround" in label or "adascale" in label else 1)
        rows: list[tuple[float, float, float, float, float, float]] = []
        try:
            for seed in draws:
                start = time.perf_counter()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    result = quantize_model(
                        case.model,
                        case.calib,
                        config,
                        progress=False,
                        auto_fallback=False,
                        runtime_check=False,
                        quantize_outputs=True,  # as AIMET: every tensor, the heads too
                        seed=seed,
                        **kwargs,
                    )
                seconds = time.perf_counter() - start
                exact = _run(exact_session(result.model), case.test)
                fused = _run(runtime_session(result.model), case.test)
                learn = sum(r.seconds for r in result.report.records if r.name in ("adaround", "adascale", "seq-mse"))
                rows.append(
                    (
                        case.metric(fp32, exact),
                        _sqnr(fp32, exact),
                        case.metric(fp32, fused),
                        _sqnr(fp32, fused),
                        seconds,
                        learn,
                    )
                )
        except Exception as exc:  # noqa: BLE001 - the table reports a flow's failure and goes on
            print(f"  {label:<22} failed ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})", flush=True)
            continue
        metric, db, fused_metric, fused_db, seconds, learn = (float(np.mean(c)) for c in zip(*rows, strict=True))
        base = db if base is None else base
        gain = f"{db - base:+.2f}" if label != "min-max" else ""
        dbs = [r[1] for r in rows]
        spread = "" if len(rows) < 2 else f"  ({len(rows)} seeds: {min(dbs):.2f}..{max(dbs):.2f})"
        print(
            f"  {label:<22} {metric:9.4f} {db:8.2f} {gain:>8} | {fused_metric:8.4f} "
            f"{fused_db:8.2f} {seconds:8.1f} {learn:8.1f}{spread}",
            flush=True,
        )
    if aimet_python is not None:
        for label, iterations in (("AIMET-ONNX min-max", 0), ("AIMET-ONNX adaround", case.iterations)):
            row = aimet_adaround(case, bits, aimet_python, fp32, aimet_timeout, iterations)
            print(f"  {label:<22} {row}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="digits_cnn only, the four main flows, no corpus")
    parser.add_argument(
        "--models",
        default="digits_cnn,digits_cnn_relu6,digits_cnn_residual",
        help="shipped digits models ('' for none)",
    )
    parser.add_argument("--corpus", default="ppocr_cls,dnsmos_p808", help="corpus CNNs at W4A8 ('' for none)")
    parser.add_argument("--transformer", default="unidic_tagger", help="corpus transformer at W4A16 ('' for none)")
    parser.add_argument("--bits", type=int, default=4, help="weight bitwidth (4)")
    parser.add_argument("--iterations", type=int, default=1000, help="AdaRound steps per layer, digits (1000)")
    parser.add_argument("--corpus-iterations", type=int, default=1000, help="AdaRound steps per layer, corpus")
    parser.add_argument("--epochs", type=int, default=60, help="AdaScale epochs per block, digits (60)")
    parser.add_argument("--corpus-epochs", type=int, default=60, help="AdaScale epochs per block, corpus")
    parser.add_argument(
        "--corpus-batch", type=int, default=0, help="corpus CNNs: calibration samples per batch (0: as generated)"
    )
    parser.add_argument(
        "--corpus-test",
        type=int,
        default=128,
        help="corpus CNNs: test samples (0: the corpus's test split); 128 resolves a few tenths of a dB",
    )
    parser.add_argument(
        "--seeds", type=int, default=1, help="AdaRound/AdaScale flows: mean over this many seeds (batch order)"
    )
    parser.add_argument(
        "--transformer-lr",
        type=float,
        nargs=2,
        default=(1e-2, 5e-3),
        metavar=("CLIP", "SCALE"),
        help="AdaScale clip_lr/scale_lr on the transformer: its few epochs need 10x AIMET's rates",
    )
    parser.add_argument(
        "--aimet-python",
        default="/tmp/aimet-venv/bin/python",
        help="interpreter with aimet-onnx installed ('' to leave AIMET out)",
    )
    parser.add_argument("--aimet-timeout", type=float, default=1800.0, help="seconds per AIMET run")
    args = parser.parse_args(argv)
    try:
        import torch

        torch_version = torch.__version__
    except ImportError:
        print('AdaRound/AdaScale need torch: pip install "qpasses[learn]"')
        return 1
    names = ["digits_cnn"] if args.quick else [n for n in args.models.split(",") if n]
    corpus = [] if args.quick else [n for n in args.corpus.split(",") if n]
    transformers = [] if args.quick else [n for n in args.transformer.split(",") if n]
    aimet = args.aimet_python or None
    print(f"torch {torch_version}; figures: exact QDQ semantics | onnxruntime default session")
    for name in names:
        case = digits_case(name, args.iterations, args.epochs)
        bench(case, args.bits, not args.quick, aimet, args.aimet_timeout, args.seeds)
    for name in corpus:
        bench(
            corpus_case(name, 8, args.corpus_iterations, args.corpus_epochs, args.corpus_batch, args.corpus_test),
            args.bits,
            False,
            aimet,
            args.aimet_timeout,
            args.seeds,
        )
    for name in transformers:
        case = corpus_case(name, 16, args.corpus_iterations, args.corpus_epochs, 0)
        case.adascale = {"clip_lr": args.transformer_lr[0], "scale_lr": args.transformer_lr[1]}
        bench(case, args.bits, False, None, args.aimet_timeout, args.seeds)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
