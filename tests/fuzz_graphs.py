"""Hypothesis strategies for the property-based (fuzz) tests: random ONNX graphs, encodings files,
calibration data, and the helpers the ``test_fuzz_*`` modules share.

Graphs. ``graphs()`` draws a small, valid (``onnx.checker`` full check, onnxruntime runs it) FP32
model as a sequence of steps on a stack of live tensors: the top is the tensor the next op reads,
``fork`` pushes the top again (fan-out: one tensor read by two ops), ``add_join``/``concat`` pop
two entries and re-join the branches, and whatever is left on the stack at the end becomes a
graph output. Ops: Conv (plain, grouped, depthwise, with or without the ``group`` attribute,
strides/pads/dilations), ConvTranspose, Gemm (random alpha/beta/transA/transB, bias C as vector,
row, scalar or absent), MatMul (2-D and 4-D, optional bias Add), BatchNormalization (4-D and 2-D),
Relu, Relu6 and Clip (bounds as attributes below opset 11, as inputs from 11, one bound may be
absent), Add (join, constant, x + x), Concat, Reshape, Transpose, Flatten, GlobalAveragePool and
MaxPool, Identity, and dead branches (``drop``). Weights are initializers or ``Constant`` nodes, and a
weight may be shared by two layers (also with different channel axes) or a Clip bound by several Clips;
some weights get a zero or a rescaled output channel (the classic corner cases of BN folding and CLE).
A third of the graphs come from a "messier exporter" (``Style``): PyTorch/TF-style or colliding tensor
names, empty node names, initializers listed as graph inputs, intermediate value_info. The drawn
value is a ``FuzzGraph``: ``repr`` prints the ``GraphSpec`` (every step with its arguments, and the
style), and ``build(spec)`` rebuilds the identical model, so a failure prints its reproducer::

    from fuzz_graphs import *; model = build(GraphSpec(opset=13, batch='N', ...))

Numbers (weights, feeds) come from numpy with the spec's seed, so shrinking acts on the structure.

Encodings and calibration data: ``encodings_documents()`` draws AIMET 0.6.1 and 1.0.0 documents,
valid or corrupted (wrong types, missing keys, huge/NaN numbers, deep nesting, unknown tensors);
``calibration_cases()`` draws feeds (lists, generators, callables, .npz and input-list files)
with wrong shapes, dtypes, NaN, empty arrays and arbitrary objects.

``FuzzReference`` extends ``numpy_reference.Reference`` (float64, independent of qpasses) with the
ops above, so a quantized model can be compared with the fake-quantized FP32 graph.

CI runs every property with a fixed, small number of examples (``derandomize=True``: the same cases
on every run); ``QPASSES_FUZZ_EXAMPLES=500 python -m pytest tests/test_fuzz_*.py`` runs that many
examples per property (``QPASSES_FUZZ_RANDOM=1`` also draws new cases on every run). The number of
cases each property ran and its time are printed in the terminal summary
(``QPASSES_FUZZ_STATS=path.json`` also writes them to a file).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Hypothesis keeps caches and its example database under the working directory by default; keep the
# checkout clean (CI runs are derandomized and need no database).
os.environ.setdefault("HYPOTHESIS_STORAGE_DIRECTORY", str(Path(tempfile.gettempdir()) / "qpasses-hypothesis"))

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from numpy_reference import Grid, Layer, Reference, conv2d, quantize_bias  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

FLOAT = TensorProto.FLOAT
OPSETS = (10, 11, 13, 17, 21)
MAX_IR_VERSION = 10
MAX_CHANNELS = 8
MAX_SPATIAL = 14
MAX_FEATURES = 96
FEED_BATCH = 2  # what a symbolic batch dim becomes in feeds

# --------------------------------------------------------------------------------------------------
# settings and statistics


def fuzz_settings(ci_examples: int, **overrides: Any) -> settings:
    """CI: ``ci_examples`` derandomized examples; ``QPASSES_FUZZ_EXAMPLES=N``: N examples per property."""
    env = os.environ.get("QPASSES_FUZZ_EXAMPLES")
    examples = int(env) if env else ci_examples
    randomize = os.environ.get("QPASSES_FUZZ_RANDOM", "") not in ("", "0")
    return settings(
        max_examples=examples,
        deadline=None,
        derandomize=not randomize,
        database=None,
        print_blob=True,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.filter_too_much,
            HealthCheck.function_scoped_fixture,
        ],
        **overrides,
    )


@dataclass
class _Stat:
    cases: int = 0
    skipped: int = 0
    seconds: float = 0.0
    notes: dict[str, int] = field(default_factory=dict)


class FuzzStats:
    """Cases per property and wall time, printed in pytest's terminal summary (a session-finish hook
    registered by the ``fuzz_stats`` fixture, so no conftest is needed)."""

    def __init__(self) -> None:
        self.tests: dict[str, _Stat] = {}
        self.current: str | None = None

    def case(self, note: str | None = None) -> None:
        """Count one generated case of the running test (``note`` counts a sub-category)."""
        stat = self.tests.setdefault(self.current or "?", _Stat())
        stat.cases += 1
        if note:
            stat.notes[note] = stat.notes.get(note, 0) + 1

    def note(self, note: str) -> None:
        stat = self.tests.setdefault(self.current or "?", _Stat())
        stat.notes[note] = stat.notes.get(note, 0) + 1

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if not self.tests:
            return
        total_cases = sum(s.cases for s in self.tests.values())
        total_time = sum(s.seconds for s in self.tests.values())
        terminalreporter.section("qpasses fuzz: generated cases per property")
        for name, s in self.tests.items():
            notes = ", ".join(f"{k}: {v}" for k, v in sorted(s.notes.items()))
            terminalreporter.write_line(
                f"{s.cases:6d} cases {s.seconds:7.1f} s  {name}" + (f"  ({notes})" if notes else "")
            )
        terminalreporter.write_line(f"{total_cases:6d} cases {total_time:7.1f} s  total")
        out = os.environ.get("QPASSES_FUZZ_STATS")
        if out:
            Path(out).write_text(
                json.dumps(
                    {
                        name: {"cases": s.cases, "seconds": round(s.seconds, 2), "notes": s.notes}
                        for name, s in self.tests.items()
                    },
                    indent=2,
                )
                + "\n"
            )


STATS = FuzzStats()


@pytest.fixture(autouse=True)
def fuzz_stats(request: pytest.FixtureRequest) -> Iterator[FuzzStats]:
    """Times each test and registers the summary hook once (use with ``from fuzz_graphs import fuzz_stats``)."""
    pm = request.config.pluginmanager
    if not pm.is_registered(STATS):
        pm.register(STATS, "qpasses-fuzz-stats")
    STATS.current = request.node.nodeid.rsplit("/", 1)[-1]
    start = time.perf_counter()
    yield STATS
    STATS.tests.setdefault(STATS.current, _Stat()).seconds += time.perf_counter() - start
    STATS.current = None


# --------------------------------------------------------------------------------------------------
# graphs


@dataclass(frozen=True)
class Step:
    op: str
    args: tuple[tuple[str, Any], ...] = ()


@dataclass(frozen=True)
class Style:
    """How the exporter wrote the model, independent of what it computes.

    ``names``: tensor names "plain" (conv3), "torch" (/conv3/Conv_output_0), "tf" (conv3:0) or "collide"
    (a new tensor named after an existing one plus a suffix qpasses uses for what it adds: ``_q``, ``_dq``,
    ``_scale``, ``_zero_point``, ``_quantized``, ``_fp``...). ``nodes``: node names "unique", "empty" (all
    ``""``) or "tensor" (each node named as its output tensor; onnxruntime rejects duplicate node names).
    ``inits_as_inputs``: initializers also listed as graph inputs (IR < 4 exporters). ``value_info``: shapes
    of intermediate tensors recorded in the graph.
    """

    names: str = "plain"
    nodes: str = "unique"
    inits_as_inputs: bool = False
    value_info: bool = False


@dataclass(frozen=True)
class GraphSpec:
    """Everything ``build`` needs to recreate a drawn model exactly."""

    opset: int
    batch: int | str  # "N": symbolic batch dim
    input_shape: tuple[int, ...]  # without the batch dim
    seed: int
    steps: tuple[Step, ...]
    style: Style = Style()

    def describe(self) -> str:
        ops = " ".join(s.op for s in self.steps)
        return f"opset {self.opset}, input {self.batch}x{self.input_shape}: {ops}"


@dataclass
class FuzzGraph:
    spec: GraphSpec
    model: onnx.ModelProto = field(repr=False)

    def __repr__(self) -> str:
        return f"build({self.spec!r})"


Shape = tuple[Any, ...]


@dataclass
class _Value:
    name: str
    shape: Shape


def _conv_out(size: int, k: int, s: int, p0: int, p1: int, d: int) -> int:
    return (size + p0 + p1 - d * (k - 1) - 1) // s + 1


class Builder:
    """Builds a model step by step; every public op method is one kind of ``Step``."""

    def __init__(
        self, opset: int, batch: int | str, input_shape: tuple[int, ...], seed: int, style: Style = Style()
    ) -> None:
        self.style = style
        self.names: list[str] = ["input"]
        self.shapes: dict[str, Shape] = {}
        self.opset = opset
        self.batch = batch
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.stack: list[_Value] = [_Value("input", (batch, *input_shape))]
        self.input_shape = (batch, *input_shape)
        self.weights: dict[tuple[Any, ...], list[str]] = {}  # shape (or ("scalar", value)) -> shareable names
        self.count = 0

    # --- helpers -----------------------------------------------------------------------------
    def _name(self, prefix: str, op: str = "Constant") -> str:
        self.count += 1
        style = self.style.names
        if style == "torch":
            name = f"/{prefix}{self.count}/{op}_output_0"
        elif style == "tf":
            name = f"{prefix}{self.count}:0"
        elif style == "collide" and self.count % 2 == 0:
            base = self.names[int(self.rng.integers(len(self.names)))]
            suffixes = ("_q", "_dq", "_scale", "_zero_point", "_quantized", "_fp", "_int8_q", "_folded", "_bias")
            name = base + suffixes[int(self.rng.integers(len(suffixes)))]
            if name in self.names:
                name = f"{prefix}{self.count}"
        else:
            name = f"{prefix}{self.count}"
        self.names.append(name)
        return name

    def _node_name(self, out: str, op: str) -> str:
        return {"empty": "", "tensor": out}.get(self.style.nodes, f"{out}_{op}")

    def _const(self, prefix: str, array: np.ndarray, source: str = "init") -> str:
        name = self._name(prefix)
        tensor = numpy_helper.from_array(np.asarray(array), name)
        if source == "const":
            self.nodes.append(
                helper.make_node("Constant", [], [name], name=self._node_name(name, "Constant"), value=tensor)
            )
        else:
            self.inits.append(tensor)
        return name

    def _node(self, op: str, inputs: list[str], prefix: str, **attrs: Any) -> str:
        out = self._name(prefix, op)
        self.nodes.append(helper.make_node(op, inputs, [out], name=self._node_name(out, op), **attrs))
        return out

    def _weight(
        self, shape: tuple[int, ...], fan_in: int, gain: float, quirk: str, source: str, channel_axis: int = 0
    ) -> str:
        """A weight, or an existing one of the same shape when ``source`` is 'shared'."""
        if source == "shared" and self.weights.get(shape):
            return self.weights[shape][0]
        w = self.rng.standard_normal(shape) * (gain / math.sqrt(max(fan_in, 1)))
        if quirk != "none" and shape[channel_axis] > 1:
            index = [slice(None)] * len(shape)
            index[channel_axis] = int(self.rng.integers(shape[channel_axis]))
            w[tuple(index)] *= {"zero_channel": 0.0, "tiny_channel": 1e-3, "big_channel": 30.0}[quirk]
        name = self._const("w", w.astype(np.float32), "const" if source == "const" else "init")
        self.weights.setdefault(shape, []).append(name)
        return name

    def _vec(self, n: int, scale: float, source: str = "init", offset: float = 0.0) -> str:
        return self._const("b", (offset + self.rng.standard_normal(n) * scale).astype(np.float32), source)

    @property
    def top(self) -> _Value:
        return self.stack[-1]

    def _replace_top(self, name: str, shape: Shape) -> None:
        self.stack[-1] = _Value(name, shape)
        self.shapes[name] = shape

    # --- ops ---------------------------------------------------------------------------------
    def conv(
        self,
        cout: int,
        group: int,
        kernel: int,
        stride: int,
        pads: tuple[int, int, int, int],
        dilation: int,
        bias: bool,
        omit_group: bool,
        gain: float,
        quirk: str,
        source: str,
    ) -> None:
        x = self.top
        n, cin, h, w = x.shape
        wname = self._weight((cout, cin // group, kernel, kernel), cin // group * kernel * kernel, gain, quirk, source)
        inputs = [x.name, wname] + ([self._vec(cout, 0.1, "const" if source == "const" else "init")] if bias else [])
        attrs: dict[str, Any] = {
            "kernel_shape": [kernel, kernel],
            "strides": [stride] * 2,
            "pads": list(pads),
            "dilations": [dilation] * 2,
        }
        if not (omit_group and group == 1):
            attrs["group"] = group
        out = self._node("Conv", inputs, "conv", **attrs)
        oh = _conv_out(h, kernel, stride, pads[0], pads[2], dilation)
        ow = _conv_out(w, kernel, stride, pads[1], pads[3], dilation)
        self._replace_top(out, (n, cout, oh, ow))

    def conv_transpose(
        self,
        cout: int,
        group: int,
        kernel: int,
        stride: int,
        pads: tuple[int, int, int, int],
        output_padding: int,
        bias: bool,
        gain: float,
        source: str,
    ) -> None:
        x = self.top
        n, cin, h, w = x.shape
        wname = self._weight(
            (cin, cout // group, kernel, kernel), cin // group * kernel * kernel, gain, "none", source, channel_axis=1
        )
        inputs = [x.name, wname] + ([self._vec(cout, 0.1)] if bias else [])
        attrs: dict[str, Any] = {
            "kernel_shape": [kernel, kernel],
            "strides": [stride] * 2,
            "pads": list(pads),
            "group": group,
        }
        if output_padding:
            attrs["output_padding"] = [output_padding] * 2
        out = self._node("ConvTranspose", inputs, "convT", **attrs)
        oh = stride * (h - 1) + output_padding + kernel - pads[0] - pads[2]
        ow = stride * (w - 1) + output_padding + kernel - pads[1] - pads[3]
        self._replace_top(out, (n, cout, oh, ow))

    def batchnorm(self, epsilon: float, negative_gamma: bool, source: str) -> None:
        x = self.top
        c = x.shape[1]
        gamma = 1.0 + 0.3 * self.rng.standard_normal(c)
        if negative_gamma:
            gamma[int(self.rng.integers(c))] *= -1
        src = "const" if source == "const" else "init"
        params = [
            self._const("bn_scale", gamma.astype(np.float32), src),
            self._vec(c, 0.3, src),
            self._vec(c, 0.3, src),
            self._const("bn_var", (0.5 + np.abs(self.rng.standard_normal(c))).astype(np.float32), src),
        ]
        out = self._node("BatchNormalization", [x.name, *params], "bn", epsilon=epsilon)
        self._replace_top(out, x.shape)

    def relu(self) -> None:
        self._replace_top(self._node("Relu", [self.top.name], "relu"), self.top.shape)

    def clip(self, lo: float | None, hi: float | None, source: str) -> None:
        """Clip(lo, hi): Relu6 is clip(0, 6). Attributes below opset 11, inputs from 11 (None: empty slot)."""
        x = self.top
        if self.opset < 11:
            attrs = {k: v for k, v in (("min", lo), ("max", hi)) if v is not None}
            out = self._node("Clip", [x.name], "clip", **attrs)
        else:
            ins = [
                x.name,
                "" if lo is None else self._scalar("clip_min", lo, source),
                "" if hi is None else self._scalar("clip_max", hi, source),
            ]
            while ins[-1] == "":
                ins.pop()
            out = self._node("Clip", ins, "clip")
        self._replace_top(out, x.shape)

    def _scalar(self, prefix: str, value: float, source: str) -> str:
        """A float scalar constant; "shared" reuses one already made for the same value (deduplicating
        exporters share one Relu6 bound between all Clips)."""
        key = ("scalar", value)
        if source == "shared" and key in self.weights:
            return self.weights[key][0]
        name = self._const(prefix, np.array(value, np.float32), "const" if source == "const" else "init")
        self.weights.setdefault(key, []).append(name)  # type: ignore[arg-type]
        return name

    def identity(self) -> None:
        self._replace_top(self._node("Identity", [self.top.name], "identity"), self.top.shape)

    def drop(self) -> None:
        """Forget the top of the stack: the ops that computed it become dead code (unless read elsewhere)."""
        self.stack.pop()

    def add_const(self, per_channel: bool) -> None:
        x = self.top
        if per_channel:
            shape = (x.shape[1],) + (1,) * (len(x.shape) - 2)
        else:
            shape = ()
        c = self._const("addc", (0.3 * self.rng.standard_normal(shape)).astype(np.float32))
        self._replace_top(self._node("Add", [x.name, c], "add"), x.shape)

    def add_self(self) -> None:
        self._replace_top(self._node("Add", [self.top.name, self.top.name], "add"), self.top.shape)

    def fork(self) -> None:
        self.stack.append(self.top)

    def add_join(self) -> None:
        b, a = self.stack.pop(), self.stack.pop()
        self.stack.append(_Value(self._node("Add", [a.name, b.name], "add"), a.shape))
        self.shapes[self.top.name] = a.shape

    def concat(self) -> None:
        b, a = self.stack.pop(), self.stack.pop()
        shape = (a.shape[0], a.shape[1] + b.shape[1], *a.shape[2:])
        self.stack.append(_Value(self._node("Concat", [a.name, b.name], "concat", axis=1), shape))
        self.shapes[self.top.name] = shape

    def transpose(self, perm: tuple[int, ...]) -> None:
        x = self.top
        self._replace_top(
            self._node("Transpose", [x.name], "transpose", perm=list(perm)), tuple(x.shape[p] for p in perm)
        )

    def reshape(self, target: tuple[int, ...]) -> None:
        """``target`` as written in the shape tensor (0 copies the input dim, -1 is inferred)."""
        x = self.top
        shape_name = self._const("shape", np.array(target, np.int64))
        out = self._node("Reshape", [x.name, shape_name], "reshape")
        known = [x.shape[i] if t == 0 else t for i, t in enumerate(target)]
        if -1 in known:
            total = math.prod(d for d in x.shape[1:]) * (x.shape[0] if isinstance(x.shape[0], int) else 1)
            rest = math.prod(d for d in known if isinstance(d, int) and d != -1)
            known[known.index(-1)] = total // rest
        self._replace_top(out, tuple(known))

    def flatten(self) -> None:
        x = self.top
        self._replace_top(self._node("Flatten", [x.name], "flatten", axis=1), (x.shape[0], math.prod(x.shape[1:])))

    def global_avg_pool(self) -> None:
        x = self.top
        self._replace_top(self._node("GlobalAveragePool", [x.name], "gap"), (*x.shape[:2], 1, 1))

    def max_pool(self, kernel: int, stride: int) -> None:
        x = self.top
        n, c, h, w = x.shape
        out = self._node("MaxPool", [x.name], "maxpool", kernel_shape=[kernel] * 2, strides=[stride] * 2)
        self._replace_top(out, (n, c, _conv_out(h, kernel, stride, 0, 0, 1), _conv_out(w, kernel, stride, 0, 0, 1)))

    def gemm(
        self,
        out_features: int,
        alpha: float,
        beta: float,
        trans_a: bool,
        trans_b: bool,
        bias: str,
        gain: float,
        quirk: str,
        source: str,
    ) -> None:
        x = self.top
        n, k = x.shape
        a = x.name
        if trans_a:  # the activation as [K, N], read back transposed by the Gemm
            a = self._node("Transpose", [a], "transpose", perm=[1, 0])
        shape = (out_features, k) if trans_b else (k, out_features)
        wname = self._weight(shape, k, gain, quirk, source, channel_axis=0 if trans_b else 1)
        inputs = [a, wname]
        if bias == "vector":
            inputs.append(self._vec(out_features, 0.1))
        elif bias == "row":
            inputs.append(self._const("b", (0.1 * self.rng.standard_normal((1, out_features))).astype(np.float32)))
        elif bias == "scalar":
            inputs.append(self._const("b", np.array(0.1 * self.rng.standard_normal(), np.float32)))
        attrs: dict[str, Any] = {}
        if alpha != 1.0:
            attrs["alpha"] = alpha
        if beta != 1.0:
            attrs["beta"] = beta
        if trans_a:
            attrs["transA"] = 1
        if trans_b:
            attrs["transB"] = 1
        self._replace_top(self._node("Gemm", inputs, "gemm", **attrs), (n, out_features))

    def matmul(self, out_features: int, bias: bool, gain: float, quirk: str, source: str) -> None:
        x = self.top
        k = x.shape[-1]
        wname = self._weight((k, out_features), k, gain, quirk, source, channel_axis=1)
        out = self._node("MatMul", [x.name, wname], "matmul")
        if bias:
            out = self._node("Add", [out, self._vec(out_features, 0.1)], "add")
        self._replace_top(out, (*x.shape[:-1], out_features))

    # --- model -------------------------------------------------------------------------------
    def model(self, name: str = "fuzz") -> onnx.ModelProto:
        outputs: list[_Value] = []
        for v in self.stack:
            if v.name != "input" and all(o.name != v.name for o in outputs):
                outputs.append(v)
        if not outputs:  # only forks of the input left: one Relu so the graph computes something
            self.relu()
            outputs = [self.top]

        def vi(v: _Value) -> onnx.ValueInfoProto:
            return helper.make_tensor_value_info(v.name, FLOAT, list(v.shape))

        inputs = [vi(_Value("input", self.input_shape))]
        if self.style.inits_as_inputs:
            inputs += [helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in self.inits]
        value_info = []
        if self.style.value_info:
            outs = {v.name for v in outputs}
            value_info = [vi(_Value(n, shape)) for n, shape in self.shapes.items() if n not in outs]
        graph = helper.make_graph(self.nodes, name, inputs, [vi(v) for v in outputs], self.inits, value_info=value_info)
        opsets = [helper.make_opsetid("", self.opset)]
        ir = min(MAX_IR_VERSION, max(3, helper.find_min_ir_version_for(opsets)))
        return helper.make_model(graph, opset_imports=opsets, ir_version=ir, producer_name="qpasses-fuzz")


def build(spec: GraphSpec) -> onnx.ModelProto:
    """The model a ``GraphSpec`` describes (what a failing example's reproducer calls)."""
    b = Builder(spec.opset, spec.batch, spec.input_shape, spec.seed, spec.style)
    for step in spec.steps:
        getattr(b, step.op)(**dict(step.args))
    return b.model()


# --- drawing the steps -----------------------------------------------------------------------------

WEIGHT_SOURCES = st.sampled_from(["init", "init", "const", "shared"])
QUIRKS = st.sampled_from(["none", "none", "none", "zero_channel", "tiny_channel", "big_channel"])
GAINS = st.sampled_from([1.0, 1.0, 0.3, 3.0])
ALL_OPS = (
    "conv",
    "conv_transpose",
    "batchnorm",
    "relu",
    "relu6",
    "clip",
    "add_const",
    "add_self",
    "fork",
    "add_join",
    "concat",
    "transpose",
    "reshape",
    "flatten",
    "global_avg_pool",
    "max_pool",
    "gemm",
    "matmul",
    "identity",
    "drop",
)
# How often an applicable op is drawn relative to the others (layers and joins matter most).
OP_WEIGHTS = {
    "conv": 6,
    "conv_transpose": 2,
    "batchnorm": 3,
    "relu": 2,
    "relu6": 2,
    "clip": 1,
    "add_const": 1,
    "add_self": 1,
    "fork": 3,
    "add_join": 6,
    "concat": 6,
    "transpose": 1,
    "reshape": 1,
    "flatten": 1,
    "global_avg_pool": 1,
    "max_pool": 1,
    "gemm": 5,
    "matmul": 3,
    "identity": 1,
    "drop": 3,
}


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _elements(shape: Shape) -> int:
    return math.prod(d if isinstance(d, int) else FEED_BATCH for d in shape)


def _applicable(b: Builder, ops: tuple[str, ...]) -> list[str]:
    x = b.top
    rank = len(x.shape)
    fixed_batch = isinstance(b.batch, int)
    ok: list[str] = []
    for op in ops:
        if op in ("relu", "relu6", "clip", "add_const", "add_self", "batchnorm", "identity"):
            ok.append(op)
        elif op == "drop":
            if len(b.stack) >= 2:
                ok.append(op)
        elif op == "fork":
            if len(b.stack) < 3:
                ok.append(op)
        elif op == "add_join":
            if len(b.stack) >= 2 and b.stack[-2].shape == x.shape:
                ok.append(op)
        elif op == "concat":
            if len(b.stack) >= 2:
                y = b.stack[-2]
                if (
                    len(y.shape) == rank
                    and y.shape[0] == x.shape[0]
                    and y.shape[2:] == x.shape[2:]
                    and x.shape[1] + y.shape[1] <= 2 * MAX_CHANNELS
                ):
                    ok.append(op)
        elif rank == 4:
            n, c, h, w = x.shape
            if op in ("conv", "transpose") and isinstance(c, int):
                ok.append(op)
            elif op == "conv_transpose" and isinstance(c, int) and max(h, w) <= MAX_SPATIAL - 2:
                ok.append(op)
            elif op in ("reshape", "flatten") and _elements(x.shape[1:]) <= MAX_FEATURES:
                ok.append(op)
            elif op == "global_avg_pool" or (op == "max_pool" and min(h, w) >= 2):
                ok.append(op)
            elif op == "matmul":
                ok.append(op)
        elif rank == 2:
            if op in ("gemm", "matmul", "reshape"):
                ok.append(op)
            elif op == "transpose" and fixed_batch:
                ok.append(op)
    return ok


def _draw_step(draw: Callable[[st.SearchStrategy[Any]], Any], b: Builder, op: str) -> Step:
    x = b.top
    args: dict[str, Any]
    if op == "conv":
        n, cin, h, w = x.shape
        kind = draw(st.sampled_from(["plain", "plain", "depthwise", "grouped"]))
        if kind == "depthwise":
            group = cin
            cout = cin * draw(st.sampled_from([1, 1, 2])) if cin <= MAX_CHANNELS // 2 else cin
        elif kind == "grouped" and len(_divisors(cin)) > 2:
            group = draw(st.sampled_from(_divisors(cin)[1:-1]))
            cout = group * draw(st.integers(1, max(1, MAX_CHANNELS // group)))
        else:
            group = 1
            cout = draw(st.integers(1, MAX_CHANNELS))
        kernel = draw(st.sampled_from([1, 3, 3, 2]))
        dilation = draw(st.sampled_from([1, 1, 2])) if kernel > 1 else 1
        span = dilation * (kernel - 1) + 1
        pad_max = kernel - 1
        pads = tuple(draw(st.integers(0, pad_max)) for _ in range(4))
        if draw(st.booleans()):  # "same" padding, the common case
            pads = (span // 2, span // 2, (span - 1) // 2, (span - 1) // 2)
        stride = draw(st.sampled_from([1, 1, 2]))
        if min(h + pads[0] + pads[2], w + pads[1] + pads[3]) < span:
            pads = (span, span, span, span)
        if len(b.stack) >= 2 and draw(st.booleans()):  # a branch to re-join: keep the spatial shape
            kernel, dilation, stride = draw(st.sampled_from([1, 3])), 1, 1
            pads = (kernel // 2,) * 4
            if draw(st.booleans()) and (group == 1 or cout == cin):
                cout = cin
        source = draw(WEIGHT_SOURCES)
        same_input = [w for w in b.weights if len(w) == 4 and w[0] != "scalar" and w[1] == cin and w[2] == w[3]]
        if source == "shared" and same_input:  # read a weight an earlier Conv reads (same input channels)
            cout, _, kernel, _ = draw(st.sampled_from(sorted(same_input)))
            group, dilation = 1, 1
            pads = (kernel // 2, kernel // 2, (kernel - 1) // 2, (kernel - 1) // 2)
        args = dict(
            cout=cout,
            group=group,
            kernel=kernel,
            stride=stride,
            pads=pads,
            dilation=dilation,
            bias=draw(st.booleans()),
            omit_group=draw(st.booleans()),
            gain=draw(GAINS),
            quirk=draw(QUIRKS),
            source=source,
        )
    elif op == "conv_transpose":
        cin = x.shape[1]
        group = cin if draw(st.booleans()) and cin > 1 else 1
        cout = cin if group > 1 else draw(st.integers(1, MAX_CHANNELS))
        kernel = draw(st.sampled_from([1, 2, 3]))
        stride = draw(st.sampled_from([1, 2])) if 2 * max(x.shape[2:]) + 2 <= MAX_SPATIAL else 1
        pmax = max(0, (kernel - 1) // 2)
        pads = tuple(draw(st.integers(0, pmax)) for _ in range(4))
        output_padding = draw(st.integers(0, stride - 1))
        args = dict(
            cout=cout,
            group=group,
            kernel=kernel,
            stride=stride,
            pads=pads,
            output_padding=output_padding,
            bias=draw(st.booleans()),
            gain=draw(GAINS),
            source=draw(WEIGHT_SOURCES),
        )
    elif op == "batchnorm":
        args = dict(
            epsilon=draw(st.sampled_from([1e-5, 1e-3])),
            negative_gamma=draw(st.booleans()),
            source=draw(st.sampled_from(["init", "const"])),
        )
    elif op == "relu6":
        return Step("clip", (("lo", 0.0), ("hi", 6.0), ("source", draw(st.sampled_from(["init", "const", "shared"])))))
    elif op == "clip":
        lo = draw(st.sampled_from([None, -1.0, 0.0, -0.5]))
        hi = draw(st.sampled_from([None, 1.0, 2.5, 6.0]))
        args = dict(lo=lo, hi=hi, source=draw(st.sampled_from(["init", "const", "shared"])))
    elif op == "add_const":
        args = dict(per_channel=draw(st.booleans()))
    elif op == "transpose":
        if len(x.shape) == 2:
            perm: tuple[int, ...] = (1, 0)
        elif isinstance(b.batch, int):
            perm = tuple(draw(st.permutations([0, 1, 2, 3])))
        else:
            perm = (0, *draw(st.permutations([1, 2, 3])))
        if len(x.shape) == 4 and not (isinstance(x.shape[perm[1]], int) and x.shape[perm[1]] <= MAX_CHANNELS):
            perm = (0, 1, 3, 2)  # keep the channel count small for the ops after it
        args = dict(perm=perm)
    elif op == "reshape":
        if len(x.shape) == 4:
            n, c, h, w = x.shape
            choice = draw(st.sampled_from(["flat", "flat_batch", "merge_hw"]))
            if choice == "merge_hw" and isinstance(c, int) and c <= MAX_CHANNELS:
                target: tuple[int, ...] = (0, c, h * w, 1)
            elif choice == "flat_batch" and isinstance(b.batch, int) and x.shape[0] == b.batch:
                target = (b.batch, -1)
            else:
                target = (0, -1)
        else:
            target = (0, x.shape[1], 1, 1)
        args = dict(target=target)
    elif op == "max_pool":
        args = dict(kernel=2, stride=draw(st.sampled_from([1, 2])))
    elif op == "gemm":
        same = len(b.stack) >= 2 and draw(st.booleans()) and x.shape[1] <= 16
        trans_a = draw(st.booleans())
        bias = draw(st.sampled_from(["vector", "vector", "row", "scalar"] + (["none"] if b.opset >= 11 else [])))
        out_features = x.shape[1] if same else draw(st.integers(1, 16))
        trans_b, source = draw(st.booleans()), draw(WEIGHT_SOURCES)
        shareable = sorted(
            w for w in b.weights if len(w) == 2 and w[0] != "scalar" and (w[1] if trans_b else w[0]) == x.shape[1]
        )
        if source == "shared" and shareable:  # read a weight an earlier Gemm/MatMul reads
            w = draw(st.sampled_from(shareable))
            out_features = w[0] if trans_b else w[1]
        args = dict(
            out_features=out_features,
            alpha=draw(st.sampled_from([1.0, 1.0, 0.5, 2.0, -1.0])),
            beta=draw(st.sampled_from([1.0, 1.0, 0.5, 2.0, 0.0])),
            trans_a=trans_a,
            trans_b=trans_b,
            bias=bias,
            gain=draw(GAINS),
            quirk=draw(QUIRKS),
            source=source,
        )
    elif op == "matmul":
        same = len(b.stack) >= 2 and draw(st.booleans()) and x.shape[-1] <= 12
        out_features, source = x.shape[-1] if same else draw(st.integers(1, 12)), draw(WEIGHT_SOURCES)
        shareable = sorted(w for w in b.weights if len(w) == 2 and w[0] != "scalar" and w[0] == x.shape[-1])
        if source == "shared" and shareable:
            out_features = draw(st.sampled_from(shareable))[1]
        args = dict(
            out_features=out_features, bias=draw(st.booleans()), gain=draw(GAINS), quirk=draw(QUIRKS), source=source
        )
    else:
        args = {}
    return Step(op, tuple(args.items()))


@st.composite
def graph_specs(
    draw: Any,
    *,
    max_steps: int = 7,
    ops: tuple[str, ...] = ALL_OPS,
    opsets: tuple[int, ...] = OPSETS,
    rank4: bool | None = None,
) -> GraphSpec:
    opset = draw(st.sampled_from(opsets))
    batch: int | str = draw(st.sampled_from(["N", "N", 1, 2]))
    if rank4 is None:
        rank4 = draw(st.integers(0, 3)) > 0
    if rank4:
        input_shape: tuple[int, ...] = (draw(st.integers(1, 6)), draw(st.integers(3, 8)), draw(st.integers(3, 8)))
    else:
        input_shape = (draw(st.integers(1, 24)),)
    seed = draw(st.integers(0, 2**16))
    style = Style()
    if draw(st.integers(0, 2)) == 0:  # a third of the graphs come from a messier exporter
        style = Style(
            names=draw(st.sampled_from(["plain", "torch", "tf", "collide", "collide"])),
            nodes=draw(st.sampled_from(["unique", "empty", "tensor"])),
            inits_as_inputs=draw(st.booleans()),
            value_info=draw(st.booleans()),
        )
    b = Builder(opset, batch, input_shape, seed, style)
    steps: list[Step] = []
    for _ in range(draw(st.integers(1, max_steps))):
        choices = _applicable(b, ops)
        if not choices:
            break
        weighted = [op for op in choices for _ in range(OP_WEIGHTS.get(op, 1))]
        layer = [op for op in ("conv", "gemm", "matmul") if op in choices]
        if layer and "batchnorm" in ops and draw(st.integers(0, 2)) == 0:
            # a layer -> [BatchNormalization] -> [Relu | Relu6] block, what CLE and BN folding look for
            block = [draw(st.sampled_from(layer))]
            block += ["batchnorm"] if draw(st.booleans()) else []
            block += [draw(st.sampled_from(["relu", "relu6", "none"]))]
        else:
            block = [draw(st.sampled_from(weighted))]
        for op in block:
            if op in ops:
                step = _draw_step(draw, b, op)
                getattr(b, step.op)(**dict(step.args))
                steps.append(step)
    while len(b.stack) >= 2 and draw(st.integers(0, 3)) > 0:  # mostly re-join open branches
        joins = [op for op in _applicable(b, ("add_join", "concat")) if op in ops]
        if not joins:
            break
        step = Step(draw(st.sampled_from(joins)))
        getattr(b, step.op)()
        steps.append(step)
    return GraphSpec(opset, batch, input_shape, seed, tuple(steps), style)


def graphs(**kwargs: Any) -> st.SearchStrategy[FuzzGraph]:
    """Random valid FP32 models (see the module docstring); kwargs go to ``graph_specs``."""
    return graph_specs(**kwargs).map(lambda spec: FuzzGraph(spec, build(spec)))


# --------------------------------------------------------------------------------------------------
# feeds and comparisons


def feed_shape(model: onnx.ModelProto, name: str = "input", batch: int = FEED_BATCH) -> tuple[int, ...]:
    vi = next(v for v in model.graph.input if v.name == name)
    return tuple(d.dim_value if d.HasField("dim_value") else batch for d in vi.type.tensor_type.shape.dim)


def random_feeds(model: onnx.ModelProto, seed: int, count: int = 1, scale: float = 1.0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    shape = feed_shape(model)
    return [{"input": (scale * rng.standard_normal(shape)).astype(np.float32)} for _ in range(count)]


def relative_error(ref: np.ndarray, got: np.ndarray) -> float:
    """max |got - ref| / max(|ref|) (0 for empty outputs); inf when shapes differ or got is not finite."""
    if ref.shape != got.shape:
        return math.inf
    if ref.size == 0:
        return 0.0
    if not np.all(np.isfinite(got)):
        return math.inf
    scale = max(float(np.max(np.abs(ref))), 1e-6)
    return float(np.max(np.abs(got.astype(np.float64) - ref.astype(np.float64)))) / scale


# --------------------------------------------------------------------------------------------------
# an independent fake-quant reference for every op the graphs use


def _attrs(node: onnx.NodeProto) -> dict[str, Any]:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def conv_transpose2d(x: np.ndarray, w: np.ndarray, b: np.ndarray, a: dict[str, Any]) -> np.ndarray:
    """ONNX ConvTranspose (NCHW, group, strides, pads, output_padding; no dilation) by scattering."""
    n, cin, h, wd = x.shape
    _, cout_g, kh, kw = w.shape
    group = int(a.get("group", 1))
    sh, sw = a.get("strides", [1, 1])
    assert a.get("dilations", [1, 1]) == [1, 1]
    pt, pl, pb, pr = a.get("pads", [0, 0, 0, 0])
    oph, opw = a.get("output_padding", [0, 0])
    full_h, full_w = sh * (h - 1) + kh + oph, sw * (wd - 1) + kw + opw
    y = np.zeros((n, cout_g * group, full_h, full_w))
    cin_g = cin // group
    for g in range(group):
        xs = x[:, g * cin_g : (g + 1) * cin_g]
        ws = w[g * cin_g : (g + 1) * cin_g]  # [cin_g, cout_g, kh, kw]
        contrib = np.einsum("nchw,coij->nohwij", xs, ws)
        for i in range(kh):
            for j in range(kw):
                y[:, g * cout_g : (g + 1) * cout_g, i : i + sh * h : sh, j : j + sw * wd : sw] += contrib[..., i, j]
    y = y[:, :, pt : full_h - pb, pl : full_w - pr]
    return y + b.reshape(1, -1, 1, 1)


def fake_quantize32(grid: Grid, x: np.ndarray) -> np.ndarray:
    """``grid.fake_quantize`` as ONNX Q/DQ compute it: float32 scales (what a model stores) and float32
    ``x / scale`` before rounding (half to even), so exact ties (clipped values, values already on another
    grid) round the same way as in onnxruntime. Returned as float64."""
    x32 = np.asarray(x, dtype=np.float64).astype(np.float32)
    shape = [1] * x32.ndim
    if grid.axis is not None:
        shape[grid.axis] = len(grid.scale)
    scale = np.asarray(grid.scale, dtype=np.float32).reshape(shape if grid.axis is not None else ())
    offset = np.asarray(grid.offset, dtype=np.float64).reshape(shape if grid.axis is not None else ())
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        levels = np.clip(np.rint((x32 / scale).astype(np.float64)) - offset, 0, 2**grid.bitwidth - 1)
    return ((levels + offset).astype(np.float32) * scale).astype(np.float64)


class FuzzReference(Reference):
    """``numpy_reference.Reference`` (float64) with the ops of the fuzz graphs, no BN folding.

    Quantized run: activations with an encoding are fake-quantized; a constant read by an op is
    fake-quantized with its parameter encoding; the bias of a Conv/ConvTranspose/Gemm (a 1-D constant
    in its bias slot) is rounded to the integer grid of ``s_in * s_w`` when its input and weight are
    quantized and qpasses quantized it (it has an entry in the encodings); a narrower bias (``bias_bw`` < 32)
    has its own grid in the encodings, like any parameter.
    """

    def __init__(self, model: onnx.ModelProto) -> None:
        super().__init__(model, fold=False)
        self.params: Mapping[str, Grid] = {}

    def _layer(self, node: onnx.NodeProto) -> Layer:  # every layer runs through _run_node instead
        return node  # type: ignore[return-value]

    def _value(self, name: str, env: dict[str, np.ndarray]) -> np.ndarray:
        if name in env:
            return env[name]
        value = self.consts[name].astype(np.float64) if self.consts[name].dtype.kind == "f" else self.consts[name]
        grid = self.params.get(name)
        return fake_quantize32(grid, value) if grid is not None and value.dtype.kind == "f" else value

    def run_quantized(
        self,
        feeds: Mapping[str, np.ndarray],
        activations: Mapping[str, Grid],
        params: Mapping[str, Grid],
        bias_bw: int = 32,
        edges: Mapping[tuple[str, int], Grid] | None = None,
    ) -> dict[str, np.ndarray]:
        """``edges``: grids on one input of one op only, by (the op's output name, input slot): the
        conversions ``insert-converts`` adds (see ``conversion_edges``)."""
        self.params, self.acts, self.bias_bw, self.edges = params, activations, bias_bw, dict(edges or {})
        try:
            return self._run(feeds)
        finally:
            self.params, self.acts, self.edges = {}, {}, {}

    def run(self, feeds: Mapping[str, np.ndarray], quant: Any = None) -> dict[str, np.ndarray]:
        assert quant is None, "use run_quantized"
        self.params, self.acts, self.bias_bw, self.edges = {}, {}, 32, {}
        return self._run(feeds)

    def _run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        env: dict[str, np.ndarray] = {}

        def put(name: str, value: np.ndarray) -> None:
            grid = self.acts.get(name)
            env[name] = fake_quantize32(grid, value) if grid is not None else value

        for name, value in feeds.items():
            put(name, np.asarray(value, dtype=np.float64))
        for node in self.plan:
            put(node.output[0], self._run_node(node, env))  # type: ignore[arg-type]
        return env

    def _bias(self, node: onnx.NodeProto, slot: int, env: dict[str, np.ndarray], weight_axis: int) -> np.ndarray:
        name = node.input[slot]
        if self.bias_bw < 32:  # narrow biases get their own grid (the spec's rule), read like any parameter
            return self._value(name, env)
        raw = self.consts[name].astype(np.float64)
        in_grid = self.edges.get((node.output[0], 0)) or self.acts.get(node.input[0])  # requantized input: its grid
        w_grid = self.params.get(node.input[1])
        if raw.ndim != 1 or name not in self.params or in_grid is None or w_grid is None:
            return self._value(name, env)
        # The spec's int32 grid s_in * s_w (numpy_reference), dequantized with the float32 scale the model stores.
        scale = in_grid.scale[0] * np.asarray(w_grid.scale, dtype=np.float64)
        levels = quantize_bias(raw, in_grid.scale[0], np.asarray(w_grid.scale), self.bias_bw) / scale
        return np.rint(levels) * scale.astype(np.float32).astype(np.float64)

    def _run_node(self, node: onnx.NodeProto, env: dict[str, np.ndarray]) -> np.ndarray:
        key = node.output[0]
        ins = [self._value(n, env) if n else None for n in node.input]
        for i, name in enumerate(node.input):
            if (key, i) in self.edges and name in env:  # a conversion on this edge only
                ins[i] = fake_quantize32(self.edges[key, i], env[name])
                if i == 0:  # the single-input ops of the base class read env
                    env = {**env, name: ins[0]}
        op, a = node.op_type, _attrs(node)
        if op == "Conv":
            x, w = ins[0], ins[1]
            b = self._bias(node, 2, env, 0) if len(ins) > 2 and ins[2] is not None else np.zeros(w.shape[0])
            return conv2d(x, w, b, a)
        if op == "ConvTranspose":
            x, w = ins[0], ins[1]
            cout = w.shape[1] * int(a.get("group", 1))
            b = self._bias(node, 2, env, 1) if len(ins) > 2 and ins[2] is not None else np.zeros(cout)
            return conv_transpose2d(x, w, b, a)
        if op == "Gemm":
            x, w = ins[0], ins[1]
            x = x.T if a.get("transA", 0) else x
            w = w.T if a.get("transB", 0) else w
            y = float(a.get("alpha", 1.0)) * (x @ w)
            if len(ins) > 2 and ins[2] is not None:
                c = self._bias(node, 2, env, 0 if a.get("transB", 0) else 1)
                y = y + float(a.get("beta", 1.0)) * c
            return y
        if op == "MatMul":
            return ins[0] @ ins[1]
        if op == "Add":
            return ins[0] + ins[1]
        if op == "Concat":
            return np.concatenate(ins, axis=int(a["axis"]))
        if op == "Transpose":
            return np.transpose(ins[0], a.get("perm"))
        if op == "Reshape":
            target = [ins[0].shape[i] if t == 0 else int(t) for i, t in enumerate(ins[1])]
            return ins[0].reshape(target)
        if op == "Clip":
            lo = ins[1] if len(ins) > 1 and ins[1] is not None else a.get("min", -np.inf)
            hi = ins[2] if len(ins) > 2 and ins[2] is not None else a.get("max", np.inf)
            return np.clip(ins[0], lo, hi)
        if op == "BatchNormalization":
            gamma, beta, mean, var = ins[1:5]
            k = gamma / np.sqrt(var + a.get("epsilon", 1e-5))
            shape = (1, -1) + (1,) * (ins[0].ndim - 2)
            return (ins[0] - mean.reshape(shape)) * k.reshape(shape) + beta.reshape(shape)
        if op == "Identity":
            return ins[0]
        if op == "Shape":  # fold-matmul-bias reshapes an N-D MatMul input back: Shape -> Slice -> Concat
            return np.array(ins[0].shape, np.int64)
        if op == "Slice":
            starts, ends = ins[1], ins[2]
            axes = ins[3] if len(ins) > 3 and ins[3] is not None else range(len(starts))
            index = [slice(None)] * ins[0].ndim
            for axis, lo, hi in zip(axes, starts, ends, strict=True):
                index[int(axis)] = slice(int(lo), int(hi))
            return ins[0][tuple(index)]
        return super()._run_node(node, env)


_INT_RANGES = {
    TensorProto.UINT8: (8, 0),
    TensorProto.INT8: (8, -128),
    TensorProto.UINT16: (16, 0),
    TensorProto.INT16: (16, -(2**15)),
    TensorProto.UINT4: (4, 0),
    TensorProto.INT4: (4, -8),
}


def qdq_grid(model: onnx.ModelProto, q: onnx.NodeProto) -> Grid | None:
    """The grid of a per-tensor QuantizeLinear in ``model`` (spec convention), None if not one."""
    consts = {t.name: t for t in model.graph.initializer}
    if len(q.input) < 3 or q.input[1] not in consts or q.input[2] not in consts:
        return None
    scale, zp = consts[q.input[1]], consts[q.input[2]]
    if zp.data_type not in _INT_RANGES or math.prod(scale.dims) != 1:
        return None
    bits, qmin = _INT_RANGES[zp.data_type]
    zero = int(numpy_helper.to_array(zp).reshape(-1)[0])
    return Grid(bits, (float(numpy_helper.to_array(scale).reshape(-1)[0]),), (qmin - zero,))


def conversion_edges(model: onnx.ModelProto, float_tensors: set[str]) -> dict[tuple[str, int], Grid]:
    """The conversions ``insert-converts`` puts on single edges of the lowered model, by the (op, slot)
    reading them: a Q -> DQ on a tensor the encodings call float (float -> int), and a
    DQ -> Q -> DQ requantizing a quantized tensor onto the reader's grid (int8 <-> int16)."""
    producer = {o: n for n in model.graph.node for o in n.output}
    outputs = {o.name for o in model.graph.output}
    edges: dict[tuple[str, int], Grid] = {}
    for node in model.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            continue
        # Readers are keyed by their output's FP32 name (node names may be empty); a graph output's
        # producer writes <name>_fp, quantized into <name>.
        key = node.output[0]
        if key.endswith("_fp") and key[:-3] in outputs:
            key = key[:-3]
        for slot, name in enumerate(node.input):
            dq = producer.get(name)
            if dq is None or dq.op_type != "DequantizeLinear":
                continue
            q = producer.get(dq.input[0])
            if q is None or q.op_type != "QuantizeLinear":
                continue
            source = producer.get(q.input[0])
            requantize = source is not None and source.op_type == "DequantizeLinear"
            if q.input[0] in float_tensors or requantize:
                grid = qdq_grid(model, q)
                if grid is not None:
                    edges[key, slot] = grid
    return edges


# --------------------------------------------------------------------------------------------------
# encodings documents


ACT_NAMES = ("input", "conv1", "relu2", "out")
PARAM_NAMES = ("w1", "b1", "w2")


@st.composite
def _legacy_entry(draw: Any, channels: int = 1) -> list[dict[str, Any]]:
    bw = draw(st.sampled_from([4, 8, 8, 16, 32]))
    entries = []
    for _ in range(channels):
        lo = draw(st.floats(-10, 0, allow_nan=False))
        hi = draw(st.floats(0, 10, allow_nan=False))
        entries.append(
            {
                "bitwidth": bw,
                "dtype": "int",
                "is_symmetric": draw(st.sampled_from(["True", "False"])),
                "min": lo,
                "max": hi,
                "offset": draw(st.integers(-(2**bw), 0)),
                "scale": (hi - lo) / (2**bw - 1) or 1e-4,
            }
        )
    if draw(st.integers(0, 5)) == 0:
        return [{"bitwidth": draw(st.sampled_from([8, 16, 32])), "dtype": draw(st.sampled_from(["int", "float"]))}]
    return entries


@st.composite
def _v1_entry(draw: Any, name: str, channels: int = 1) -> dict[str, Any]:
    bw = draw(st.sampled_from([4, 8, 8, 16, 32]))
    if draw(st.integers(0, 5)) == 0:
        return {"name": name, "dtype": draw(st.sampled_from(["INT", "FLOAT"])), "bw": bw, "enc_type": "PER_TENSOR"}
    sym = draw(st.booleans())
    return {
        "name": name,
        "enc_type": "PER_CHANNEL" if channels > 1 else "PER_TENSOR",
        "dtype": "INT",
        "bw": bw,
        "is_sym": sym,
        "scale": [draw(st.floats(1e-6, 10)) for _ in range(channels)],
        "offset": [-(2 ** (bw - 1)) if sym else draw(st.integers(-(2**bw) + 1, 0)) for _ in range(channels)],
    }


def _json_leaves() -> st.SearchStrategy[Any]:
    return st.one_of(
        st.none(),
        st.booleans(),
        st.integers(),
        st.integers(min_value=10**300, max_value=10**400),
        st.floats(),
        st.sampled_from([math.nan, math.inf, -math.inf, 1e308, -1e308, 5e-324, 0.0, -0.0]),
        st.text(max_size=8),
        st.sampled_from(["True", "False", "INT", "FLOAT", "PER_CHANNEL", "int", "float", "8"]),
    )


JSON = st.recursive(
    _json_leaves(),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=6), inner, max_size=4)),
    max_leaves=12,
)


@st.composite
def _mutate(draw: Any, doc: Any, depth: int = 0) -> Any:
    """Corrupt one place of a JSON document: replace a value, delete or add a key, nest deeply."""
    if isinstance(doc, dict) and doc and draw(st.integers(0, 3)) > 0:
        key = draw(st.sampled_from(sorted(doc)))
        out = dict(doc)
        action = draw(st.sampled_from(["recurse", "recurse", "delete", "replace", "add"]))
        if action == "recurse":
            out[key] = draw(_mutate(doc[key], depth + 1))
        elif action == "delete":
            del out[key]
        elif action == "replace":
            out[key] = draw(JSON)
        else:
            out[draw(st.text(max_size=6))] = draw(JSON)
        return out
    if isinstance(doc, list) and doc and draw(st.integers(0, 3)) > 0:
        i = draw(st.integers(0, len(doc) - 1))
        out_list = list(doc)
        action = draw(st.sampled_from(["recurse", "recurse", "delete", "replace", "append"]))
        if action == "recurse":
            out_list[i] = draw(_mutate(doc[i], depth + 1))
        elif action == "delete":
            del out_list[i]
        elif action == "replace":
            out_list[i] = draw(JSON)
        else:
            out_list.append(draw(JSON))
        return out_list
    return draw(JSON)


EXTREMES = (
    10**400,
    -(10**400),
    2**63,
    -(2**63) - 1,
    math.nan,
    math.inf,
    -math.inf,
    1e308,
    -1e308,
    5e-324,
    -0.0,
    1.5,
    True,
    "8",
    None,
)


def _numeric_paths(doc: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Paths to every number (bool excluded) in a JSON document."""
    if isinstance(doc, dict):
        return [p for k, v in doc.items() for p in _numeric_paths(v, (*path, k))]
    if isinstance(doc, list):
        return [p for i, v in enumerate(doc) for p in _numeric_paths(v, (*path, i))]
    return [path] if isinstance(doc, int | float) and not isinstance(doc, bool) else []


def _replace(doc: Any, path: tuple[Any, ...], value: Any) -> Any:
    if not path:
        return value
    out = dict(doc) if isinstance(doc, dict) else list(doc)
    out[path[0]] = _replace(doc[path[0]], path[1:], value)
    return out


@dataclass
class EncodingsCase:
    """A drawn encodings file: its text (or bytes), whether it was corrupted, and the model's tensors."""

    text: str | bytes
    corrupted: bool
    tensors: dict[str, Any] | None
    doc: Any = field(default=None, repr=False)

    def __repr__(self) -> str:
        text = (
            self.text
            if len(self.text) < 4000
            else f"{self.text[:200]!r} ... {self.text[-200:]!r} ({len(self.text)} characters)"
        )
        return f"EncodingsCase(text={text!r}, corrupted={self.corrupted}, tensors={self.tensors!r})"


@st.composite
def encodings_documents(draw: Any) -> EncodingsCase:
    from qpasses.quant.encodings_file import TensorSpec

    version = draw(st.sampled_from(["0.6.1", "1.0.0"]))
    channels = {"w1": draw(st.integers(1, 4)), "w2": draw(st.integers(1, 4))}
    tensors: dict[str, Any] | None = None
    if draw(st.booleans()):
        tensors = {n: TensorSpec("activation") for n in ACT_NAMES}
        tensors.update(
            {
                "w1": TensorSpec("weight", channels["w1"], 0),
                "b1": TensorSpec("bias", channels["w1"], 0),
                "w2": TensorSpec("weight", channels["w2"], draw(st.sampled_from([0, 1]))),
            }
        )
    acts = draw(st.lists(st.sampled_from(ACT_NAMES + ("unknown_act",)), unique=True, max_size=4))
    params = draw(st.lists(st.sampled_from(PARAM_NAMES + ("unknown_param",)), unique=True, max_size=3))

    def count(name: str) -> int:
        return channels.get(name, 1) if draw(st.booleans()) else 1

    if version == "0.6.1":
        doc: Any = {
            "version": version,
            "activation_encodings": {n: draw(_legacy_entry()) for n in acts},
            "param_encodings": {n: draw(_legacy_entry(count(n))) for n in params},
        }
    else:
        doc = {
            "version": version,
            "activation_encodings": [draw(_v1_entry(n)) for n in acts],
            "param_encodings": [draw(_v1_entry(n, count(n))) for n in params],
        }
    corrupted = draw(st.integers(0, 2)) > 0
    kind = "json"
    if corrupted:
        kind = draw(
            st.sampled_from(["mutate", "mutate", "mutate", "extreme", "extreme", "deep", "truncate", "bytes", "json"])
        )
        paths = _numeric_paths(doc)
        if kind == "extreme" and paths:
            doc = _replace(doc, draw(st.sampled_from(paths)), draw(st.sampled_from(EXTREMES)))
        elif kind in ("mutate", "extreme"):
            doc = draw(_mutate(doc))
        elif kind == "deep":
            depth = draw(st.sampled_from([50, 1000, 100_000]))
            inner = draw(st.sampled_from(["[", '{"a":']))
            close = "]" if inner == "[" else "}"
            section = draw(st.sampled_from(["activation_encodings", "param_encodings"]))
            text = json.dumps({k: v for k, v in doc.items() if k != section})[:-1]
            return EncodingsCase(f'{text}, "{section}": {inner * depth}1{close * depth}}}', True, tensors)
        elif kind == "json":
            doc = draw(JSON)
    text = json.dumps(doc, allow_nan=True)
    if kind == "truncate":
        text = text[: draw(st.integers(0, max(0, len(text) - 1)))]
    elif kind == "bytes":
        raw = text.encode()
        cut = draw(st.integers(0, len(raw)))
        return EncodingsCase(
            raw[:cut] + draw(st.sampled_from([b"\xff\xfe", b"\x80", b"\xc3", b"\x00"])) + raw[cut:], True, tensors, doc
        )
    return EncodingsCase(text, corrupted, tensors, doc)


# --------------------------------------------------------------------------------------------------
# calibration data


@dataclass(frozen=True)
class InputSpecCase:
    """Model inputs for calibration data: (name, shape with None/str for dynamic dims, dtype)."""

    inputs: tuple[tuple[str, tuple[Any, ...], str], ...]

    def model(self) -> onnx.ModelProto:
        vis, outs, nodes = [], [], []
        for name, shape, dtype in self.inputs:
            elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
            vis.append(helper.make_tensor_value_info(name, elem, list(shape)))
            outs.append(helper.make_tensor_value_info(f"{name}_out", elem, None))
            nodes.append(helper.make_node("Identity", [name], [f"{name}_out"]))
        graph = helper.make_graph(nodes, "calib", vis, outs)
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)


input_spec_cases = st.builds(
    lambda items: InputSpecCase(tuple(items)),
    st.lists(
        st.tuples(
            st.sampled_from(["input", "x", "mask"]),
            st.lists(st.sampled_from([1, 2, 3, "N", "batch", None]), min_size=0, max_size=3).map(tuple),
            st.sampled_from(["float32", "float32", "float16", "int64"]),
        ),
        min_size=1,
        max_size=2,
        unique_by=lambda t: t[0],
    ),
)


def _concrete(shape: tuple[Any, ...], draw: Any) -> tuple[int, ...]:
    return tuple(d if isinstance(d, int) else draw(st.integers(0, 3)) for d in shape)


@st.composite
def _array(draw: Any, shape: tuple[Any, ...], dtype: str, corrupt: bool) -> Any:
    """An array that fits ``shape``/``dtype`` (possibly with NaN, huge or no values), or, when ``corrupt``,
    mostly does not."""
    kind = draw(
        st.sampled_from(
            [
                "fit",
                "fit",
                "nan",
                "huge",
                "empty",
                "rank",
                "dtype",
                "object",
                "scalar",
                "list",
                "ragged",
                "string",
                "none",
            ]
            if corrupt
            else ["fit", "fit", "fit", "nan", "huge"]
        )
    )
    fit = _concrete(shape, draw)
    if kind in ("fit", "nan", "huge"):
        arr = np.random.default_rng(draw(st.integers(0, 99))).standard_normal(fit).astype(dtype)
        if kind == "nan" and arr.size and np.dtype(dtype).kind == "f":
            arr.reshape(-1)[0] = np.nan
        if kind == "huge" and arr.size and np.dtype(dtype).kind == "f":
            arr.reshape(-1)[0] = np.finfo(dtype).max
        return arr
    if kind == "empty":
        return np.zeros((0, *fit[1:]) if fit else (0,), dtype)
    if kind == "rank":
        return np.zeros((*fit, 2), dtype)
    if kind == "dtype":
        return np.zeros(fit, draw(st.sampled_from(["float64", "int32", "bool", "complex64", "uint8"])))
    if kind == "object":
        arr = np.empty(fit or (1,), dtype=object)
        return arr
    if kind == "scalar":
        return draw(st.one_of(st.floats(), st.integers(), st.booleans()))
    if kind == "list":
        return np.zeros(fit).tolist()
    if kind == "ragged":
        return [[1.0, 2.0], [3.0]]
    if kind == "string":
        return draw(st.text(max_size=4))
    return None


@dataclass
class CalibrationCase:
    specs: InputSpecCase
    kind: str
    feeds: list[Any]

    def __repr__(self) -> str:
        def show(x: Any) -> str:
            if isinstance(x, np.ndarray):
                return f"array(shape={x.shape}, dtype={x.dtype})"
            if isinstance(x, dict):
                return "{" + ", ".join(f"{k!r}: {show(v)}" for k, v in x.items()) + "}"
            return repr(x)

        return f"CalibrationCase({self.specs!r}, kind={self.kind!r}, feeds=[{', '.join(show(f) for f in self.feeds)}])"

    def source(self, directory: Path) -> Any:
        """The calibration source as a user would pass it."""
        if self.kind == "list":
            return list(self.feeds)
        if self.kind == "generator":
            return (f for f in self.feeds)
        if self.kind == "callable":
            return lambda: list(self.feeds)
        if self.kind == "callable_junk":
            return lambda: self.feeds[0] if self.feeds else None
        if self.kind == "single":
            return self.feeds[0] if self.feeds else {}
        if self.kind == "raw":
            return self.feeds[0] if self.feeds else None
        if self.kind == "npz":
            path = directory / "calib.npz"
            arrays = {}
            for feed in self.feeds:
                if isinstance(feed, dict):
                    for k, v in feed.items():
                        if isinstance(k, str) and k and isinstance(v, np.ndarray) and v.dtype != object:
                            arrays.setdefault(k, v)
            np.savez(path, **arrays)
            return path
        if self.kind == "input_list":
            path = directory / "inputs.txt"
            lines = []
            for i, feed in enumerate(self.feeds):
                if not isinstance(feed, dict):
                    lines.append(str(feed))
                    continue
                parts = []
                for j, (k, v) in enumerate(feed.items()):
                    file = directory / f"raw{i}_{j}.raw"
                    if isinstance(v, np.ndarray) and v.dtype != object:
                        v.tofile(file)
                    parts.append(f"{k}:={file.name}")
                lines.append(" ".join(parts))
            path.write_text("\n".join(lines) + "\n")
            return path
        if self.kind == "missing_file":
            return directory / "absent.npz"
        if self.kind == "bad_npz":
            path = directory / "bad.npz"
            path.write_bytes(b"PK\x03\x04 not a zip")
            return path
        raise AssertionError(self.kind)


@st.composite
def calibration_cases(draw: Any) -> CalibrationCase:
    specs = draw(input_spec_cases)
    kind = draw(
        st.sampled_from(
            [
                "list",
                "list",
                "generator",
                "callable",
                "callable_junk",
                "single",
                "raw",
                "npz",
                "npz",
                "input_list",
                "missing_file",
                "bad_npz",
            ]
        )
    )
    feeds: list[Any] = []
    corrupt = draw(st.booleans())
    for _ in range(draw(st.integers(0 if kind != "single" and corrupt else 1, 3))):
        shape_kind = draw(st.sampled_from(["dict", "dict", "dict", "dict", "junk"] if corrupt else ["dict"]))
        if shape_kind == "junk":
            feeds.append(
                draw(
                    st.one_of(
                        st.none(),
                        st.integers(),
                        st.text(max_size=3),
                        st.just(np.zeros(3, np.float32)),
                        st.lists(st.integers(), max_size=2),
                    )
                )
            )
            continue
        feed: dict[Any, Any] = {}
        for name, shape, dtype in specs.inputs:
            if corrupt and draw(st.integers(0, 9)) == 0:
                continue  # missing input
            feed[name] = draw(_array(shape, dtype, corrupt and draw(st.booleans())))
        if corrupt and draw(st.integers(0, 9)) == 0:
            feed[draw(st.sampled_from(["extra", 3, ""]))] = np.zeros(1, np.float32)
        feeds.append(feed)
    return CalibrationCase(specs, kind, feeds)
