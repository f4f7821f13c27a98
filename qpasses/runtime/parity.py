"""Runtime parity: does onnxruntime, as the user runs it, compute what the QDQ model says?

A QDQ model has exact semantics (run with graph optimizations off: every Q/DQ as written). The
default session fuses Q/DQ into integer kernels whose arithmetic depends on the CPU. This check
runs both on the same feeds, reports each output's SQNR against a float reference in both, and,
when the runtime loses more than quantization noise, names the first quantized tensors where the
two diverge, the kernel that produced them, the likely cause and the fix. On a CPU whose kernels
are exact (VNNI, ARM) it also replays the x86 non-VNNI kernel (``kernel_emulation``), so a model
that would break there is caught here.
"""

from __future__ import annotations

import platform
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from qpasses.core import verification
from qpasses.data.evaluation import pooled_sqnr_db
from qpasses.data.sessions import with_outputs
from qpasses.runtime.kernel_emulation import FusedMac, MacEmulation, emulate_mac, fused_macs, runtime_saturates

DEFAULT_TOLERANCE_DB = 1.0
# Fused kernels requantize with their own rounding: a step here and there, which keeps the runtime
# within ~40 dB of exact semantics on 8-bit models. Below NOISE_DB the difference counts once it also
# costs more than the tolerance against the reference; below MIN_AGREEMENT_DB it counts regardless
# (a reference that is itself poor can hide the loss).
NOISE_DB = 35.0
MIN_AGREEMENT_DB = 30.0
# The check runs the model about three times (exact, default session, FP32) on what it checks; a
# quarter of the calibration samples keeps it near the cost of the calibration pass itself.
CHECK_SHARE = 0.25


def cpu_flags() -> str:
    """The VNNI flags of this x86 CPU ('' when none), as ``grep avx512_vnni|avx_vnni /proc/cpuinfo``."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return ""
    return ", ".join(sorted(flags & {"avx512_vnni", "avx_vnni"}))


def cpu_description(saturates: bool | None = None) -> str:
    """The CPU, and whether onnxruntime's u8s8 kernel saturates on it (probed, not guessed)."""
    saturates = runtime_saturates() if saturates is None else saturates
    machine = platform.machine().lower()
    flags = cpu_flags()
    where = f"{machine}, VNNI flags: {flags or 'none'}"
    verdict = "u8s8 kernels saturate int16 pair sums" if saturates else "u8s8 kernels exact"
    return f"{where}; onnxruntime {verdict} (probed)"


@dataclass(frozen=True)
class OutputParity:
    name: str
    exact_db: float  # SQNR vs the float reference, exact QDQ semantics
    runtime_db: float  # the same in the default session
    runtime_vs_exact_db: float  # how close the runtime is to exact QDQ semantics

    @property
    def loss_db(self) -> float:
        if np.isinf(self.exact_db) and np.isinf(self.runtime_db):
            return 0.0
        return self.exact_db - self.runtime_db


@dataclass(frozen=True)
class TensorDivergence:
    """A quantized tensor whose integers differ between the runtime and exact semantics."""

    tensor: str
    producer: str
    producer_type: str
    kernel: str  # stored types of the producer's inputs (u8s8, s8s8, u8u8, ...) or ''
    mismatched: float  # fraction of elements more than one step apart
    max_steps: int

    def format(self) -> str:
        kernel = f", {self.kernel} kernel" if self.kernel else ""
        return (
            f"{self.tensor} (from {self.producer_type} '{self.producer}'{kernel}): "
            f"{100 * self.mismatched:.1f}% of values off by >1 step (max {self.max_steps})"
        )


@dataclass
class ParityReport:
    cpu: str
    samples: int
    reference: str  # what the SQNR figures are measured against
    tolerance_db: float
    outputs: list[OutputParity] = field(default_factory=list)
    divergences: list[TensorDivergence] = field(default_factory=list)
    emulated: list[MacEmulation] = field(default_factory=list)  # x86 without VNNI, replayed
    emulated_cpu: str = ""
    # The batches run (the first sample apart: ``parity_batches``) and the reference's outputs on each:
    # the fallback scores on the same batches against the same outputs.
    batches: list[dict[str, np.ndarray]] = field(default_factory=list, repr=False, compare=False)
    reference_outputs: list[list[np.ndarray]] = field(default_factory=list, repr=False, compare=False)

    @property
    def diverged(self) -> bool:
        """Some output of the runtime on this CPU differs from exact semantics beyond quantization noise."""
        return any(
            o.runtime_vs_exact_db < MIN_AGREEMENT_DB
            or (o.runtime_vs_exact_db < NOISE_DB and o.loss_db > self.tolerance_db)
            for o in self.outputs
        )

    @property
    def emulation_diverges(self) -> list[MacEmulation]:
        return [e for e in self.emulated if e.diverges]

    @property
    def ok(self) -> bool:
        return not self.diverged and not self.emulation_diverges

    def figures(self) -> str:
        return "; ".join(
            f"{o.name}: SQNR vs {self.reference} {o.exact_db:.2f} dB exact QDQ, "
            f"{o.runtime_db:.2f} dB onnxruntime default session (runtime vs exact "
            f"{o.runtime_vs_exact_db:.1f} dB)"
            for o in self.outputs
        )

    def problems(self) -> list[str]:
        """One line per finding, each with its likely cause and fix."""
        lines: list[str] = []
        if self.diverged:
            worst = min(self.outputs, key=lambda o: o.runtime_vs_exact_db)
            where = (
                "; first divergent: " + ", ".join(d.format() for d in self.divergences[:3]) if self.divergences else ""
            )
            lines.append(
                f"onnxruntime's default session on this CPU ({self.cpu}) loses {worst.loss_db:.2f} dB on "
                f"output '{worst.name}' vs exact QDQ semantics (runtime vs exact: SQNR "
                f"{worst.runtime_vs_exact_db:.2f} dB){where}. {likely_cause(self.divergences)}"
            )
        bad = self.emulation_diverges
        if bad:
            lines.append(
                f"on {self.emulated_cpu} (emulated): {len(bad)} of {len(self.emulated)} integer "
                f"Conv/Gemm/MatMul would saturate: " + "; ".join(e.format() for e in bad[:3]) + f". {SATURATION_FIX}"
            )
        return lines

    def format(self) -> str:
        head = f"runtime parity on {self.samples} samples, CPU {self.cpu}: {self.figures()}"
        if self.emulated:
            n = len(self.emulation_diverges)
            head += f"\n{self.emulated_cpu} (emulated kernels): " + (
                f"{n} of {len(self.emulated)} integer ops would saturate"
                if n
                else f"no saturation in {len(self.emulated)} integer ops"
            )
        problems = self.problems()
        return head + ("\n" + "\n".join(f"DIVERGES: {p}" for p in problems) if problems else "\nparity: ok")


SATURATION_FIX = (
    "Fix: store 8-bit weights and activations as uint8 (quantize with the default/`ort` target, or "
    "`qpasses run MODEL --pipeline portable-storage` on an existing QDQ model): same grid, u8u8 "
    "kernels that cannot saturate; or deploy only on CPUs with VNNI/ARM"
)


def likely_cause(divergences: list[TensorDivergence]) -> str:
    kernels = {d.kernel for d in divergences[:3]}
    if kernels & {"u8s8", "s8s8"}:
        return (
            "Likely cause: the x86 u8s8/s8s8 integer kernels without VNNI add pairs of products in int16 "
            f"with saturation. {SATURATION_FIX}."
        )
    return (
        "Likely cause: a fused onnxruntime kernel rounds or clamps differently from the QDQ graph; keep the "
        "named tensors in higher precision (overrides) or run with graph optimizations limited to "
        "ORT_ENABLE_BASIC."
    )


# --- running -------------------------------------------------------------------------------------


def activation_quantizers(model: onnx.ModelProto) -> list[str]:
    """Outputs of QuantizeLinear nodes on activations (kept by fusion: fused kernels write them)."""
    constants = {t.name for t in model.graph.initializer}
    return [
        n.output[0]
        for n in model.graph.node
        if n.op_type == "QuantizeLinear" and n.input[0] not in constants and n.output
    ]


def strip_activation_qdq(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with every activation QuantizeLinear -> DequantizeLinear pair removed: quantized
    weights, float activations. The reference for a QDQ model when no FP32 model is at hand."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    constants = {t.name for t in g.initializer}
    producers = {o: n for n in g.node for o in n.output}
    rename: dict[str, str] = {}
    outputs = {o.name for o in g.output}
    for node in g.node:
        if node.op_type != "DequantizeLinear" or node.input[0] in constants:
            continue
        q = producers.get(node.input[0])
        if q is None or q.op_type != "QuantizeLinear" or node.output[0] in outputs:
            continue
        rename[node.output[0]] = q.input[0]
    for node in g.node:
        for i, name in enumerate(node.input):
            if name in rename:
                node.input[i] = rename[name]
    return out


def check_parity(
    model: onnx.ModelProto,
    feeds: Sequence[Mapping[str, np.ndarray]],
    *,
    reference: onnx.ModelProto | None = None,
    tolerance_db: float = DEFAULT_TOLERANCE_DB,
    emulate: bool | None = None,
    known: tuple[list[dict[str, np.ndarray]], list[list[np.ndarray]]] | None = None,
) -> ParityReport:
    """Run ``model`` with exact QDQ semantics and in the default session on ``feeds``.

    ``reference``: the FP32 model (default: ``model`` without its activation Q/DQ pairs).
    ``emulate``: replay the x86 non-VNNI kernels (default: when this CPU's kernels are exact).
    ``known``: (batches, the reference's outputs on them) from an earlier check of the same reference on
    the same data (the fallback's second run): used when the batches are these, instead of running it.
    """
    if not feeds:
        raise ValueError("the parity check needs at least one feed")
    ref_model = reference if reference is not None else strip_activation_qdq(model)
    taps = activation_quantizers(model)
    out_names = [o.name for o in model.graph.output]
    exact_sess = verification.exact_session(with_outputs(model, taps))
    runtime_sess = verification.runtime_session(with_outputs(model, taps))
    # The FP32 reference as users run it (graph optimizations change float results by rounding only).
    batches = parity_batches(model, feeds)
    reference_outputs = known[1] if known is not None and _same_batches(known[0], batches) else None
    if reference_outputs is None:
        ref_sess = verification.runtime_session(ref_model)
        ref_names = [o.name for o in ref_model.graph.output]
        ref_inputs = {x.name for x in ref_model.graph.input}
        reference_outputs = [
            ref_sess.run(ref_names, {k: v for k, v in feed.items() if k in ref_inputs}) for feed in batches
        ]
    refs: list[list[np.ndarray]] = [[] for _ in out_names]
    exacts: list[list[np.ndarray]] = [[] for _ in out_names]
    runtimes: list[list[np.ndarray]] = [[] for _ in out_names]
    samples = 0
    # The integers of every activation quantizer, for localizing and replaying kernels: one sample
    # is enough, and a whole batch of every activation is what made this check's memory peak. That
    # sample runs apart from the rest of its batch, so no sample runs twice.
    probe = batches[0]
    first_exact: dict[str, np.ndarray] = {}
    extra = [t for t in taps if t not in set(out_names)]
    for i, feed in enumerate(batches):
        e = exact_sess.run(out_names + (extra if i == 0 else []), feed)
        if i == 0:
            values = dict(zip(out_names + extra, e, strict=True))
            first_exact = {t: values[t] for t in taps}
        r = runtime_sess.run(out_names, feed)
        f = reference_outputs[i]
        for j in range(len(out_names)):
            exacts[j].append(e[j])
            runtimes[j].append(r[j])
            refs[j].append(f[j] if j < len(f) else e[j])
        samples += feed_samples(feed)
    saturates = runtime_saturates()
    report = ParityReport(
        cpu_description(saturates), samples, "FP32" if reference is not None else "float activations", tolerance_db
    )
    report.batches, report.reference_outputs = batches, reference_outputs
    for j, name in enumerate(out_names):
        if not np.issubdtype(exacts[j][0].dtype, np.floating):
            continue
        # Shapes may differ between runs (a decoder Loop stopping at another step): that scores as a mismatch.
        exact, runtime = exacts[j], runtimes[j]
        report.outputs.append(
            OutputParity(
                name, pooled_sqnr_db(refs[j], exact), pooled_sqnr_db(refs[j], runtime), pooled_sqnr_db(exact, runtime)
            )
        )
    if report.diverged:
        first_runtime = dict(zip(taps, runtime_sess.run(taps, probe), strict=True)) if taps else {}
        report.divergences = _localize(model, first_exact, first_runtime)
    if emulate is None:
        emulate = not saturates  # here the runtime itself shows it
    if emulate:
        report.emulated_cpu = "x86 without VNNI (AVX2 u8s8 int16-pair saturation)"
        for mac in fused_macs(model):
            if mac.activation in first_exact:
                em = emulate_mac(mac, first_exact[mac.activation])
            else:
                em = _emulate_from_input(model, mac, probe)
            if em is not None:
                report.emulated.append(em)
    return report


def check_feeds(
    model: onnx.ModelProto,
    data: Iterable[Mapping[str, np.ndarray]],
    max_samples: int,
    share: float = CHECK_SHARE,
) -> list[dict[str, np.ndarray]]:
    """The first calibration samples a check runs on, whatever the batching: at most ``max_samples`` and
    at most ``share`` of the calibration samples (when ``data`` knows its total, ``num_samples``), at least
    one. The feed that crosses the budget is cut along a free batch dimension; one that cannot be cut
    (fixed or mismatched leading dimensions) is taken whole when it comes first, else left out."""
    total = getattr(data, "num_samples", None)
    budget = max(1, int(share * total)) if isinstance(total, int) and share < 1 else max_samples
    budget = min(budget, max_samples)
    feeds: list[dict[str, np.ndarray]] = []
    samples = 0
    for feed in data:
        if samples >= budget:
            break
        feed = dict(feed)
        n = feed_samples(feed)
        if samples + n > budget:
            cut = _cut(model, feed, budget - samples)
            if cut is None and feeds:
                break
            feed, n = (feed, n) if cut is None else (cut, budget - samples)
        feeds.append(feed)
        samples += n
    return feeds


def _batch_inputs(model: onnx.ModelProto, feed: Mapping[str, np.ndarray]) -> set[str] | None:
    """The feed's inputs when every one has a free leading (batch) dimension and they agree on it; else None."""
    constants = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in constants and i.name in feed]
    for i in inputs:
        dims = i.type.tensor_type.shape.dim
        if not dims or dims[0].HasField("dim_value") or np.ndim(feed[i.name]) == 0:
            return None
    if not inputs or len({feed[i.name].shape[0] for i in inputs}) != 1:
        return None
    return {i.name for i in inputs}


def _cut(model: onnx.ModelProto, feed: dict[str, np.ndarray], rows: int) -> dict[str, np.ndarray] | None:
    names = _batch_inputs(model, feed)
    return None if names is None else {k: (v[:rows] if k in names else v) for k, v in feed.items()}


def feed_samples(feed: Mapping[str, np.ndarray]) -> int:
    """Samples in one feed: the leading dimension of its first input (1 for a scalar or empty feed)."""
    first = next(iter(feed.values()), None)
    return int(first.shape[0]) if first is not None and np.ndim(first) else 1


def parity_batches(model: onnx.ModelProto, feeds: Sequence[Mapping[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    """The batches a check runs: the first sample on its own (it also gives every activation's integers),
    the rest of its feed, then the other feeds."""
    probe, rest = split_first_sample(model, dict(feeds[0]))
    return [probe, *([rest] if rest is not None else []), *(dict(f) for f in feeds[1:])]


def _same_batches(a: Sequence[Mapping[str, np.ndarray]], b: Sequence[Mapping[str, np.ndarray]]) -> bool:
    return len(a) == len(b) and all(
        x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x) for x, y in zip(a, b, strict=True)
    )


def split_first_sample(
    model: onnx.ModelProto, feed: dict[str, np.ndarray]
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray] | None]:
    """(the feed's first sample, the rest of it) when every input has a free leading (batch) dimension
    and more than one row; else (the feed, None)."""
    names = _batch_inputs(model, feed)
    if names is None or feed_samples({n: feed[n] for n in names}) == 1:
        return feed, None
    first = {k: (v[:1] if k in names else v) for k, v in feed.items()}
    return first, {k: (v[1:] if k in names else v) for k, v in feed.items()}


def _emulate_from_input(model: onnx.ModelProto, mac: FusedMac, feed: Mapping[str, np.ndarray]) -> MacEmulation | None:
    values = verification.exact_session(with_outputs(model, [mac.activation])).run([mac.activation], dict(feed))
    return emulate_mac(mac, values[0])


def _localize(
    model: onnx.ModelProto, exact: dict[str, np.ndarray], runtime: dict[str, np.ndarray], limit: int = 5
) -> list[TensorDivergence]:
    """The first activation quantizers (in graph order) whose integers differ by more than a step."""
    producers = {o: n for n in model.graph.node for o in n.output}
    kernels = {m.op: m.kernel for m in fused_macs(model)}
    found: list[TensorDivergence] = []
    for name in activation_quantizers(model):
        e, r = exact.get(name), runtime.get(name)
        if e is None or r is None or e.shape != r.shape or e.size == 0:
            continue
        diff = np.abs(e.astype(np.int64) - r.astype(np.int64))
        off = float(np.mean(diff > 1))
        if off < 0.001:
            continue
        q = producers.get(name)
        src = producers.get(q.input[0]) if q is not None else None
        # Step over a fused activation (Relu/Clip) to the op that computes.
        if src is not None and src.op_type in ("Relu", "Clip") and src.input[0] in producers:
            inner = producers[src.input[0]]
            if inner.op_type in ("Conv", "Gemm", "MatMul"):
                src = inner
        op_name = (src.name or src.output[0]) if src is not None else name
        found.append(
            TensorDivergence(
                name,
                op_name,
                src.op_type if src is not None else "input",
                kernels.get(op_name, ""),
                off,
                int(diff.max()),
            )
        )
        if len(found) >= limit:
            break
    return found


def range_feeds(model: onnx.ModelProto, *, batch: int = 16, seed: int = 0) -> dict[str, np.ndarray]:
    """Random inputs for a QDQ model without data: a float input read by a QuantizeLinear is drawn
    uniformly over that quantizer's whole range (what saturation needs to show), others ~ N(0, 1)."""
    feeds = verification.random_feeds(model, batch=batch, seed=seed)
    constants = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    rng = np.random.default_rng(seed + 1)
    for node in model.graph.node:
        name = node.input[0] if node.input else ""
        if node.op_type != "QuantizeLinear" or name not in feeds or node.input[1] not in constants:
            continue
        scale = float(np.asarray(constants[node.input[1]]).reshape(-1)[0])
        zp_arr = constants.get(node.input[2]) if len(node.input) > 2 else None
        zp = np.asarray(zp_arr if zp_arr is not None else np.uint8(0))
        info = np.iinfo(zp.dtype) if np.issubdtype(zp.dtype, np.integer) else None
        if info is None:
            continue
        z = int(zp.reshape(-1)[0])
        lo, hi = scale * (info.min - z), scale * (info.max - z)
        x = feeds[name]
        feeds[name] = rng.uniform(lo, hi, x.shape).astype(x.dtype)
    return feeds
