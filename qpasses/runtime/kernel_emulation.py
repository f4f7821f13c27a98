"""Numpy emulation of onnxruntime's x86 integer GEMM without VNNI (AVX2), for QDQ models.

onnxruntime fuses DequantizeLinear -> Conv/Gemm/MatMul -> QuantizeLinear into integer kernels
(QLinearConv, QGemm, MatMulInteger). Which kernel runs depends on the stored types: with uint8
activations and int8 weights (u8s8) its AVX2 kernel multiplies with ``vpmaddubsw``, which adds each
pair of neighbouring products along the reduction axis in int16 **with saturation**. With VNNI
(``vpdpbusd``) or on ARM the sums are int32 and exact; u8u8 kernels widen to int16 first and
cannot saturate. s8s8 (int8 activations) runs the same u8s8 kernel on the activations shifted to
uint8 (+128, the zero point with them), so it saturates too: a digits CNN stored s8s8 gives 8.2 dB
SQNR vs its exact QDQ semantics on an emulated AVX2 CPU (qemu Haswell, onnxruntime 1.32), as stored u8s8.
This module replays that kernel on the integers the model computes under exact QDQ semantics, so a
machine with VNNI can tell whether a model would break on one without.

Pairs follow the kernels' reduction order: input channels innermost for Conv (NHWC im2col,
``(kh, kw, c)``), the shared dimension for Gemm/MatMul. Depthwise convolutions (one input and
one output channel per group) run in a separate int32 kernel and never saturate.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from qpasses.quant.plan import output_channel_axis

MAC_OPS = ("Conv", "Gemm", "MatMul")
INT16_MIN, INT16_MAX = -(2**15), 2**15 - 1
_MAX_POSITIONS = 512  # output rows (pixels x batch) replayed per op; enough to measure a rate
_CHUNK_ELEMENTS = 1 << 23  # bound on the [rows, pairs, channels] scratch


@dataclass(frozen=True)
class FusedMac:
    """A Conv/Gemm/MatMul that onnxruntime can run as an 8-bit integer kernel."""

    op: str
    op_type: str
    activation: str  # the stored-integer tensor feeding the activation's DequantizeLinear
    act_signed: bool
    act_scale: float
    act_zero_point: int
    weight: np.ndarray  # stored integers, as in the model
    weight_signed: bool
    weight_scale: np.ndarray  # per output channel (broadcast from per-tensor)
    weight_zero_point: np.ndarray  # per output channel
    attributes: dict[str, Any]  # as onnx.helper.get_attribute_value gives them: ints, lists, bytes

    @property
    def kernel(self) -> str:
        return f"{'s' if self.act_signed else 'u'}8{'s' if self.weight_signed else 'u'}8"

    @property
    def can_saturate(self) -> bool:
        """u8s8 (and s8s8, shifted to u8s8) go through vpmaddubsw on AVX2; u8u8 widens first."""
        return self.weight_signed


@dataclass(frozen=True)
class MacEmulation:
    """One op replayed on x86 without VNNI."""

    op: str
    op_type: str
    kernel: str
    rows: int  # output rows replayed
    saturated_pairs: float  # fraction of int16 pair sums that saturated
    sqnr_db: float  # the op's float output vs the error saturation adds (inf: none)

    @property
    def diverges(self) -> bool:
        """Saturation that changes the result by more than 8-bit quantization noise would."""
        return self.saturated_pairs > 0 and self.sqnr_db < 40.0

    def format(self) -> str:
        if self.saturated_pairs == 0:
            return f"{self.op} ({self.op_type}, {self.kernel}): no saturation"
        return (
            f"{self.op} ({self.op_type}, {self.kernel}): {100 * self.saturated_pairs:.2f}% of int16 pair sums "
            f"saturate, output SQNR {self.sqnr_db:.1f} dB"
        )


def _constants(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    out = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            out[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return out


def _stored_type(model: onnx.ModelProto, constants: dict[str, np.ndarray], dq: onnx.NodeProto) -> np.dtype | None:
    """The integer type a DequantizeLinear reads (from its zero point, else its input's value_info)."""
    if len(dq.input) > 2 and dq.input[2] in constants:
        return constants[dq.input[2]].dtype
    if dq.input[0] in constants:
        return constants[dq.input[0]].dtype
    for vi in [*model.graph.value_info, *model.graph.input]:
        if vi.name == dq.input[0]:
            return onnx.helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type)
    return np.dtype(np.uint8)  # QuantizeLinear without a zero point writes uint8


def fused_macs(model: onnx.ModelProto) -> list[FusedMac]:
    """The Conv/Gemm/MatMul whose activation and constant weight both come through 8-bit DQ."""
    constants = _constants(model)
    producers = {o: n for n in model.graph.node for o in n.output}
    found: list[FusedMac] = []
    for node in model.graph.node:
        if node.op_type not in MAC_OPS or len(node.input) < 2:
            continue
        dq_a, dq_w = producers.get(node.input[0]), producers.get(node.input[1])
        if dq_a is None or dq_w is None or dq_a.op_type != "DequantizeLinear" or dq_w.op_type != "DequantizeLinear":
            continue
        if dq_a.input[0] in constants or dq_w.input[0] not in constants:
            continue
        a_type, w_type = _stored_type(model, constants, dq_a), _stored_type(model, constants, dq_w)
        if a_type not in (np.uint8, np.int8) or w_type not in (np.uint8, np.int8):
            continue
        a_scale, a_zp = constants.get(dq_a.input[1]), constants.get(dq_a.input[2]) if len(dq_a.input) > 2 else 0
        if a_scale is None or np.size(a_scale) != 1:
            continue
        weight = constants[dq_w.input[0]]
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        out_axis = output_channel_axis(node.op_type, bool(attrs.get("transB", 0)), weight.ndim)
        w_scale = np.asarray(constants.get(dq_w.input[1], 1.0), np.float64).reshape(-1)
        w_zp = np.asarray(constants.get(dq_w.input[2], 0) if len(dq_w.input) > 2 else 0, np.int64).reshape(-1)
        channels = weight.shape[out_axis] if weight.ndim > out_axis else 1
        if w_scale.size > 1 and not _along_output_channels(dq_w, weight.ndim, out_axis, w_scale.size, channels):
            continue  # not a per-output-channel weight: no integer kernel of this shape to replay
        found.append(
            FusedMac(
                node.name or node.output[0],
                node.op_type,
                dq_a.input[0],
                a_type == np.int8,
                float(np.asarray(a_scale).reshape(-1)[0]),
                int(np.asarray(a_zp if a_zp is not None else 0).reshape(-1)[0]),
                weight,
                w_type == np.int8,
                np.broadcast_to(w_scale, (channels,)).copy(),
                np.broadcast_to(w_zp, (channels,)).copy(),
                attrs,
            )
        )
    return found


def _along_output_channels(dq: onnx.NodeProto, rank: int, out_axis: int, size: int, channels: int) -> bool:
    """Whether a weight DequantizeLinear's per-axis scale runs along the layer's output channels."""
    axis = next((int(a.i) for a in dq.attribute if a.name == "axis"), 1)  # ONNX's default axis is 1
    return (axis + rank if axis < 0 else axis) == out_axis and size == channels


def _rows_and_matrix(mac: FusedMac, a: np.ndarray) -> tuple[np.ndarray, np.ndarray, int] | None:
    """(A [rows, K] stored ints in reduction order, W [K, N], groups) or None when not a GEMM kernel."""
    w = mac.weight.astype(np.int32)
    if mac.op_type == "Gemm":
        rows = a.T if mac.attributes.get("transA", 0) else a
        return rows, (w.T if mac.attributes.get("transB", 0) else w), 1
    if mac.op_type == "MatMul":
        if w.ndim != 2:
            return None
        return a.reshape(-1, a.shape[-1]), w, 1
    group = int(mac.attributes.get("group", 1))
    if a.ndim < 3 or w.shape[1] == 1 and w.shape[0] == group:
        return None  # depthwise: int32 kernel
    return _im2col_nhwc(mac, a, w, group)


def _im2col_nhwc(mac: FusedMac, a: np.ndarray, w: np.ndarray, group: int) -> tuple[np.ndarray, np.ndarray, int]:
    spatial = a.ndim - 2
    kernel = w.shape[2:]
    strides = list(mac.attributes.get("strides", [1] * spatial))
    dilations = list(mac.attributes.get("dilations", [1] * spatial))
    pads = list(mac.attributes.get("pads", [0] * (2 * spatial)))
    auto_pad = mac.attributes.get("auto_pad", b"NOTSET")
    if auto_pad in (b"SAME_UPPER", b"SAME_LOWER", "SAME_UPPER", "SAME_LOWER"):
        pads = []
        for i in range(spatial):
            out = -(-a.shape[2 + i] // strides[i])
            total = max(0, (out - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1 - a.shape[2 + i])
            pads.append(total // 2 if auto_pad in (b"SAME_UPPER", "SAME_UPPER") else total - total // 2)
        pads += [0] * spatial
        pads = [p if i < spatial else 0 for i, p in enumerate(pads)]
    # Padding holds the zero point (a real zero), as the kernels pad quantized inputs.
    width = [(0, 0), (0, 0)] + [(pads[i], pads[i + spatial]) for i in range(spatial)]
    padded = np.pad(a, width, constant_values=mac.act_zero_point).astype(np.int32)
    nhwc = np.moveaxis(padded, 1, -1)  # [N, *S, C]
    windows = np.lib.stride_tricks.sliding_window_view(
        nhwc, [(k - 1) * d + 1 for k, d in zip(kernel, dilations, strict=True)], axis=tuple(range(1, 1 + spatial))
    )
    # windows: [N, *out_full, C, *window]; take strides and dilations
    index = (
        slice(None),
        *[slice(None, None, s) for s in strides],
        slice(None),
        *[slice(None, None, d) for d in dilations],
    )
    windows = windows[index]
    n_rows = int(np.prod(windows.shape[: 1 + spatial]))
    channels = windows.shape[1 + spatial]
    # -> [rows, *kernel, C] so the reduction runs (kh, kw, c) with c innermost
    cols = np.moveaxis(windows.reshape(n_rows, channels, *kernel), 1, -1)
    cin_g = channels // group
    cols = cols.reshape(n_rows, -1, group, cin_g)  # [rows, taps, group, cin_g]
    cols = np.moveaxis(cols, 2, 0).reshape(group, n_rows, -1)  # [group, rows, taps*cin_g]
    cout_g = w.shape[0] // group
    wm = np.moveaxis(w, 1, -1).reshape(group, cout_g, -1).transpose(0, 2, 1)  # [group, taps*cin_g, cout_g]
    return cols, wm, group


def _saturated_sum(a: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, int]:
    """sum over pairs of clip(a0*w0 + a1*w1) for A [rows, K] (uint8 range) and W [K, N] (int8)."""
    rows, k = a.shape
    if k % 2:
        a = np.pad(a, [(0, 0), (0, 1)])
        w = np.pad(w, [(0, 1), (0, 0)])
        k += 1
    a2 = a.reshape(rows, k // 2, 2).astype(np.int32)
    w2 = w.reshape(k // 2, 2, -1).astype(np.int32)
    total = np.zeros((rows, w.shape[1]), np.int64)
    saturated = 0
    step = max(1, _CHUNK_ELEMENTS // max(1, rows * w.shape[1]))
    for j in range(0, k // 2, step):
        pairs = np.einsum("rjt,jtn->rjn", a2[:, j : j + step], w2[j : j + step])
        clipped = np.clip(pairs, INT16_MIN, INT16_MAX)
        saturated += int(np.count_nonzero(clipped != pairs))
        total += clipped.sum(axis=1)
    return total, saturated


def emulate_mac(mac: FusedMac, activation: np.ndarray, *, max_rows: int = _MAX_POSITIONS) -> MacEmulation | None:
    """Replay one op's u8s8 kernel on its stored activation integers, int8 ones shifted to uint8 as the
    kernel does (None: not a GEMM kernel)."""
    if not mac.can_saturate:
        return MacEmulation(mac.op, mac.op_type, mac.kernel, 0, 0.0, float("inf"))
    shaped = _rows_and_matrix(mac, np.asarray(activation))
    if shaped is None:
        return None
    rows, w, groups = shaped
    # int8 activations enter the u8s8 kernel shifted to uint8, their zero point with them.
    shift = 128 if mac.act_signed else 0
    if groups == 1 and rows.ndim == 2:
        rows, w = rows[None], w[None]
    signal = noise = 0.0
    saturated = pairs = 0
    n_rows = rows.shape[1]
    pick = np.linspace(0, n_rows - 1, min(n_rows, max_rows)).astype(np.int64)
    cout_g = w.shape[2]
    for g in range(rows.shape[0]):
        a = rows[g][pick].astype(np.int32) + shift
        wg = w[g]
        exact = a.astype(np.int64) @ wg.astype(np.int64)
        sat, n_sat = _saturated_sum(a, wg)
        saturated += n_sat
        pairs += a.shape[0] * ((a.shape[1] + 1) // 2) * wg.shape[1]
        # The op's float output before bias: scales x sum (a - zp_a)(w - zp_w).
        channels = slice(g * cout_g, (g + 1) * cout_g)
        weights = wg.astype(np.int64) - mac.weight_zero_point[channels]
        centered = (a.astype(np.int64) - (mac.act_zero_point + shift)) @ weights
        scale = mac.act_scale * mac.weight_scale[channels]
        signal += float(np.sum((centered * scale) ** 2))
        noise += float(np.sum(((sat - exact) * scale) ** 2))
    sqnr = float("inf") if noise == 0 else 10 * np.log10(max(signal, 1e-30) / noise)
    return MacEmulation(mac.op, mac.op_type, mac.kernel, len(pick) * rows.shape[0], saturated / max(pairs, 1), sqnr)


def saturation_probe_model(k: int = 64) -> onnx.ModelProto:
    """A QDQ MatMul whose every u8 x s8 product pair (255 x 127 twice) overflows int16."""
    from onnx import TensorProto, helper

    arr = numpy_helper.from_array
    inits = [
        arr(np.array(1.0, np.float32), "s"),
        arr(np.array(0, np.uint8), "z"),
        arr(np.full((k, 8), 127, np.int8), "w"),
        arr(np.array(0, np.int8), "zw"),
        arr(np.array(8192.0, np.float32), "so"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"]),
        helper.make_node("DequantizeLinear", ["w", "s", "zw"], ["wd"]),
        helper.make_node("MatMul", ["xd", "wd"], ["y"]),
        helper.make_node("QuantizeLinear", ["y", "so", "z"], ["yq"]),
        helper.make_node("DequantizeLinear", ["yq", "so", "z"], ["out"]),
    ]
    graph = helper.make_graph(
        nodes,
        "saturation_probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, k])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [4, 8])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def runtime_saturates() -> bool:
    """Probe this machine's onnxruntime: does its fused u8s8 kernel saturate int16 pair sums?

    Reading CPU flags is not enough (emulators, hypervisors that hide VNNI, new kernels): run it.
    """
    from qpasses.core import verification

    model = saturation_probe_model()
    x = {"x": np.full((4, 64), 255, np.float32)}
    exact = verification.exact_session(model).run(None, x)[0]
    fused = verification.runtime_session(model).run(None, x)[0]
    return not np.allclose(exact, fused)
