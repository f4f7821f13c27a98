"""An independent numpy reference for the quantization tests.

Nothing here imports qpasses: batch-norm folding, the ops of the shipped models and the
fake-quantization arithmetic are written from the ONNX operator definitions and the QNN
quantization spec, so the tests compare qpasses against a second implementation instead of
against itself.

- ``fold_batchnorm(model)``: FP32 weights after folding every Conv/Gemm -> BatchNormalization
  pair (``W' = W * k``, ``b' = (b - mean) * k + beta``, ``k = gamma / sqrt(var + eps)``).
- ``Reference(model)``: interpreter for Conv (groups/pads/strides/dilations), Relu, Clip, MaxPool,
  GlobalAveragePool, Flatten, Gemm, Add and BatchNormalization, in float64.
- ``Reference.run(feeds, quant=QuantSpec(...))``: the same graph with fake quantization at every
  activation that has an encoding, weights dequantized from their encodings and biases rounded to
  the integer grid of scale ``s_in * s_w``.

Encodings are passed as plain ``Grid`` values (bitwidth, scales, offsets); the spec's convention is
``x ~= scale * (q + offset)`` with ``q`` in ``[0, 2^bw - 1]`` and ``offset <= 0``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from numpy.lib.stride_tricks import sliding_window_view
from onnx import helper, numpy_helper


@dataclass(frozen=True)
class Grid:
    """One encoding: per tensor (one scale) or per channel along ``axis``."""

    bitwidth: int
    scale: tuple[float, ...]
    offset: tuple[int, ...]
    axis: int | None = None

    @classmethod
    def of(cls, enc: Any) -> Grid:
        """Copy the plain fields of an encoding object (no arithmetic is borrowed)."""
        return cls(int(enc.bitwidth), tuple(float(s) for s in enc.scale), tuple(int(o) for o in enc.offset), enc.axis)

    def _bcast(self, values: tuple[float, ...] | tuple[int, ...], ndim: int) -> np.ndarray:
        arr = np.asarray(values, dtype=np.float64)
        if self.axis is None:
            return arr.reshape(())
        shape = [1] * ndim
        shape[self.axis] = arr.size
        return arr.reshape(shape)

    def to_levels(self, x: np.ndarray) -> np.ndarray:
        """Unsigned levels ``clip(round(x / scale) - offset, 0, 2^bw - 1)`` (round half to even)."""
        x = np.asarray(x, dtype=np.float64)
        scale, offset = self._bcast(self.scale, x.ndim), self._bcast(self.offset, x.ndim)
        return np.clip(np.rint(x / scale) - offset, 0, 2**self.bitwidth - 1)

    def from_levels(self, q: np.ndarray) -> np.ndarray:
        q = np.asarray(q, dtype=np.float64)
        return (q + self._bcast(self.offset, q.ndim)) * self._bcast(self.scale, q.ndim)

    def fake_quantize(self, x: np.ndarray) -> np.ndarray:
        return self.from_levels(self.to_levels(x))


@dataclass
class QuantSpec:
    """What to fake-quantize: activation grids by tensor name, weight grids by weight name."""

    activations: Mapping[str, Grid] = field(default_factory=dict)
    weights: Mapping[str, Grid] = field(default_factory=dict)
    bias_bw: int = 32
    # bias of a folded/original layer is rounded to scale s_in * s_w (s_w per channel if per-channel)
    quantize_bias: bool = True


def _attrs(node: onnx.NodeProto) -> dict[str, Any]:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _constants(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    values = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            values[node.output[0]] = numpy_helper.to_array(_attrs(node)["value"])
    return values


@dataclass
class Layer:
    """A Conv or Gemm with its (possibly folded) float64 weight and bias.

    ``output`` is the tensor the layer writes after folding (the BN output when folded),
    ``aliases`` the other names of the same value (the pre-BN conv output).
    """

    node: onnx.NodeProto
    weight_name: str
    weight: np.ndarray
    bias: np.ndarray
    output: str
    aliases: tuple[str, ...] = ()


def fold_batchnorm(model: onnx.ModelProto) -> tuple[list[onnx.NodeProto | Layer], dict[str, np.ndarray]]:
    """Nodes with each Conv/Gemm (+ its single-reader BatchNormalization) replaced by a ``Layer``."""
    consts = _constants(model)
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    outputs = {o.name for o in model.graph.output}
    folded_bns: set[str] = set()
    plan: list[onnx.NodeProto | Layer] = []
    for node in model.graph.node:
        if node.op_type == "Constant" or node.name in folded_bns:
            continue
        if node.op_type not in ("Conv", "Gemm"):
            plan.append(node)
            continue
        w = consts[node.input[1]].astype(np.float64)
        a = _attrs(node)
        if node.op_type == "Gemm":
            assert a.get("alpha", 1.0) == 1.0 and a.get("beta", 1.0) == 1.0 and not a.get("transA", 0)
            if not a.get("transB", 0):
                w = w.T  # canonical [out, in]
        cout = w.shape[0]
        bias = consts[node.input[2]].astype(np.float64) if len(node.input) > 2 and node.input[2] else np.zeros(cout)
        out = node.output[0]
        aliases: tuple[str, ...] = ()
        nxt = readers.get(out, [])
        if len(nxt) == 1 and nxt[0].op_type == "BatchNormalization" and out not in outputs:
            bn = nxt[0]
            gamma, beta, mean, var = (consts[n].astype(np.float64) for n in bn.input[1:5])
            k = gamma / np.sqrt(var + _attrs(bn).get("epsilon", 1e-5))
            w = w * k.reshape((-1,) + (1,) * (w.ndim - 1))
            bias = (bias - mean) * k + beta
            aliases, out = (out,), bn.output[0]
            folded_bns.add(bn.name)
        plan.append(Layer(node, node.input[1], w, bias, out, aliases))
    return plan, consts


# --- ops -------------------------------------------------------------------------------------------


def _pads(a: dict[str, Any], spatial: int) -> list[int]:
    assert a.get("auto_pad", b"NOTSET") in (b"NOTSET", "NOTSET"), "auto_pad not supported by the reference"
    return list(a.get("pads", [0] * (2 * spatial)))


def conv2d(x: np.ndarray, w: np.ndarray, b: np.ndarray, a: dict[str, Any]) -> np.ndarray:
    """ONNX Conv for NCHW with group, pads, strides and dilations."""
    n, c, _, _ = x.shape
    cout, cin_g, kh, kw = w.shape
    group = int(a.get("group", 1))
    assert cin_g * group == c, (w.shape, x.shape, group)
    sh, sw = a.get("strides", [1, 1])
    dh, dw = a.get("dilations", [1, 1])
    pt, pl, pb, pr = _pads(a, 2)
    xp = np.pad(x, ((0, 0), (0, 0), (pt, pb), (pl, pr)))
    span_h, span_w = dh * (kh - 1) + 1, dw * (kw - 1) + 1
    win = sliding_window_view(xp, (span_h, span_w), axis=(2, 3))[:, :, ::sh, ::sw, ::dh, ::dw]
    oh, ow = win.shape[2], win.shape[3]
    win = win.reshape(n, group, cin_g, oh, ow, kh, kw)
    wg = w.reshape(group, cout // group, cin_g, kh, kw)
    y = np.einsum("ngchwij,gocij->ngohw", win, wg, optimize=True).reshape(n, cout, oh, ow)
    return y + b.reshape(1, -1, 1, 1)


def maxpool2d(x: np.ndarray, a: dict[str, Any]) -> np.ndarray:
    kh, kw = a["kernel_shape"]
    sh, sw = a.get("strides", [1, 1])
    assert not a.get("ceil_mode", 0) and a.get("dilations", [1, 1]) == [1, 1]
    pt, pl, pb, pr = _pads(a, 2)
    xp = np.pad(x, ((0, 0), (0, 0), (pt, pb), (pl, pr)), constant_values=-np.inf)
    return sliding_window_view(xp, (kh, kw), axis=(2, 3))[:, :, ::sh, ::sw].max(axis=(-2, -1))


def batchnorm(x: np.ndarray, node: onnx.NodeProto, consts: dict[str, np.ndarray]) -> np.ndarray:
    gamma, beta, mean, var = (consts[n].astype(np.float64) for n in node.input[1:5])
    k = gamma / np.sqrt(var + _attrs(node).get("epsilon", 1e-5))
    shape = (1, -1) + (1,) * (x.ndim - 2)
    return (x - mean.reshape(shape)) * k.reshape(shape) + beta.reshape(shape)


# --- interpreter -----------------------------------------------------------------------------------


class Reference:
    """Executes an FP32 model (BatchNorms folded) in float64, optionally fake-quantized."""

    def __init__(self, model: onnx.ModelProto, *, fold: bool = True) -> None:
        self.model = model
        if fold:
            self.plan, self.consts = fold_batchnorm(model)
        else:
            self.consts = _constants(model)
            self.plan = [n for n in model.graph.node if n.op_type != "Constant"]
            self.plan = [self._layer(n) if n.op_type in ("Conv", "Gemm") else n for n in self.plan]
        self.outputs = [o.name for o in model.graph.output]

    def _layer(self, node: onnx.NodeProto) -> Layer:
        w = self.consts[node.input[1]].astype(np.float64)
        if node.op_type == "Gemm" and not _attrs(node).get("transB", 0):
            w = w.T
        b = (
            self.consts[node.input[2]].astype(np.float64)
            if len(node.input) > 2 and node.input[2]
            else np.zeros(w.shape[0])
        )
        return Layer(node, node.input[1], w, b, node.output[0])

    @property
    def layers(self) -> list[Layer]:
        return [p for p in self.plan if isinstance(p, Layer)]

    def tensor_names(self) -> set[str]:
        """Every activation name the reference knows (graph inputs, op outputs, folded aliases)."""
        names = {i.name for i in self.model.graph.input} - set(self.consts)
        for p in self.plan:
            if isinstance(p, Layer):
                names.update((p.output, *p.aliases))
            else:
                names.update(p.output)
        return names

    def run(self, feeds: Mapping[str, np.ndarray], quant: QuantSpec | None = None) -> dict[str, np.ndarray]:
        """All activations by name (aliases included), float64."""
        acts = dict(quant.activations) if quant else {}
        env: dict[str, np.ndarray] = {}

        def put(names: tuple[str, ...], value: np.ndarray) -> None:
            grid = next((acts[n] for n in names if n in acts), None)
            if grid is not None:
                value = grid.fake_quantize(value)
            for n in names:
                env[n] = value

        for name, value in feeds.items():
            put((name,), np.asarray(value, dtype=np.float64))
        for p in self.plan:
            if isinstance(p, Layer):
                put((p.output, *p.aliases), self._run_layer(p, env, quant))
            else:
                put((p.output[0],), self._run_node(p, env))
        return env

    def _run_layer(self, layer: Layer, env: dict[str, np.ndarray], quant: QuantSpec | None) -> np.ndarray:
        node = layer.node
        x = env[node.input[0]]
        w, b = layer.weight, layer.bias
        if quant is not None and layer.weight_name in quant.weights:
            wg = quant.weights[layer.weight_name]
            if node.op_type == "Gemm" and wg.axis is not None and not _attrs(node).get("transB", 0):
                wg = Grid(wg.bitwidth, wg.scale, wg.offset, 0)  # grids of [in, out] weights, used as [out, in]
            w = wg.fake_quantize(w)
            in_grid = next((quant.activations[n] for n in (node.input[0],) if n in quant.activations), None)
            if quant.quantize_bias and in_grid is not None:
                b = quantize_bias(b, in_grid.scale[0], np.asarray(wg.scale), quant.bias_bw)
        if node.op_type == "Conv":
            return conv2d(x, w, b, _attrs(node))
        return x @ w.T + b

    def _run_node(self, node: onnx.NodeProto, env: dict[str, np.ndarray]) -> np.ndarray:
        op = node.op_type
        a = _attrs(node)
        x = env[node.input[0]]
        if op == "Relu":
            return np.maximum(x, 0.0)
        if op == "Clip":
            lo = _optional(node, 1, env, self.consts, a.get("min", -np.inf))
            hi = _optional(node, 2, env, self.consts, a.get("max", np.inf))
            return np.clip(x, lo, hi)
        if op == "MaxPool":
            return maxpool2d(x, a)
        if op == "GlobalAveragePool":
            return x.mean(axis=tuple(range(2, x.ndim)), keepdims=True)
        if op == "Flatten":
            axis = a.get("axis", 1)
            return x.reshape(int(np.prod(x.shape[:axis])), -1)
        if op == "Add":
            other = env[node.input[1]] if node.input[1] in env else self.consts[node.input[1]].astype(np.float64)
            return x + other
        if op == "BatchNormalization":
            return batchnorm(x, node, self.consts)
        raise NotImplementedError(f"reference has no {op}")


def _optional(
    node: onnx.NodeProto, slot: int, env: dict[str, np.ndarray], consts: dict[str, np.ndarray], default: float
) -> Any:
    if len(node.input) > slot and node.input[slot]:
        name = node.input[slot]
        return env[name] if name in env else consts[name].astype(np.float64)
    return default


def quantize_bias(bias: np.ndarray, input_scale: float, weight_scale: np.ndarray, bitwidth: int = 32) -> np.ndarray:
    """Bias as the integer grid of scale ``s_in * s_w`` sees it (signed, zero point 0)."""
    scale = input_scale * np.asarray(weight_scale, dtype=np.float64)
    half = 2 ** (bitwidth - 1)
    return np.clip(np.rint(bias / scale), -half, half - 1) * scale


def bias_levels(bias: np.ndarray, input_scale: float, weight_scale: np.ndarray) -> np.ndarray:
    """The stored integers of a bias with scale ``s_in * s_w`` (unclipped, for comparison)."""
    return np.rint(bias / (input_scale * np.asarray(weight_scale, dtype=np.float64)))


def spec_encoding(lo: float, hi: float, bitwidth: int) -> Grid:
    """The spec's tf rule written out: min range 1e-4, 0 inside the range, shift so 0 is a level."""
    levels = 2**bitwidth - 1
    hi = max(hi, lo + 1e-4)
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = (hi - lo) / levels
    ratio = lo / scale
    offset = int(np.sign(ratio) * np.floor(abs(ratio) + 0.5))
    return Grid(bitwidth, (scale,), (max(-levels, min(0, offset)),))
