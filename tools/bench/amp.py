"""Benchmark: AMP on the digits CNN (one-session simulation vs a rebuilt QDQ model per evaluation) and
on a generated YOLOv8n-size detector (phase 1 exhaustive vs by proxy; simulation cost vs FP32).

    python tools/bench/amp.py [--candidates 8/4,8/8,16/16] [--drop 0.01] [--repeats 20]
                              [--only digits|yolo] [--yolo-images 256] [--yolo-drop 0.02] [--yolo-exhaustive]

1. Evaluations per second for random assignments: the simulation (one session; an assignment is
   new input values) vs ``quantize_model`` + a new ``InferenceSession`` per evaluation (what a
   naive AMP, or AIMET without ``phase1_optimize``, does). Both score the full test split.
2. Full AMP runs (phase 1 on 120 test images, phase 2 on all 360): evaluations, session builds
   and wall time per phase, with the simulation and with ``simulate=False``; the pareto points
   found and the BitOps of the chosen point vs all-int16; the full curve (allowed drop None).
3. If aimet-onnx is installed: AIMET's ``choose_mixed_precision`` on the same model (BatchNorm folded
   by ``fold_all_batch_norms_to_weight``, a ``QuantizationSimModel`` at the highest candidate calibrated
   on the same calibration split), the same candidates, callbacks (top-1, phase 1 on the same 120
   images, phase 2 on all 360), allowed drop and calibration data, side by side with our simulation
   row. AIMET takes the first best-scoring candidate as its baseline, so a tie depends on the order
   of the candidates: it runs once lowest first (``parse_candidates``' order) and once highest first
   (our tie-break).
   Otherwise the script prints ``AIMET AMP: skipped (reason)``.
4. A YOLOv8n-size detector (``yolov8n_like``: 64 Conv, SiLU as Sigmoid*Mul, C2f split/concat blocks,
   SPPF, nearest upsampling, a 3-level decoupled head with DFL; random weights rescaled layer by layer
   as BatchNorm leaves a trained net, a few outlier channels; deterministic), 320x320, candidates
   8/8,16/8,16/16, and a detection metric (``DetectionAgreement``: the FP32 model's top-100 detections
   per image kept with the same class and a box within 5%), as a user's ``evaluate`` would be:
   a. simulation cost per image vs FP32: the full fake-quant session through ``InferenceSession.run``
      (before), the same session through IO binding, and the pruned session of the assignment's layout;
   b. AMP with phase 1 exhaustive vs by proxy on the same topology at 160x160 and a quarter of the
      channels (the same 205 groups, 269 phase-1 pairs; an exhaustive run takes minutes there);
   c. AMP by proxy on the full-size model with the metric on ``--yolo-images`` images (``--yolo-exhaustive``
      adds the exhaustive run; otherwise its time is extrapolated from the measured cost of one call).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import logging
import os
import sys
import tempfile
import time
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from qpasses.amp import choose_mixed_precision, parse_candidates, top1_accuracy  # noqa: E402
from qpasses.amp.bitops import mac_table  # noqa: E402
from qpasses.amp.candidates import Candidate, collapse_unweighted, effective_bits, filter_candidates  # noqa: E402
from qpasses.amp.evaluators import RebuildScorer, ScorerSpec, SimulationScorer  # noqa: E402
from qpasses.amp.groups import find_groups  # noqa: E402
from qpasses.amp.preparation import op_kernels as _op_kernels  # noqa: E402
from qpasses.amp.preparation import prepare_graph  # noqa: E402
from qpasses.amp.sensitivity import phase1_tasks  # noqa: E402
from qpasses.amp.statistics import calibrate_once  # noqa: E402
from qpasses.core.verification import session_options  # noqa: E402
from qpasses.data.sources import CalibrationData  # noqa: E402
from qpasses.quant.config import QuantConfig  # noqa: E402
from qpasses.quant.precision_type import Precision  # noqa: E402

MODEL = str(ROOT / "models" / "digits_cnn.onnx")
CALIB = str(ROOT / "models" / "digits_calib.npz")
TEST = str(ROOT / "models" / "digits_test.npz")


def evaluations_per_second(candidates: str, repeats: int) -> None:
    graph = prepare_graph(MODEL)
    part = find_groups(graph)
    feeds = [dict(f) for f in CalibrationData.from_source(CALIB, graph, batch_size=16)]
    cands = parse_candidates(candidates)
    config = QuantConfig()
    metric = top1_accuracy(TEST)
    callbacks = {"phase1": metric, "phase2": metric}
    model = graph.to_onnx().SerializeToString()
    start = time.perf_counter()
    tables = calibrate_once(
        graph,
        feeds,
        config,
        act_bitwidths=sorted({c.act.bitwidth for c in cands}),
        weight_bitwidths=sorted({c.param.bitwidth for c in cands}),
        bias_correction=True,
        batch_size=16,
    )
    setup = time.perf_counter() - start
    rng = np.random.default_rng(0)
    assignments = [{g: cands[rng.integers(len(cands))] for g in part.names} for _ in range(repeats)]

    start = time.perf_counter()
    sim = SimulationScorer(ScorerSpec(model, part, config, callbacks, tables))
    build = time.perf_counter() - start
    start = time.perf_counter()
    sim_scores = [sim.score(a, "phase2") for a in assignments]
    sim_time = time.perf_counter() - start

    real = RebuildScorer(ScorerSpec(model, part, config, callbacks, None, feeds))
    start = time.perf_counter()
    real_scores = [real.score(a, "phase2") for a in assignments]
    real_time = time.perf_counter() - start

    same = sum(abs(a - b) < 1e-12 for a, b in zip(sim_scores, real_scores, strict=True))
    print(
        f"## Evaluations per second ({repeats} random assignments of {len(part)} groups, candidates {candidates},"
        " 360 test images each)\n"
    )
    print("| scorer | evals/s | s/eval | session builds | one-time setup |")
    print("|---|---|---|---|---|")
    print(
        f"| simulation (one session) | {repeats / sim_time:.1f} | {sim_time / repeats * 1e3:.1f} ms | "
        f"{sim.stats.session_builds} | calibration+bias tables {setup:.2f} s, session {build:.2f} s |"
    )
    print(
        f"| rebuild QDQ + session | {repeats / real_time:.1f} | {real_time / repeats * 1e3:.1f} ms | "
        f"{real.stats.session_builds} | - (calibrates inside every build: "
        f"{real.stats.build_seconds / repeats * 1e3:.0f} ms/build) |"
    )
    print(f"\nspeed-up {real_time / sim_time:.1f}x; identical scores for {same}/{repeats} assignments\n")


def full_runs(candidates: str, drop: float | None) -> dict[str, Any]:
    phase1, phase2 = top1_accuracy(TEST, limit=120), top1_accuracy(TEST)
    print(f"## Full AMP runs (candidates {candidates}; phase 1 on 120 images, phase 2 on 360)\n")
    print(
        "| run | allowed drop | phase-1 evals | phase-2 evals | other evals | session builds | phase 1+2 s | "
        "total s | pareto points | chosen BitOps / all-16/16 | score (FP32) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as out:  # warm-up: imports (matplotlib...) are not AMP's time
        choose_mixed_precision(MODEL, CALIB, candidates, phase1, phase2, drop, out, progress=False)
    rows = [
        ("simulation", drop, True, "binary", "exhaustive"),
        ("rebuild per eval", drop, False, "binary", "auto"),
        ("simulation, full curve", None, True, "binary", "exhaustive"),
        ("simulation, demotion", drop, True, "demotion", "auto"),
        ("simulation, phase 1 by proxy", drop, True, "binary", "proxy"),
    ]
    for label, d, simulate, algorithm, mode in rows:
        with tempfile.TemporaryDirectory() as out:
            start = time.perf_counter()
            r = choose_mixed_precision(
                MODEL,
                CALIB,
                candidates,
                phase1,
                phase2,
                d,
                out,
                simulate=simulate,
                algorithm=algorithm,
                phase1=mode,
                progress=False,
            )
            wall = time.perf_counter() - start
        s = r.stats
        p1 = s.get("phase1")
        p2 = s.get("phase2") or s.get("demotion")
        other = sum(v.evaluations for k, v in s.items() if k not in ("phase1", "phase2", "demotion"))
        builds = sum(v.session_builds for v in s.values())
        secs = sum(v.seconds for k, v in s.items() if k in ("phase1", "phase2", "demotion"))
        print(
            f"| {label} | {d} | {p1.evaluations if p1 else 0} | {p2.evaluations if p2 else 0} | {other} | "
            f"{builds} | {secs:.2f} | {wall:.2f} | {len(r.pareto)} | {r.bitops / r.baseline_bitops:.3f} | "
            f"{r.score:.4f} ({r.fp32_score:.4f}) |"
        )
        if label == "simulation":
            ours = {
                "run": "qpasses simulation",
                "baseline": str(r.baseline),
                "p1": p1.evaluations if p1 else 0,
                "p2": p2.evaluations if p2 else 0,
                "other": other,
                "calib": "-",
                "builds": builds,
                "secs": secs,
                "wall": wall,
                "pareto": len(r.pareto),
                "rel": r.bitops / r.baseline_bitops,
                "score": r.score,
                "fp32": r.fp32_score,
            }
        if label == "simulation, full curve":
            curve = ", ".join(f"{p.relative_bitops:.3f}:{p.score:.3f}" for p in r.pareto)
            full_curve = f"\nfull curve (relative BitOps:score): {curve}\n"
        if algorithm == "demotion":
            demoted = f"demotion promotions (kept 16/16): {r.promotions}"
    print(full_curve)
    print(demoted)
    return ours


def _aimet_bitops(model: Any, sim: Any, mac_dict: dict[str, int]) -> float:
    """BitOps (MACs x activation bits x weight bits, AIMET's Conv/Gemm MACs) of the sim's *actual* quantizers.

    A MAC op's activation bits are those of the enabled quantizer nearest upstream of its data input
    (through unquantized MaxPool/Flatten outputs), its weight bits those of its weight's quantizer.
    Float bits count sqrt(1.5) times, as in AIMET and qpasses.
    """
    from aimet_onnx.common.amp.utils import get_effective_bitwidth

    quantizers = {name: q for name, q in sim.qc_quantize_op_dict.items() if q.enabled}
    producer = {out: node for node in model.graph.node for out in node.output}

    def bits(tensor: str) -> float:
        while tensor not in quantizers:
            node = producer.get(tensor)
            if node is None or not node.input:
                raise RuntimeError(f"no enabled quantizer upstream of {tensor!r}")
            tensor = node.input[0]
        q = quantizers[tensor]
        return get_effective_bitwidth(q.data_type, q.bitwidth)

    total = 0.0
    for node in model.graph.node:
        if node.name in mac_dict:
            total += mac_dict[node.name] * bits(node.input[0]) * bits(node.input[1])
    return total


def _aimet_amp(
    cands: list[Candidate], drop: float | None, phase1: Any, phase2: Any, calib: list[dict[str, np.ndarray]]
) -> dict[str, Any]:
    """One AIMET ``choose_mixed_precision`` run; counts every callback, times the whole flow."""
    import onnx
    from aimet_onnx import mixed_precision as aimet_mp
    from aimet_onnx.amp.utils import create_mac_dict
    from aimet_onnx.batch_norm_fold import fold_all_batch_norms_to_weight
    from aimet_onnx.common.defs import CallbackFunc, QuantizationDataType
    from aimet_onnx.quantsim import QuantizationSimModel

    counts: Counter[str] = Counter()
    sessions: list[Any] = []  # every distinct session a callback saw (kept alive so ids stay unique)

    def seen(session: Any) -> None:
        if not any(session is s for s in sessions):
            sessions.append(session)

    def counted(key: str, fn: Any) -> Any:
        def call(session: Any, _args: Any) -> float:
            counts[key] += 1
            seen(session)
            return fn(session)

        return CallbackFunc(call)

    def forward(session: Any, _args: Any = None) -> None:  # one calibration pass over the calibration split
        counts["calib"] += 1
        seen(session)
        for feed in calib:
            session.run(None, feed)

    def aimet_candidate(c: Candidate) -> tuple[tuple[int, Any], tuple[int, Any]]:
        return (
            (c.act.bitwidth, QuantizationDataType[c.act.dtype]),
            (c.param.bitwidth, QuantizationDataType[c.param.dtype]),
        )

    def qtype_name(p: Any) -> str:
        return f"{'float' if p.is_float else 'int'}{p.bitwidth}"

    algos: list[Any] = []
    base_cls = aimet_mp.GreedyMixedPrecisionAlgo

    class Recording(base_cls):  # keeps the algorithm object: baseline, phase times, final score
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            algos.append(self)

    highest = max(cands, key=lambda c: c.sort_key)
    start = time.perf_counter()
    model = onnx.load(MODEL)
    fold_all_batch_norms_to_weight(model)
    sim = QuantizationSimModel(model, param_type=qtype_name(highest.param), activation_type=qtype_name(highest.act))
    sim.compute_encodings(forward)
    aimet_mp.GreedyMixedPrecisionAlgo = Recording
    try:
        with tempfile.TemporaryDirectory() as out:
            amp_start = time.perf_counter()
            pareto = aimet_mp.choose_mixed_precision(
                sim,
                [aimet_candidate(c) for c in cands],
                counted("p1", phase1),
                counted("p2", phase2),
                drop,
                results_dir=out,
                clean_start=True,
                forward_pass_callback=CallbackFunc(forward),
                use_all_amp_candidates=True,
            )
            amp_wall = time.perf_counter() - amp_start
    finally:
        aimet_mp.GreedyMixedPrecisionAlgo = base_cls
    wall = time.perf_counter() - start
    algo = algos[-1]
    pareto = pareto or []
    mac_dict = create_mac_dict(sim)
    per_mac = effective_bits(highest.act) * effective_bits(highest.param)
    all_highest = sum(mac_dict.values()) * per_mac
    (ab, adt), (pb, pdt) = algo.baseline_candidate
    base = Candidate(Precision(adt.name, ab), Precision(pdt.name, pb))
    to_highest = base.cost / per_mac  # AIMET's pareto BitOps are relative to its baseline
    phase_minutes = [m for m in (algo.time_taken_phase1, algo.time_taken_phase2) if m is not None]
    return {
        "baseline": str(base),
        "p1": counts["p1"],
        "p2": len(pareto),
        "other": counts["p2"] - len(pareto),
        "calib": counts["calib"],
        "builds": len(sessions),
        "secs": sum(phase_minutes) * 60,
        "wall": wall,
        "amp_wall": amp_wall,
        "pareto": len(pareto),
        "rel": _aimet_bitops(model, sim, mac_dict) / all_highest,
        "score": algo._final_eval_score,
        "fp32": algo.fp32_accuracy,
        "curve": [(p[0] * to_highest, p[1]) for p in pareto],
    }


def aimet_runs(candidates: str, drop: float | None, ours: dict[str, Any]) -> None:
    """AIMET's AMP next to our simulation row, or a ``skipped (reason)`` line."""
    if importlib.util.find_spec("aimet_onnx") is None:
        print("\nAIMET AMP: skipped (aimet_onnx not installed)")
        return
    cands = parse_candidates(candidates)  # lowest to highest cost
    highest = cands[-1]
    orders = [
        ("AIMET, candidates lowest first", cands),
        ("AIMET, candidates highest first", sorted(cands, key=lambda c: c.sort_key, reverse=True)),
    ]
    phase1, phase2 = top1_accuracy(TEST, limit=120), top1_accuracy(TEST)
    with np.load(CALIB) as npz:
        arrays = {k: npz[k] for k in npz.files if k != "labels"}
    n = len(next(iter(arrays.values())))
    calib = [{k: v[i : i + 16] for k, v in arrays.items()} for i in range(0, n, 16)]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # AIMET's deprecation / torch warnings on every calibration
            import aimet_onnx.amp.utils  # noqa: F401  (every AIMET module first: they configure logging)
            import aimet_onnx.batch_norm_fold  # noqa: F401
            import aimet_onnx.mixed_precision  # noqa: F401
            import aimet_onnx.quantsim  # noqa: F401
            from aimet_onnx.common.utils import AimetLogger

            AimetLogger()
            AimetLogger.set_level_for_all_areas(logging.ERROR)  # AIMET logs INFO lines to stdout
            _aimet_amp(cands, drop, phase1, phase2, calib)  # warm-up: imports (bokeh...) are not AMP's time
            rows = [{"run": label, **_aimet_amp(order, drop, phase1, phase2, calib)} for label, order in orders]
    except Exception as exc:  # a clear line instead of a traceback: the section is optional
        print(f"\nAIMET AMP: skipped ({type(exc).__name__}: {' '.join(str(exc).split())[:300]})")
        return
    version = importlib.metadata.version("aimet-onnx")
    print(
        f"\n## AIMET AMP side by side (aimet-onnx {version}; candidates {candidates}, allowed drop {drop}, "
        "phase 1 on 120 images, phase 2 on 360, same calibration split)\n"
    )
    print(
        "| run | baseline | phase-1 evals | phase-2 evals | other evals | calibration passes | session builds | "
        f"phase 1+2 s | total s | pareto points | chosen BitOps / all-{highest} | score (FP32) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in [ours, *rows]:
        print(
            f"| {r['run']} | {r['baseline']} | {r['p1']} | {r['p2']} | {r['other']} | {r['calib']} | {r['builds']} | "
            f"{r['secs']:.2f} | {r['wall']:.2f} | {r['pareto']} | {r['rel']:.3f} | "
            f"{r['score']:.4f} ({r['fp32']:.4f}) |"
        )
    amp_secs = ", ".join(f"{r['amp_wall']:.2f}" for r in rows)
    print(
        "\nAIMET: phase-2 evals = pareto points scored; other = FP32, each candidate everywhere, final score; "
        f"calibration passes = forward passes over the {n} calibration images (compute_encodings, incl. the "
        "initial one); total s = BN fold + QuantizationSimModel + calibration + choose_mixed_precision "
        f"({amp_secs} s of it). Chosen BitOps from the sim's final "
        "quantizer bitwidths; score is AIMET's final phase-2 score on its sim (ours: the saved QDQ model)."
    )
    for r in rows:
        curve = ", ".join(f"{b:.3f}:{s:.3f}" for b, s in r["curve"])
        print(
            f"{r['run']}, pareto points in AIMET's list order (relative BitOps vs all-{highest}:score): {curve or '-'}"
        )


# --- 4. a YOLOv8n-size detector -------------------------------------------------------------------


class _Builder:
    """Nodes and initializers of a generated CNN (names numbered in creation order)."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.targets: dict[str, tuple[float, float]] = {}  # conv -> (output std, bias shift) after rescaling
        self.count = 0

    def _name(self, prefix: str) -> str:
        self.count += 1
        return f"{prefix}{self.count}"

    def const(self, array: np.ndarray, prefix: str = "c") -> str:
        name = self._name(prefix)
        self.inits.append(numpy_helper.from_array(array, name))
        return name

    def node(self, op: str, inputs: list[str], outputs: int = 1, prefix: str | None = None, **attrs: Any) -> Any:
        name = self._name(prefix or op.lower())
        outs = [f"{name}_{i}" for i in range(outputs)] if outputs > 1 else [name]
        self.nodes.append(helper.make_node(op, inputs, outs, name=name, **attrs))
        return outs if outputs > 1 else outs[0]

    def conv(
        self,
        x: str,
        cin: int,
        cout: int,
        k: int = 1,
        s: int = 1,
        act: bool = True,
        bias: float = 0.1,
        std: float = 1.0,
        shift: float = 0.0,
    ) -> str:
        rng = self.rng
        w = rng.standard_normal((cout, cin, k, k)) * np.sqrt(2.0 / (cin * k * k))
        w *= np.exp(rng.normal(0.0, 0.3, (cout, 1, 1, 1)))  # per-channel gains, as BatchNorm folding leaves
        b = rng.standard_normal(cout) * bias
        if rng.random() < 0.25:  # an outlier output channel: per-tensor 8-bit weights get coarse
            w[rng.integers(cout)] *= rng.uniform(6.0, 16.0)
        if rng.random() < 0.2:  # an outlier activation channel: 8-bit activations get coarse
            b[rng.integers(cout)] += rng.uniform(4.0, 12.0)
        y = self.node(
            "Conv",
            [x, self.const(w.astype(np.float32), "w"), self.const(b.astype(np.float32), "b")],
            prefix="conv",
            kernel_shape=[k, k],
            strides=[s, s],
            pads=[k // 2] * 4,
        )
        self.targets[self.nodes[-1].name] = (std, shift)
        if act:  # SiLU as exported: x * Sigmoid(x)
            y = self.node("Mul", [y, self.node("Sigmoid", [y])])
        return y

    def c2f(self, x: str, cin: int, cout: int, n: int, shortcut: bool = True) -> str:
        c = cout // 2
        a, b = self.node(
            "Split", [self.conv(x, cin, 2 * c), self.const(np.array([c, c], np.int64), "split")], outputs=2, axis=1
        )
        parts = [a, b]
        for _ in range(n):
            t = self.conv(self.conv(parts[-1], c, c, 3), c, c, 3)
            parts.append(self.node("Add", [parts[-1], t]) if shortcut else t)
        return self.conv(self.node("Concat", parts, axis=1), (2 + n) * c, cout)

    def sppf(self, x: str, cin: int, cout: int) -> str:
        pools = [self.conv(x, cin, cin // 2)]
        for _ in range(3):
            pools.append(self.node("MaxPool", [pools[-1]], kernel_shape=[5, 5], pads=[2, 2, 2, 2]))
        return self.conv(self.node("Concat", pools, axis=1), 2 * cin, cout)

    def upsample(self, x: str) -> str:
        return self.node("Resize", [x, "", self.const(np.array([1, 1, 2, 2], np.float32), "scales")], mode="nearest")


def _rescale(model: onnx.ModelProto, images: np.ndarray, targets: dict[str, tuple[float, float]]) -> None:
    """Each conv in turn gets output std ``std`` and its bias ``+ shift`` (as BatchNorm leaves a trained net)."""
    inits = {t.name: t for t in model.graph.initializer}
    for node in (n for n in model.graph.node if n.name in targets):
        probe = onnx.ModelProto()
        probe.CopyFrom(model)
        probe.graph.ClearField("output")
        probe.graph.output.append(helper.make_tensor_value_info(node.output[0], TensorProto.FLOAT, None))
        sess = ort.InferenceSession(probe.SerializeToString(), session_options(), providers=["CPUExecutionProvider"])
        out = sess.run(None, {"images": images})[0].astype(np.float64)
        std, shift = targets[node.name]
        factor = std / max(float(out.std()), 1e-12)
        w, b = (numpy_helper.to_array(inits[i]) for i in node.input[1:3])
        inits[node.input[1]].CopyFrom(numpy_helper.from_array((w * factor).astype(np.float32), node.input[1]))
        inits[node.input[2]].CopyFrom(numpy_helper.from_array((b * factor + shift).astype(np.float32), node.input[2]))


def yolov8n_like(size: int = 320, width: float = 1.0, classes: int = 80, seed: int = 0) -> onnx.ModelProto:
    """A YOLOv8n-shaped detector (see the module docstring); outputs boxes [n, 4, A] and scores [n, classes, A]."""
    b = _Builder(seed)
    c1, c2, c3, c4, c5 = (max(8, int(c * width)) for c in (16, 32, 64, 128, 256))
    x = b.conv(b.conv("images", 3, c1, 3, 2), c1, c2, 3, 2)
    x = b.conv(b.c2f(x, c2, c2, 1), c2, c3, 3, 2)
    p3 = b.c2f(x, c3, c3, 2)
    p4 = b.c2f(b.conv(p3, c3, c4, 3, 2), c4, c4, 2)
    p5 = b.sppf(b.c2f(b.conv(p4, c4, c5, 3, 2), c5, c5, 1), c5, c5)
    h4 = b.c2f(b.node("Concat", [b.upsample(p5), p4], axis=1), c5 + c4, c4, 1, False)
    o3 = b.c2f(b.node("Concat", [b.upsample(h4), p3], axis=1), c4 + c3, c3, 1, False)
    o4 = b.c2f(b.node("Concat", [b.conv(o3, c3, c3, 3, 2), h4], axis=1), c3 + c4, c4, 1, False)
    o5 = b.c2f(b.node("Concat", [b.conv(o4, c4, c4, 3, 2), p5], axis=1), c4 + c5, c5, 1, False)
    box_c, cls_c = max(16, c3), max(c3, min(classes, 100))
    levels = []
    for feat, cin in ((o3, c3), (o4, c4), (o5, c5)):
        box = b.conv(b.conv(b.conv(feat, cin, box_c, 3), box_c, box_c, 3), box_c, 64, act=False, std=3.0)
        cls = b.conv(
            b.conv(b.conv(feat, cin, cls_c, 3), cls_c, cls_c, 3),
            cls_c,
            classes,
            act=False,
            bias=1.0,
            std=2.0,
            shift=-5.0,
        )
        levels.append(
            b.node(
                "Reshape",
                [b.node("Concat", [box, cls], axis=1), b.const(np.array([0, 64 + classes, -1], np.int64), "shape")],
            )
        )
    box, cls = b.node(
        "Split",
        [b.node("Concat", levels, axis=2), b.const(np.array([64, classes], np.int64), "split")],
        outputs=2,
        axis=1,
    )
    d = b.node(
        "Transpose", [b.node("Reshape", [box, b.const(np.array([0, 4, 16, -1], np.int64), "shape")])], perm=[0, 2, 1, 3]
    )
    dfl = b.const(np.arange(16, dtype=np.float32).reshape(1, 16, 1, 1), "dfl")  # DFL: expectation over 16 bins
    d = b.node("Conv", [b.node("Softmax", [d], axis=1), dfl], prefix="dfl")
    boxes = b.node("Reshape", [d, b.const(np.array([0, 4, -1], np.int64), "shape")], prefix="boxes")
    scores = b.node("Sigmoid", [cls], prefix="scores")
    anchors = sum((size // s) ** 2 for s in (8, 16, 32))
    graph = helper.make_graph(
        b.nodes,
        "yolov8n_like",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["n", 3, size, size])],
        [
            helper.make_tensor_value_info(boxes, TensorProto.FLOAT, ["n", 4, anchors]),
            helper.make_tensor_value_info(scores, TensorProto.FLOAT, ["n", classes, anchors]),
        ],
        b.inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    _rescale(model, synthetic_images(2, size, seed + 99), b.targets)
    onnx.checker.check_model(model)
    return model


def synthetic_images(count: int, size: int, seed: int) -> np.ndarray:
    """Blocky colour regions plus texture in [0, 1] (deterministic): something a detector's activations vary on."""
    rng = np.random.default_rng(seed)
    out = np.empty((count, 3, size, size), np.float32)
    for i in range(count):
        cell = int(rng.choice([8, 16, 32]))
        base = rng.standard_normal((3, -(-size // cell), -(-size // cell)))
        img = np.kron(base, np.ones((cell, cell)))[:, :size, :size] + 0.25 * rng.standard_normal((3, size, size))
        out[i] = np.clip(0.5 + 0.2 * img, 0.0, 1.0)
    return out


class DetectionAgreement:
    """A user's detection metric: the share of the FP32 model's top-k detections per image (by best class
    score) the candidate still detects: the same class, a score at least the FP32 k-th best score minus
    ``score_tolerance``, and IoU >= ``iou`` with the FP32 box (boxes as the DFL's left/top/right/bottom
    distances of the anchor). 1.0 = the FP32 detections; discrete, as mAP is."""

    def __init__(
        self,
        images: np.ndarray,
        reference: bytes,
        top_k: int = 100,
        score_tolerance: float = 0.05,
        iou: float = 0.5,
        batch: int = 8,
    ) -> None:
        self.images, self.reference, self.top_k, self.batch = images, reference, top_k, batch
        self.score_tolerance, self.iou = score_tolerance, iou
        self._expected: tuple[np.ndarray, ...] | None = None

    def _run(self, session: Any) -> tuple[np.ndarray, np.ndarray]:
        name = session.get_inputs()[0].name
        outs = [
            session.run(None, {name: self.images[i : i + self.batch]}) for i in range(0, len(self.images), self.batch)
        ]
        return np.concatenate([o[0] for o in outs]), np.concatenate([o[1] for o in outs])

    def __call__(self, session: Any) -> float:
        if self._expected is None:
            ref = ort.InferenceSession(self.reference, session_options(), providers=["CPUExecutionProvider"])
            boxes, scores = self._run(ref)
            best = scores.max(1)
            top = np.argsort(-best, axis=1)[:, : self.top_k]
            rows = np.arange(len(best))[:, None]
            self._expected = (
                top,
                scores.argmax(1)[rows, top],
                best[rows, top[:, -1:]],
                np.take_along_axis(boxes, top[:, None, :], 2),
            )
        top, ref_cls, threshold, ref_box = self._expected
        boxes, scores = self._run(session)
        rows = np.arange(len(boxes))[:, None]
        cls = scores.argmax(1)[rows, top]
        best = scores.max(1)[rows, top]
        box = np.take_along_axis(boxes, top[:, None, :], 2)  # [n, 4 (l, t, r, b), k]
        inter = (np.minimum(box[:, 0], ref_box[:, 0]) + np.minimum(box[:, 2], ref_box[:, 2])) * (
            np.minimum(box[:, 1], ref_box[:, 1]) + np.minimum(box[:, 3], ref_box[:, 3])
        )
        area = (box[:, 0] + box[:, 2]) * (box[:, 1] + box[:, 3])
        ref_area = (ref_box[:, 0] + ref_box[:, 2]) * (ref_box[:, 1] + ref_box[:, 3])
        iou = inter / np.maximum(area + ref_area - inter, 1e-9)
        hits = (cls == ref_cls) & (best >= threshold - self.score_tolerance) & (iou >= self.iou)
        return float(hits.mean())


YOLO_CANDIDATES = "8/8,16/8,16/16"


def _yolo_setup(size: int, width: float) -> tuple[onnx.ModelProto, list[dict[str, np.ndarray]]]:
    model = yolov8n_like(size, width)
    calib = synthetic_images(64, size, 1)
    return model, [{"images": calib[i : i + 8]} for i in range(0, 64, 8)]


def _timed(fn: Any, repeats: int) -> float:
    """Best of ``repeats`` wall times (this machine is shared: the minimum is the least disturbed run)."""
    fn()
    best = np.inf
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return float(best)


def yolo_simulation_cost(repeats: int) -> dict[str, float]:
    """Seconds per image: FP32, the full session before (``run``) and after (IO binding), the pruned session."""
    model, feeds = _yolo_setup(320, 1.0)
    graph = prepare_graph(model)
    part = find_groups(graph)
    cands = parse_candidates(YOLO_CANDIDATES)
    config = QuantConfig()
    tables = calibrate_once(
        graph, feeds, config, act_bitwidths=[8, 16], weight_bitwidths=[8, 16], bias_correction=True, batch_size=8
    )
    scorer = SimulationScorer(ScorerSpec(graph.to_onnx().SerializeToString(), part, config, {}, tables, prune=False))
    fp32 = ort.InferenceSession(model.SerializeToString(), session_options(), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    assignments = {
        "all 16/16 (the baseline)": {g: cands[-1] for g in part.names},
        "random mix": {g: cands[rng.integers(len(cands))] for g in part.names},
    }
    macs = sum(mac_table(graph, part).macs.values())
    print(
        f"## YOLOv8n-size detector: {len(part)} groups ({sum(1 for g in part if g.weights)} with weights), "
        f"{macs / 1e9:.2f} GMACs per 320x320 image, candidates {YOLO_CANDIDATES}\n"
    )
    print(
        "### Simulation cost per image vs FP32 (best of "
        f"{repeats}; onnxruntime's default threads on this machine's {os.cpu_count()} CPUs)\n"
    )
    print(
        "| assignment | batch | FP32 | full session, `run` (before) | full session, IO binding | "
        "pruned session (layout) | pruned build |"
    )
    print("|---|---|---|---|---|---|---|")
    out: dict[str, float] = {}
    for label, assignment in assignments.items():
        feeds_a, layout = scorer.model.plan_feeds(assignment)
        full = scorer.session
        full.set_feeds(feeds_a)
        start = time.perf_counter()
        pruned = scorer.model.session(layout=layout)
        build = time.perf_counter() - start
        pruned.set_feeds(feeds_a)
        for batch in (1, 8):
            x = {"images": synthetic_images(batch, 320, 5)}
            plain = {**full.extra, **x}
            before = _timed(lambda s=full, plain=plain: s.session.run(None, plain), repeats) / batch
            t_fp32 = _timed(lambda x=x: fp32.run(None, x), repeats) / batch
            bound = _timed(lambda s=full, x=x: s.run(None, x), repeats) / batch
            t_pruned = _timed(lambda s=pruned, x=x: s.run(None, x), repeats) / batch
            same = all(np.array_equal(a, b) for a, b in zip(full.run(None, x), pruned.run(None, x), strict=True))
            print(
                f"| {label} | {batch} | {t_fp32 * 1e3:.1f} ms | {before * 1e3:.1f} ms ({before / t_fp32:.1f}x) | "
                f"{bound * 1e3:.1f} ms ({bound / t_fp32:.1f}x) | {t_pruned * 1e3:.1f} ms ({t_pruned / t_fp32:.1f}x)"
                f"{'' if same else ' DIFFERENT OUTPUTS'} | {build:.2f} s |"
            )
            out[f"{label}|{batch}"] = before / t_pruned
    print(
        f"\n{len(full.extra)} quantizer/weight inputs; `run` checks every input name against a list on "
        "every call. Pruned sessions are built only where an evaluation costs 3+ builds; outputs are "
        "compared bit for bit above.\n"
    )
    return out


def _phase_seconds(r: Any) -> str:
    return ", ".join(f"{k} {v.seconds:.0f} s" for k, v in r.stats.items() if k != "total" and v.seconds >= 0.5)


def _amp_row(label: str, r: Any, wall: float) -> str:
    s = r.stats

    def n(phase: str) -> int:
        return s[phase].evaluations if phase in s else 0

    proxy = sum(v.proxy_runs for v in s.values())
    evals = sum(v.evaluations for v in s.values())
    return (
        f"| {label} | {r.phase1_mode or '-'} | {wall:.0f} s | {evals} | {n('reference')} | {n('phase1')} | "
        f"{n('phase2')} | {n('phase3')} | {n('verify')} | {proxy} | {r.bitops / r.baseline_bitops:.3f} | "
        f"{r.score:.4f} | {r.target:.4f} |"
    )


def _amp(model: onnx.ModelProto, feeds: Any, metric: Any, drop: float, phase1: str) -> tuple[Any, float]:
    with tempfile.TemporaryDirectory() as out, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        start = time.perf_counter()
        r = choose_mixed_precision(
            model, feeds, YOLO_CANDIDATES, metric, metric, drop, out, phase1=phase1, batch_size=8, progress=False
        )
        return r, time.perf_counter() - start


AMP_HEADER = (
    "| run | phase 1 | wall | metric calls | reference | phase 1 | phase 2 | phase 3 | verify | proxy runs | "
    "BitOps / all-16/16 | score | target |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|"
)


def yolo_amp_small(drop: float) -> None:
    model, feeds = _yolo_setup(160, 0.25)
    # Stricter than on the full model (score within 0.01, IoU 0.9): this small net is more robust.
    metric = DetectionAgreement(synthetic_images(16, 160, 2), model.SerializeToString(), score_tolerance=0.01, iou=0.9)
    graph = prepare_graph(model)
    part = find_groups(graph)
    cands = parse_candidates(YOLO_CANDIDATES)
    group_cands = collapse_unweighted(
        filter_candidates(_op_kernels(graph, part), cands, None), {g.name for g in part if g.weights}
    )
    tasks = len(phase1_tasks(part.names, group_cands, {g: cands[-1] for g in part.names}))
    print(
        f"### AMP, the same topology at 160x160 and 1/4 of the channels ({len(part)} groups, {tasks} phase-1 "
        f"pairs; metric on 16 images, score within 0.01, IoU 0.9; allowed drop {drop})\n"
    )
    print(AMP_HEADER)
    times = []
    for phase1 in ("exhaustive", "proxy"):
        r, wall = _amp(model, feeds, metric, drop, phase1)
        print(_amp_row(f"160x160, phase1={phase1}", r, wall))
        times.append(f"phase1={phase1}: {_phase_seconds(r)}")
    print("\n" + "\n".join(times) + "\n")


def yolo_amp_full(images: int, drop: float, exhaustive: bool) -> None:
    model, feeds = _yolo_setup(320, 1.0)
    metric = DetectionAgreement(synthetic_images(images, 320, 2), model.SerializeToString())
    print(f"### AMP on the 320x320 model (metric on {images} images; allowed drop {drop})\n")
    print(AMP_HEADER)
    runs = ["proxy", "exhaustive"] if exhaustive else ["proxy"]
    times = []
    for phase1 in runs:
        r, wall = _amp(model, feeds, metric, drop, phase1)
        print(_amp_row(f"320x320, phase1={phase1}", r, wall))
        times.append(f"phase1={phase1}: {_phase_seconds(r)}")
        if phase1 == "proxy" and "phase1" in r.stats:
            p1 = r.stats["phase1"]
            checks = "; ".join(
                f"{c.group} {c.candidate}: drop {c.drop:.4f}{' (moved)' if c.moved else ''}" for c in r.proxy_checks
            )
            proxy_info = f"proxy: {p1.proxy_runs} runs in {p1.seconds:.0f} s; blocker checks: {checks or '-'}"
        elif phase1 == "proxy":
            proxy_info = f"no phase 1: {'; '.join(r.messages[:2])}"
    # One metric call on the chosen kind of session, timed, for the extrapolation.
    graph = prepare_graph(model)
    part = find_groups(graph)
    cands = parse_candidates(YOLO_CANDIDATES)
    config = QuantConfig()
    tables = calibrate_once(
        graph, feeds, config, act_bitwidths=[8, 16], weight_bitwidths=[8, 16], bias_correction=True, batch_size=8
    )
    base = {g: cands[-1] for g in part.names}
    one = {**base, part.names[3]: cands[0]}
    costs = {}
    for label, prune in (("pruned", True), ("full", False)):
        scorer = SimulationScorer(
            ScorerSpec(
                graph.to_onnx().SerializeToString(),
                part,
                config,
                {"phase1": metric, "phase2": metric},
                tables,
                prune=prune,
            )
        )
        scorer.score(one, "phase1")  # warm-up (and the pruned build)
        start = time.perf_counter()
        scorer.score(base, "phase1")
        costs[label] = time.perf_counter() - start
    group_cands = collapse_unweighted(
        filter_candidates(_op_kernels(graph, part), cands, None), {g.name for g in part if g.weights}
    )
    tasks = len(phase1_tasks(part.names, group_cands, base))
    print("\n" + "\n".join(times))
    print(proxy_info)
    print(
        f"one metric call: {costs['pruned']:.1f} s (pruned session), {costs['full']:.1f} s (full session); "
        f"exhaustive phase 1 = {tasks} calls = {tasks * costs['pruned'] / 60:.1f} min with pruned sessions, "
        f"{tasks * costs['full'] / 60:.1f} min on the full session\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--candidates", default="8/4,8/8,16/16")
    parser.add_argument("--drop", type=float, default=0.01)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument(
        "--only",
        choices=["digits", "yolo", "yolo-cost", "yolo-small", "yolo-full"],
        help="run one part (yolo: its three)",
    )
    parser.add_argument("--yolo-images", type=int, default=256, help="images the detection metric scores")
    parser.add_argument("--yolo-drop", type=float, default=0.02)
    parser.add_argument(
        "--yolo-exhaustive",
        action="store_true",
        help="also run exhaustive phase 1 on the 320x320 model (long: see the extrapolation)",
    )
    args = parser.parse_args()
    only = args.only or "all"
    if only in ("all", "digits"):
        evaluations_per_second(args.candidates, args.repeats)
        ours = full_runs(args.candidates, args.drop)
        aimet_runs(args.candidates, args.drop, ours)
    if only in ("all", "yolo", "yolo-cost"):
        yolo_simulation_cost(max(3, args.repeats // 2))
    if only in ("all", "yolo", "yolo-small"):
        yolo_amp_small(args.yolo_drop)
    if only in ("all", "yolo", "yolo-full"):
        yolo_amp_full(args.yolo_images, args.yolo_drop, args.yolo_exhaustive)


if __name__ == "__main__":
    main()
