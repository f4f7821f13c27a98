"""Benchmark: qpasses vs onnxruntime quantize_static vs NNCF on the real-model corpus (tools/real_models.py).

    python tools/bench/real_models.py [--models ppocr_cls ...] [--amp] [--json out.json]
                                      [--nncf-python /tmp/nncf-venv/bin/python] [--timeout 1200]

Per corpus model, rows: FP32; qpasses weights only (per-channel int8 weights, float activations: the
ceiling W8A8 aims at); onnxruntime ``quantize_static`` (QDQ, per-channel, uint8 activations / int8
weights, MinMax, after ``quant_pre_process``); NNCF's default ``nncf.quantize``; qpasses default (what
``qpasses quantize --per-channel`` does); qpasses ``--target ort`` (quantizers only where
onnxruntime's integer Conv/Gemm/MatMul kernels read or write: ``keep-non-mac-activations-float``); qpasses
``--target ort-vnni`` (int8 weights: u8s8 kernels, for CPUs with VNNI or ARM only); with
``--amp``, qpasses AMP (candidates 8/8,16/8,16/16, allowed
drop 0.01 of the metric, scored on the calibration feeds). All W8A8 tools get the same calibration
feeds (NNCF one sample per item). Each row: the corpus metric vs FP32 on the test split in exact QDQ
semantics (graph optimizations off) and in onnxruntime's default session (fused integer kernels, CPU
dependent), the share of Conv/Gemm/MatMul MACs onnxruntime runs in integer kernels
(``qpasses.runtime.integer_compute``), the quantize wall time (after the tool's imports, which the JSON
keeps apart as ``import_seconds``: onnxruntime's quantizer imports torch and sympy where installed) and the
quantizing process' peak RSS (each tool runs in its own subprocess); qpasses rows also say how much of
their time the runtime parity check and the automatic fallback took. After the rows, one line per model
gives each model's inference latency in onnxruntime's default session (``--latency-runs``, interleaved):
portable uint8 storage (the default) runs u8u8 kernels, which do not use VNNI. NNCF runs in a throwaway venv (see
tools/bench/nncf_quantize.py); without it the rows say ``NNCF: skipped (reason)``. A tool failing on a
model prints its reason in the row.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

import real_models as rm  # noqa: E402

NNCF_PYTHON = "/tmp/nncf-venv/bin/python"
TOOLS = ("weights_only", "ort", "nncf", "qpasses", "qpasses_ort", "qpasses_vnni", "amp")
LABELS = {
    "fp32": "FP32",
    "weights_only": "qpasses weights only",
    "ort": "ORT quantize_static",
    "nncf": "NNCF default",
    "qpasses": "qpasses default",
    "qpasses_ort": "qpasses --target ort",
    "qpasses_vnni": "qpasses (ort-vnni)",
    "amp": "qpasses AMP (drop 1%)",
}
# What each tool's worker imports before its timer starts.
_QPASSES_IMPORTS = ("qpasses.quantize",)
IMPORTS = {
    "weights_only": _QPASSES_IMPORTS,
    "qpasses": _QPASSES_IMPORTS,
    "qpasses_ort": _QPASSES_IMPORTS,
    "qpasses_vnni": _QPASSES_IMPORTS,
    "amp": (*_QPASSES_IMPORTS, "qpasses.amp"),
    # quant_pre_process imports symbolic_shape_infer (sympy; and torch, through onnxruntime.tools, when installed)
    "ort": ("onnxruntime.quantization", "onnxruntime.tools.symbolic_shape_infer", "onnx.version_converter"),
}
AMP_CANDIDATES = "8/8,16/8,16/16"
AMP_DROP = 0.01


# --- calibration data on disk (the workers run in other processes) --------------------------------------------------


def save_feeds(feeds: list[dict[str, np.ndarray]], path: Path) -> None:
    np.savez(path, **{f"{i}::{name}": arr for i, feed in enumerate(feeds) for name, arr in feed.items()})


def load_feeds(path: str | Path) -> list[dict[str, np.ndarray]]:
    data = np.load(path)
    items: dict[int, dict[str, np.ndarray]] = {}
    for key in data.files:
        index, name = key.split("::", 1)
        items.setdefault(int(index), {})[name] = data[key]
    return [items[i] for i in sorted(items)]


def one_sample_per_item(model: rm.CorpusModel, feeds: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    """Split batched feeds into single samples where every input's batch dimension is free."""
    import onnx

    proto = onnx.load(str(model.path), load_external_data=False)
    inits = {i.name for i in proto.graph.initializer}
    first = [i.type.tensor_type.shape.dim[0] for i in proto.graph.input if i.name not in inits]
    if not all(d.dim_param or not d.HasField("dim_value") for d in first):
        return feeds
    return [{k: v[j : j + 1] for k, v in feed.items()} for feed in feeds for j in range(len(next(iter(feed.values()))))]


# --- workers: one subprocess per tool ---------------------------------------------------------------------------------


def _qpasses(
    model: rm.CorpusModel, calib: list[dict[str, np.ndarray]] | None, out: Path, target: str | None = None
) -> dict[str, Any]:
    from qpasses.quant.config import QuantConfig
    from qpasses.quantize import quantize_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = quantize_model(str(model.path), calib, QuantConfig(per_channel=True), progress=False, target=target)
    _save(result.model, out)
    seconds = {rec.name: rec.seconds for rec in result.report.records}
    return {
        "fallback": [(s.tensor, round(s.alone_db, 2)) for s in result.fallback],
        "clipped": [(c.tensor, c.factor) for c in result.clipped],
        # of "seconds": the final run's runtime parity check, and the fallback's scoring and second run
        "parity_seconds": seconds.get("runtime-parity"),
        "fallback_seconds": seconds.get("auto-fallback"),
    }


def _save(proto: Any, out: Path) -> None:
    import onnx

    onnx.save(proto, str(out), save_as_external_data=proto.ByteSize() > 1_900_000_000)


def _ort(model: rm.CorpusModel, calib: list[dict[str, np.ndarray]], out: Path) -> dict[str, Any]:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.calibrate import CalibrationMethod
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.feeds = iter(calib)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.feeds, None)

    import onnx
    from onnx import version_converter

    info: dict[str, Any] = {}
    shipped = model.path
    proto = onnx.load(str(shipped))
    opset = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    if opset < 13:  # per-channel DequantizeLinear (axis) needs opset 13: quantize_static writes an invalid model
        shipped = out.with_suffix(".opset13.onnx")
        _save(version_converter.convert_version(proto, 13), shipped)
        info["note"] = f"opset {opset} -> 13 by onnx.version_converter first"
    del proto
    source = out.with_suffix(".pre.onnx")
    try:
        quant_pre_process(str(shipped), str(source))
    except Exception as e:  # noqa: BLE001 - quantize_static still runs, on the model as shipped
        reason = f"{type(e).__name__}: {str(e).splitlines()[0][:100]}"
        info["note"] = "; ".join(filter(None, [info.get("note"), f"quant_pre_process failed ({reason}); model as is"]))
        source = shipped
    quantize_static(
        str(source),
        str(out),
        Reader(),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=CalibrationMethod.MinMax,
    )
    return info


def _amp(model: rm.CorpusModel, calib: list[dict[str, np.ndarray]], out: Path) -> dict[str, Any]:
    from qpasses.amp import choose_mixed_precision

    fp32 = model.run(None, calib)
    sign = 1.0 if model.higher_is_better else -1.0

    def score(session: Any) -> float:  # scored on the calibration feeds: the test split stays unseen
        return sign * model.metric(fp32, [session.run(None, feed) for feed in calib])

    with tempfile.TemporaryDirectory() as results, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = choose_mixed_precision(
            str(model.path),
            calib,
            AMP_CANDIDATES,
            None,
            score,
            AMP_DROP,
            results,
            config={"per_channel": True},
            progress=False,
        )
    _save(r.quantized.model, out)
    counts: dict[str, int] = {}
    for cand in r.assignment.values():
        counts[str(cand)] = counts.get(str(cand), 0) + 1
    return {"note": f"bitops {r.bitops / r.baseline_bitops:.3f} of {r.baseline}; groups {counts}"}


def peak_rss_mb() -> float:
    """This process image's peak RSS (VmHWM: reset by exec, unlike ru_maxrss, which keeps the forking
    parent's size)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def worker(tool: str, name: str, workdir: Path) -> int:
    """Quantize ``name`` with ``tool`` into workdir/{tool}.onnx; time and peak RSS into workdir/{tool}.json."""
    model = rm.get_model(name)
    calib = None if tool == "weights_only" else load_feeds(workdir / "calib.npz")
    out = workdir / f"{tool}.onnx"
    fn = {
        "weights_only": _qpasses,
        "qpasses": _qpasses,
        "qpasses_ort": lambda m, c, o: _qpasses(m, c, o, target="ort"),
        "qpasses_vnni": lambda m, c, o: _qpasses(m, c, o, target="ort-vnni"),
        "ort": _ort,
        "amp": _amp,
    }[tool]
    # onnxruntime's symbolic shape inference saves a model into the working directory when it gives up
    # (quant_pre_process): this one-tool process works in its own folder.
    os.chdir(workdir)
    # Imports are timed apart (onnxruntime's quant_pre_process imports sympy, and torch where installed:
    # about 1.4 s here; NNCF's row starts after `import nncf`): "seconds" is the quantizing itself.
    start = time.perf_counter()
    for module in IMPORTS[tool]:
        importlib.import_module(module)
    import_seconds = time.perf_counter() - start
    start = time.perf_counter()
    info = fn(model, calib, out)
    info["seconds"] = time.perf_counter() - start
    info["import_seconds"] = import_seconds
    info["peak_rss_mb"] = peak_rss_mb()
    (workdir / f"{tool}.json").write_text(json.dumps(info))
    return 0


def _run_tool(tool: str, model: rm.CorpusModel, workdir: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Run one tool's subprocess; {"error": reason} when it fails or is skipped."""
    if tool == "nncf":
        if not Path(args.nncf_python).exists():
            return {"skipped": f"NNCF: skipped ({args.nncf_python} not found; see tools/bench/nncf_quantize.py)"}
        cmd = [
            args.nncf_python,
            str(ROOT / "tools" / "bench" / "nncf_quantize.py"),
            str(model.path),
            str(workdir / "items.npz"),
            str(workdir / "nncf.onnx"),
            "--json",
            str(workdir / "nncf.json"),
        ]
    else:
        cmd = [sys.executable, __file__, "--worker", tool, model.name, str(workdir)]
    try:
        # cwd: quant_pre_process leaves its temporary files (sym_shape_infer_temp.onnx, *.data) in it
        proc = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            timeout=args.timeout,
            cwd=workdir,
            env={**os.environ, "PYTHONWARNINGS": "ignore"},
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {args.timeout} s"}
    info_path = workdir / f"{tool}.json"
    if proc.returncode != 0 or not info_path.exists():
        lines = [ln for ln in (proc.stderr or proc.stdout).strip().splitlines() if ln.strip()]
        return {"error": (lines[-1] if lines else f"exit {proc.returncode}")[:200]}
    return json.loads(info_path.read_text())


# --- evaluation ------------------------------------------------------------------------------------------------------


def _default_metric(model: rm.CorpusModel, path: str) -> float:
    from qpasses.core.verification import runtime_session

    sess = runtime_session(path)
    return model.metric(model.fp32_outputs(), [sess.run(None, feed) for feed in model.test_feeds()])


def _measure(model: rm.CorpusModel, path: str, row: dict[str, Any]) -> None:
    from qpasses.runtime.integer_compute import integer_mac_share

    for key, fn in (("exact", lambda: model.evaluate(path)), ("default", lambda: _default_metric(model, path))):
        try:
            row[key] = fn()
        except Exception as e:  # noqa: BLE001 - the table reports every failure
            row[key] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
    try:
        ic = integer_mac_share(path, model.test_feeds()[0])
        row["mac_share"] = ic.share
        row["gmacs"] = ic.total_macs / 1e9
        row["float_ops"] = [(n.name, n.op_type, n.macs) for n in ic.float_ops[:8]]
        row["subgraph_ops"] = ic.subgraph_ops
    except Exception as e:  # noqa: BLE001
        row["mac_share"] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"


def bench_model(model: rm.CorpusModel, tools: list[str], args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    with tempfile.TemporaryDirectory(prefix=f"bench_{model.name}_") as tmp:
        workdir = Path(tmp)
        calib = model.calib_feeds()
        save_feeds(calib, workdir / "calib.npz")
        save_feeds(one_sample_per_item(model, calib), workdir / "items.npz")
        fp32 = {"model": model.name, "tool": "fp32", "metric": model.metric_name}
        _measure(model, str(model.path), fp32)
        rows.append(fp32)
        _print_row(model, fp32)
        for tool in tools:
            row: dict[str, Any] = {"model": model.name, "tool": tool, "metric": model.metric_name}
            info = _run_tool(tool, model, workdir, args)
            row.update(info)
            if "error" not in info and "skipped" not in info:
                _measure(model, str(workdir / f"{tool}.onnx"), row)
            rows.append(row)
            _print_row(model, row)
        paths = {"fp32": str(model.path)}
        ran = [r["tool"] for r in rows[1:] if isinstance(r.get("exact"), float)]
        paths.update({tool: str(workdir / f"{tool}.onnx") for tool in ran})
        _latencies(model, paths, rows, args.latency_runs)
    model.release()
    return rows


def _latencies(model: rm.CorpusModel, paths: dict[str, str], rows: list[dict[str, Any]], runs: int) -> None:
    """What users' inference costs: each model's default session on the first test feed, the sessions'
    runs interleaved (one run of each model in turn, ``runs`` rounds, after a warm-up) so that a noisy
    machine slows them alike; the median, in the rows as ``latency_ms`` and printed as one line."""
    if runs < 1:
        return
    from qpasses.core.verification import runtime_session

    feed = model.test_feeds()[0]
    sessions = {}
    for tool, path in paths.items():
        try:
            sessions[tool] = runtime_session(path)
            sessions[tool].run(None, feed)
        except Exception:  # noqa: BLE001 - a model that does not run has no latency; its row says why
            sessions.pop(tool, None)
    times: dict[str, list[float]] = {tool: [] for tool in sessions}
    for _ in range(runs):
        for tool, session in sessions.items():
            start = time.perf_counter()
            session.run(None, feed)
            times[tool].append(time.perf_counter() - start)
    latency = {tool: 1000 * float(np.median(t)) for tool, t in times.items()}
    for row in rows:
        if row["tool"] in latency:
            row["latency_ms"] = latency[row["tool"]]
    cells = ", ".join(f"{LABELS[t]} {ms:.1f}" for t, ms in latency.items())
    print(f"{model.name:16} default-session latency, ms per test feed (median of {runs}, interleaved): {cells}")


def _cell(value: Any, fmt: str, width: int) -> str:
    return format(value, fmt).rjust(width) if isinstance(value, float) else "-".rjust(width)


def _print_row(model: rm.CorpusModel, row: dict[str, Any]) -> None:
    line = (
        f"{model.name:16} {LABELS[row['tool']]:22} {_cell(row.get('exact'), '.4f', 8)} "
        f"{_cell(row.get('default'), '.4f', 8)} {_cell(row.get('mac_share'), '.1%', 7)} "
        f"{_cell(row.get('seconds'), '.1f', 7)} {_cell(row.get('peak_rss_mb'), '.0f', 7)}"
    )
    notes = [str(row[k]) for k in ("error", "skipped", "note") if row.get(k)]
    failures = {k: row[k] for k in ("exact", "default", "mac_share") if isinstance(row.get(k), str)}
    for reason in dict.fromkeys(failures.values()):
        notes.append(f"{'/'.join(k for k, v in failures.items() if v == reason)} failed: {reason}")
    spent = [
        f"{label} {row[k]:.1f} s"
        for k, label in (("parity_seconds", "parity check"), ("fallback_seconds", "auto-fallback"))
        if isinstance(row.get(k), float) and row[k] >= 0.05  # a fallback that only left a remark took none
    ]
    if spent:
        notes.append("of which " + ", ".join(spent))
    if row.get("clipped"):
        notes.append(f"auto-fallback clipped {len(row['clipped'])} ranges")
    if row.get("fallback"):
        notes.append(f"auto-fallback kept {len(row['fallback'])} tensors float")
    if row["tool"] == "fp32":
        notes.append(
            f"{model.metric_name} ({'higher' if model.higher_is_better else 'lower'} is better), "
            f"{row.get('gmacs', float('nan')):.2f} GMACs/test feed"
        )
    print(line + ("  " + "; ".join(notes) if notes else ""), flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", help="corpus models (default: all)")
    ap.add_argument("--amp", action="store_true", help="also run qpasses AMP with allowed drop 0.01 (slow)")
    ap.add_argument(
        "--tools",
        nargs="*",
        choices=TOOLS[:-1],
        default=list(TOOLS[:-1]),
        help="tools to run (default all; none with --amp for the AMP row alone)",
    )
    ap.add_argument("--nncf-python", default=NNCF_PYTHON, help=f"Python of a venv with nncf (default {NNCF_PYTHON})")
    ap.add_argument("--timeout", type=int, default=1800, help="seconds per tool and model")
    ap.add_argument("--json", help="also write the rows to this file")
    ap.add_argument(
        "--latency-runs", type=int, default=7, help="interleaved default-session runs per model for latency (0: off)"
    )
    ap.add_argument("--worker", nargs=3, metavar=("TOOL", "MODEL", "WORKDIR"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        tool, name, workdir = args.worker
        try:
            return worker(tool, name, Path(workdir))
        except Exception as e:  # noqa: BLE001 - the last line of stderr is the row's reason
            traceback.print_exc()
            print(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", file=sys.stderr)
            return 1
    models = rm.load_corpus(names=args.models)
    missing = [m.name for m in models if not m.available]
    if missing:
        print(f"not fetched: {missing}; run python tools/real_models.py fetch", file=sys.stderr)
        return 1
    tools = list(args.tools) + (["amp"] if args.amp else [])
    print(f"{'model':16} {'tool':22} {'exact':>8} {'default':>8} {'int MAC':>7} {'quant s':>7} {'RSS MB':>7}  notes")
    rows = []
    for model in models:
        rows += bench_model(model, tools, args)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
